"""distill.py and training/run_dir.py keep a run safe: its --out is never touched unasked (and --overwrite clears it only
once everything has loaded), one run at a time uses it, --resume continues exactly or refuses,
a diverged run stops with its last good checkpoint, every bad option is one line, a full disk
(a real one too) and a damaged file of a run too, and a resumed run does not keep the previous
train_state.pt open. Ctrl-C is one line, and a resume that changes the lr schedule says so."""
import errno
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys

import pytest
import torch

import distill
from conftest import assert_exits, tiny_config
from distill import main, optimizer_update, parse_args, train
from model import Transformer
from compat import hf
from compat.hf import from_pretrained, save_pretrained
from safetensors import SafetensorError
from training import run_dir
from training.run_dir import Diverged, RunLock


def run_args(init, out, *extra):
    return ["--init", init, "--out", str(out), "--k", "4", "--seq-len", "64", "--micro-batch", "4",
            "--step-tokens", "512", "--log-every", "2", "--save-every", "3", "--threads", "1", *extra]


def snapshot(out):
    """Every file under out, with its bytes (the lock aside)."""
    files = {}
    for folder, _, names in os.walk(out):
        for name in names:
            path = os.path.join(folder, name)
            if name != "lock":
                files[os.path.relpath(path, out)] = open(path, "rb").read()
    return files


def strict_json(path):
    """Every line of a .jsonl, read as JSON proper: a bare NaN or Infinity is an error."""
    def refuse(word):
        raise ValueError(f"{word} in {path}")
    return [json.loads(line, parse_constant=refuse) for line in open(path)]


@pytest.fixture(scope="module")
def done_run(tiny_init, tmp_path_factory):
    """A finished 3-step run (checkpoint at step 3), to copy."""
    out = tmp_path_factory.mktemp("done") / "run"
    train(parse_args(run_args(tiny_init, out, "--steps", "3")))
    return out


def copy_of(run, to):
    shutil.copytree(run, to)
    return to


# -----------------------------------------------------------------------------
# The run directory


def test_overwrite_clears_the_old_run_only_after_everything_has_loaded(tiny_init, done_run, tmp_path,
                                                                       capsys):
    out = copy_of(done_run, tmp_path / "run")
    before = snapshot(out)
    assert_exits(main, run_args(tiny_init, out, "--steps", "2", "--overwrite", "--data",
                                str(tmp_path / "typo.jsonl")), "typo.jsonl does not exist", capsys)
    assert snapshot(out) == before                    # the old run is whole


def test_overwrite_never_clears_the_init_it_reads(done_run, tmp_path, capsys):
    out = copy_of(done_run, tmp_path / "run")
    before = snapshot(out)
    assert_exits(main, run_args(str(out / "ckpt"), out, "--steps", "2", "--reuse-mtp", "--overwrite"),
                 "lies inside --out", capsys)
    assert snapshot(out) == before


@pytest.mark.parametrize("trace", ["ckpt without train_state.pt", "log.jsonl", "args.json"])
def test_a_new_run_refuses_any_trace_of_a_run(tiny_init, done_run, tmp_path, capsys, trace):
    """A shared checkpoint (no train_state.pt), or a log or args of an earlier run: a new run
    into that --out refuses without --overwrite and leaves every byte as it was."""
    out = tmp_path / "run"
    out.mkdir()
    if trace.startswith("ckpt"):
        copy_of(done_run / "ckpt", out / "ckpt")
        os.remove(out / "ckpt" / "train_state.pt")
    else:
        (out / trace).write_bytes((done_run / trace).read_bytes())
    before = snapshot(out)
    assert_exits(main, run_args(tiny_init, out, "--steps", "1"), "already holds a run", capsys)
    assert snapshot(out) == before


def gone_pid():
    """The pid of a process that has ended."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_lock_keeps_a_second_run_out_and_a_dead_runs_lock_is_taken_over(tiny_init, tmp_path, capsys):
    out, host = tmp_path / "run", socket.gethostname()
    out.mkdir()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for holder in (f"{alive.pid} {host}", f"{gone_pid()} another-machine"):
            (out / "lock").write_text(holder + "\n")
            pid, where = holder.split()
            assert_exits(main, run_args(tiny_init, out, "--steps", "1"),
                         f"in use by another run (pid {pid} on {where})", capsys)
            assert os.listdir(out) == ["lock"]
    finally:
        alive.kill()
    (out / "lock").write_text(f"{gone_pid()} {host}\n")      # killed: its lock is stale
    train(parse_args(run_args(tiny_init, out, "--steps", "1")))
    assert os.path.isdir(out / "ckpt") and not os.path.exists(out / "lock")   # released at the end


def test_the_lock_is_released_and_an_empty_out_removed_when_a_run_fails(tiny_init, tmp_path, capsys):
    out = tmp_path / "new"
    assert_exits(main, run_args(tiny_init, out, "--data", str(tmp_path / "typo.jsonl")),
                 "does not exist", capsys)
    assert not out.exists()
    with RunLock(str(out)):
        assert open(out / "lock").read().split() == [str(os.getpid()), socket.gethostname()]
    assert not out.exists()


# -----------------------------------------------------------------------------
# --resume continues the run exactly, or refuses


def test_resume_refuses_every_changed_setting(tiny_init, done_run, tmp_path, capsys):
    out = copy_of(done_run, tmp_path / "run")
    before = snapshot(out)
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"question": "1 + 1?", "answer": "#### 2"}) + "\n")
    with pytest.raises(SystemExit):
        main(run_args(tiny_init, out, "--steps", "6", "--resume", "--k", "3", "--lr", "1e-3",
                      "--seed", "1", "--data", str(other), "--teacher", "soft", "--seq-len", "48"))
    err = capsys.readouterr().err
    for change in ("--k 4 -> 3", f"--lr {distill.TrainConfig().lr} -> 0.001", "--seed 0 -> 1", "--seq-len 64 -> 48",
                   f"--data 'synthetic' -> '{other}'", "--teacher 'hard' -> 'soft'"):
        assert change in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert snapshot(out) == before                    # args.json and the log as they were


def test_resume_takes_what_may_change(tiny_init, done_run, tmp_path):
    """The run's length, its intervals and threads are not settings of the run."""
    out = copy_of(done_run, tmp_path / "run")
    train(parse_args(run_args(tiny_init, out, "--steps", "4", "--resume", "--log-every", "1",
                              "--save-every", "1", "--threads", "2")))
    assert torch.load(out / "ckpt" / "train_state.pt", weights_only=False)["step"] == 4
    assert run_dir.RESUMABLE >= {"steps", "log_every", "save_every", "threads"}


def test_a_resumed_run_does_not_keep_the_old_train_state_open(tiny_init, done_run, tmp_path,
                                                              monkeypatch):
    """After the resumed run's first save has deleted the train_state.pt it resumed from, no
    mapping of that file is left in the process (it would keep it on disk for the whole run)."""
    if not os.path.isfile("/proc/self/maps"):
        pytest.skip("needs /proc/self/maps")
    out, maps = copy_of(done_run, tmp_path / "run"), []
    save = run_dir.save_checkpoint

    def save_and_look(*a, **kw):
        save(*a, **kw)
        maps.extend(line for line in open("/proc/self/maps") if "train_state.pt" in line)
    monkeypatch.setattr(run_dir, "save_checkpoint", save_and_look)
    train(parse_args(run_args(tiny_init, out, "--steps", "5", "--save-every", "1", "--resume")))
    assert maps == []


# -----------------------------------------------------------------------------
# A diverged run stops; its last good checkpoint and a valid log stay


def test_a_diverged_run_stops_at_the_step_and_keeps_its_last_good_checkpoint(tiny_init, tmp_path,
                                                                             monkeypatch, capsys):
    calls, mtp_step = [], distill.mtp_step

    def nan_at_step_5(*a, **kw):          # two micro-batches a step: the 9th is step 5's first
        loss, stats = mtp_step(*a, **kw)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 9 else loss), stats
    monkeypatch.setattr(distill, "mtp_step", nan_at_step_5)
    out = tmp_path / "run"
    assert_exits(main, run_args(tiny_init, out, "--steps", "8"),
                 "step 5 diverged: the loss is nan", capsys)
    assert len(calls) == 10                           # it stopped there
    state = torch.load(out / "ckpt" / "train_state.pt", weights_only=False)
    assert state["step"] == 3
    m = from_pretrained(str(out / "ckpt"))
    assert all(p.isfinite().all() for p in m.parameters())
    assert [r["step"] for r in strict_json(out / "log.jsonl") if "loss" in r] == [2, 4]


def test_optimizer_update_refuses_a_non_finite_gradient_before_any_weight_changes():
    torch.manual_seed(0)
    model = Transformer(tiny_config())
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    cfg = parse_args([])
    for grad_clip in ("1.0", "0"):
        cfg.grad_clip = float(grad_clip)
        model(torch.tensor([[1, 2, 3]])).sum().backward()
        model.blocks[0].mlp.fc.weight.grad[0, 0] = float("inf")
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        with pytest.raises(Diverged, match="gradient norm inf"):
            optimizer_update(model, opt, cfg, loss=1.0)
        assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
        opt.zero_grad()


# -----------------------------------------------------------------------------
# Every bad option is one line, before anything is loaded or written


BAD_OPTIONS = [
    (["--cooldown", "-5"], "--cooldown must be >= 0"),
    (["--warmup", "-1"], "--warmup must be >= 0"),
    (["--grad-clip", "-1"], "--grad-clip must be >= 0"),
    (["--grad-clip", "nan"], "--grad-clip must be >= 0"),
    (["--lr", "-1"], "--lr must be > 0"),
    (["--lr", "nan"], "--lr must be > 0"),
    (["--lr", "inf"], "--lr must be > 0"),
    (["--weight-decay", "-0.1"], "--weight-decay must be >= 0"),
    (["--weight-decay", "nan"], "--weight-decay must be >= 0"),
    (["--threads", "-2"], "--threads must be >= 0"),
    (["--regions", "-1"], "--regions must be >= 0"),
    (["--minutes", "nan"], "--minutes must be >= 0"),
    (["--minutes", "inf"], "--minutes must be >= 0"),
    (["--device", "gpu"], "--device must be auto, cpu or cuda"),
    (["--plan"], "python -m tools.plan_memory"),
    (["--resume", "--overwrite"], "pass one"),
]


@pytest.mark.parametrize("extra,message", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_every_bad_option_is_one_line(tiny_init, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert_exits(main, run_args(tiny_init, out, "--steps", "2", *extra), message, capsys)
    assert not out.exists()                           # nothing written


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_one_line(tiny_init, tmp_path, capsys):
    assert_exits(main, run_args(tiny_init, tmp_path / "run", "--device", "cuda"),
                 "no CUDA device is visible", capsys)


def test_an_out_that_is_a_file_is_one_line(tiny_init, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert_exits(main, run_args(tiny_init, tmp_path / "file"), "is a file", capsys)


def test_a_tokenizer_that_does_not_fit_the_teachers_vocabulary(tmp_path, capsys):
    from synthetic.tokenizer import synthetic_tokenizer
    small = tmp_path / "small"
    save_pretrained(Transformer(tiny_config(vocab=100, max_seq_len=256)), small)
    synthetic_tokenizer().save(small)                 # 512 ids for 100 rows
    assert_exits(main, run_args(str(small), tmp_path / "run"),
                 "its tokenizer has ids up to 511, but the model has 100 token rows", capsys)


def raise_at_second_call(fn, error):
    calls = []

    def second_fails(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise error
        return fn(*a, **kw)
    return second_fails


TORCH_FULL = RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed "
                          "writing file data/3: file write failed")
SAFETENSORS_FULL = SafetensorError('Error while serializing: IoError(Os { code: 28, kind: '
                                   'StorageFull, message: "No space left on device" })')
WRITE_FAILURES = {   # what fails, how: what is patched, its error, a full disk?, what is said
    "torch.save, ENOSPC": (run_dir.torch, "save", OSError(errno.ENOSPC, "No space left on device"),
                           False, "untouched: the disk is full"),
    "torch.save, its RuntimeError": (run_dir.torch, "save", TORCH_FULL, True,
                                     "untouched: the disk is full"),
    "safetensors, its SafetensorError": (hf, "save_file", SAFETENSORS_FULL, False,
                                         "untouched: the disk is full"),
    "torch.save, another RuntimeError": (run_dir.torch, "save", TORCH_FULL, False,
                                         "untouched: RuntimeError: [enforce fail"),
}


@pytest.mark.parametrize("case", WRITE_FAILURES)
def test_a_failed_save_is_one_line_and_keeps_the_last_checkpoint(tiny_init, tmp_path, monkeypatch,
                                                                 capsys, case):
    """torch.save and safetensors report a full disk as their own error types (RuntimeError
    without an errno, SafetensorError): each is one line, naming a full disk as one where the
    disk is full, and the half-written ckpt.tmp is removed."""
    where, name, error, full, message = WRITE_FAILURES[case]
    out = tmp_path / "run"
    monkeypatch.setattr(where, name, raise_at_second_call(getattr(where, name), error))
    if full:
        monkeypatch.setattr(run_dir.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(
            30 << 20, 30 << 20, 4096))
    assert_exits(main, run_args(tiny_init, out, "--steps", "8"),
                 f"saving the checkpoint of step 6 failed, the last one saved is {message}", capsys)
    monkeypatch.undo()
    assert torch.load(out / "ckpt" / "train_state.pt", weights_only=False)["step"] == 3
    assert sorted(os.listdir(out)) == ["args.json", "ckpt", "log.jsonl"]    # no ckpt.tmp, no lock


@pytest.fixture
def small_disk(tmp_path):
    """A real 30 MB file system (tmpfs; needs root and a mount that is permitted)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=30m", "tmpfs",
                                            str(disk)], capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root, where it is permitted")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)   # -l: a failed test may hold a file


def on_disk(path):
    """Bytes the file `path`, or the files under it, take on tmpfs (whole 4 KiB pages)."""
    files = [os.path.join(d, n) for d, _, names in os.walk(path) for n in names] or [path]
    return sum(-(-os.path.getsize(f) // 4096) * 4096 for f in files)


@pytest.mark.parametrize("fails_in", ["model.safetensors", "train_state.pt"])
def test_a_real_full_disk_during_a_save(tiny_init, done_run, small_disk, capsys, fails_in):
    """The disk fills up in the second save (a filler file leaves room for one checkpoint and
    part of the named file of the next): one line, the first checkpoint whole, no ckpt.tmp left
    on the full disk; with space freed, --resume finishes the run."""
    ck = done_run / "ckpt"
    one = on_disk(ck)
    before = one - on_disk(ck / "train_state.pt") if fails_in == "train_state.pt" else 0
    room = one + 32 * 1024 + before + on_disk(ck / fails_in) // 2   # log, args, lock: 12 KiB
    filler = small_disk / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * (shutil.disk_usage(small_disk).free - room))
    out = small_disk / "run"
    assert_exits(main, run_args(tiny_init, out, "--steps", "8"),
                 "saving the checkpoint of step 6 failed, the last one saved is untouched: the "
                 "disk is full (no space left on device): free some space, then continue with "
                 "--resume", capsys)
    assert sorted(os.listdir(out)) == ["args.json", "ckpt", "log.jsonl"]
    assert torch.load(out / "ckpt" / "train_state.pt", weights_only=False)["step"] == 3
    os.remove(filler)
    train(parse_args(run_args(tiny_init, out, "--steps", "8", "--resume")))
    assert torch.load(out / "ckpt" / "train_state.pt", weights_only=False)["step"] == 8


def test_a_full_disk_at_the_start_leaves_no_empty_lock(tiny_init, small_disk, capsys):
    """The lock is created but its "pid host" cannot be written: it is removed again (an empty
    lock would read as another run's), and the line says to free space and run again."""
    out = small_disk / "run"
    out.mkdir()
    with open(small_disk / "filler", "wb") as f:
        f.write(b"\0" * shutil.disk_usage(small_disk).free)
    assert_exits(main, run_args(tiny_init, out, "--steps", "1"),
                 f"--out {out} cannot be written: the disk is full (no space left on device): free "
                 "some space, then run this again", capsys)
    assert os.listdir(out) == []


# -----------------------------------------------------------------------------
# Damaged files of a run: named with what to do, never a traceback; nothing changed


def damage(path, how):
    """Cut the file at `path` to half, empty it, fill it with random bytes, or (a train_state.pt)
    save something else in its place."""
    if how == "not a state":
        return torch.save({"step": 3}, path)
    data = open(path, "rb").read()
    rng = random.Random(0)
    data = {"cut short": data[:len(data) // 2], "empty": b"",
            "random bytes": bytes(rng.randrange(256) for _ in range(4096))}[how]
    open(path, "wb").write(data)


@pytest.mark.parametrize("how", ["cut short", "empty", "random bytes", "not a state"])
def test_a_damaged_train_state_is_named_on_resume_and_on_a_new_run(tiny_init, done_run, tmp_path,
                                                                   capsys, how):
    """--resume cannot continue: one line names the file and both ways on (start over, or the
    weights in a new run); a new run into that --out names it too, and --overwrite, not
    --resume. Nothing of the run changes."""
    out = copy_of(done_run, tmp_path / "run")
    damage(out / "ckpt" / "train_state.pt", how)
    before = snapshot(out)
    assert_exits(main, run_args(tiny_init, out, "--steps", "6", "--resume"),
                 f"{out}/ckpt/train_state.pt is damaged", capsys)
    assert_exits(main, run_args(tiny_init, out, "--steps", "6", "--resume"),
                 f"start it over with --overwrite, or train its weights on in a new run: --init "
                 f"{out}/ckpt --reuse-mtp --out", capsys)
    assert_exits(main, run_args(tiny_init, out, "--steps", "6"),
                 "ckpt/train_state.pt is damaged, so it cannot be resumed): start over with "
                 "--overwrite", capsys)
    assert snapshot(out) == before


def test_a_damaged_train_state_in_ckpt_old_is_named(tiny_init, done_run, tmp_path, capsys):
    """Killed between a save's two renames: ckpt.old is the checkpoint to resume."""
    out = copy_of(done_run, tmp_path / "run")
    os.replace(out / "ckpt", out / "ckpt.old")
    damage(out / "ckpt.old" / "train_state.pt", "cut short")
    assert_exits(main, run_args(tiny_init, out, "--steps", "6", "--resume"),
                 f"{out}/ckpt.old/train_state.pt is damaged", capsys)


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_damaged_weights_or_config_on_resume_are_one_line(tiny_init, done_run, tmp_path, capsys,
                                                          name):
    out = copy_of(done_run, tmp_path / "run")
    damage(out / "ckpt" / name, "cut short")
    before = snapshot(out)
    assert_exits(main, run_args(tiny_init, out, "--steps", "6", "--resume"),
                 "cannot be resumed: start it over with --overwrite", capsys)
    assert snapshot(out) == before


def test_weights_that_are_not_the_optimizer_states_are_one_line(tiny_init, done_run, tmp_path,
                                                                capsys):
    """Another model's weights over the checkpoint (the same number of tensors, other shapes):
    AdamW's load_state_dict takes them; resume refuses them, and the log keeps its records of
    steps after the checkpoint (a resume that goes on drops them)."""
    from synthetic.tokenizer import synthetic_tokenizer
    out = copy_of(done_run, tmp_path / "run")
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "loss": 1.0}) + "\n")
    other = Transformer(tiny_config(vocab=synthetic_tokenizer().n_vocab, max_seq_len=256, d_ff=40))
    other.add_mtp_token()
    save_pretrained(other, out / "ckpt")
    before = snapshot(out)
    assert_exits(main, run_args(tiny_init, out, "--steps", "6", "--resume"),
                 "train_state.pt does not fit the weights beside it", capsys)
    assert snapshot(out) == before


LOG_DAMAGE = {   # what is done to the log -> what the warning says was dropped
    "cut last line": (lambda lines: lines + ['{"step": 4, "lo'], "its last line, cut short"),
    "cut last line, binary": (lambda lines: lines + ["\udcff\udcfe"], "its last line, cut short"),
    "blank lines": (lambda lines: lines[:1] + ["", "  "] + lines[1:], "2 blank lines"),
    "a record without a step": (lambda lines: lines[:1] + ['{"note": "mine"}'] + lines[1:],
                                "1 record without a step (line 2)"),
}


@pytest.mark.parametrize("how", LOG_DAMAGE)
def test_a_resume_drops_what_a_log_cannot_keep_and_says_so(tiny_init, done_run, tmp_path, capsys,
                                                           how):
    out = copy_of(done_run, tmp_path / "run")
    hurt, said = LOG_DAMAGE[how]
    good = open(out / "log.jsonl").read().splitlines()
    text = "\n".join(hurt(good)) + ("" if how.startswith("cut") else "\n")
    (out / "log.jsonl").write_bytes(text.encode("utf-8", "surrogateescape"))
    train(parse_args(run_args(tiny_init, out, "--steps", "4", "--resume", "--log-every", "1")))
    warnings = [w for w in capsys.readouterr().err.splitlines() if "log.jsonl" in w]
    assert len(warnings) == 1 and f"log.jsonl: dropped {said}" in warnings[0], warnings
    assert f"the {len(good)} records up to step 3 are kept" in warnings[0]
    recs = strict_json(out / "log.jsonl")
    assert recs[:len(good)] == [json.loads(line) for line in good]
    assert [r["step"] for r in recs[len(good):]] == [4, 4]          # its log line and its save


def test_a_log_line_that_is_not_json_before_the_last_is_named(tiny_init, done_run, tmp_path,
                                                                capsys):
    out = copy_of(done_run, tmp_path / "run")
    lines = open(out / "log.jsonl").read().splitlines()
    (out / "log.jsonl").write_text("\n".join(lines[:1] + ["oops"] + lines[1:]) + "\n")
    before = snapshot(out)
    assert_exits(main, run_args(tiny_init, out, "--steps", "6", "--resume"),
                 "log.jsonl:2 is not a JSON record, so --resume cannot tell which steps it "
                 "logged: delete or correct that line", capsys)
    assert snapshot(out) == before                    # args.json too


@pytest.mark.parametrize("content", [b"", b"garbage", b"\xff\xfe\x00", b"12 host extra"])
def test_a_lock_that_names_no_run_is_one_line(tiny_init, tmp_path, capsys, content):
    out = tmp_path / "run"
    out.mkdir()
    (out / "lock").write_bytes(content)
    assert_exits(main, run_args(tiny_init, out, "--steps", "1"), f"{out}/lock names no run",
                 capsys)
    assert os.listdir(out) == ["lock"]


# -----------------------------------------------------------------------------
# A run that stopped before its first checkpoint, and the results beside a run


def test_a_run_killed_before_its_first_save_leads_to_overwrite_not_round_in_a_loop(
        tiny_init, tmp_path, capsys, monkeypatch):
    """--resume: no checkpoint, so start over with --overwrite; a new run: the same, never
    "continue it with --resume"; then --overwrite runs."""
    class Killed(Exception):
        pass

    def killed(*a, **kw):
        raise Killed
    monkeypatch.setattr(distill, "save_run", killed)
    out = tmp_path / "run"
    with pytest.raises(Killed):
        train(parse_args(run_args(tiny_init, out, "--steps", "8")))
    monkeypatch.undo()
    assert_exits(main, run_args(tiny_init, out, "--steps", "8", "--resume"),
                 f"the run in {out} saved no checkpoint (it holds log.jsonl, args.json), so it "
                 "cannot be resumed: start it over with --overwrite", capsys)
    with pytest.raises(SystemExit):
        main(run_args(tiny_init, out, "--steps", "8"))
    err = capsys.readouterr().err
    assert "no checkpoint was saved, so it cannot be resumed): start over with --overwrite" in err
    assert "--resume" not in err
    train(parse_args(run_args(tiny_init, out, "--steps", "1", "--overwrite")))


def test_a_checkpoint_without_its_train_state_names_what_can_be_done(tiny_init, done_run, tmp_path,
                                                                     capsys):
    out = copy_of(done_run, tmp_path / "run")
    os.remove(out / "ckpt" / "train_state.pt")
    assert_exits(main, run_args(tiny_init, out, "--steps", "6", "--resume"),
                 f"{out}/ckpt has no train_state.pt, so it cannot be resumed; start it over with "
                 f"--overwrite, or train its weights on in a new run: --init {out}/ckpt", capsys)
    assert_exits(main, run_args(tiny_init, tmp_path / "nothing", "--resume"),
                 "nor anything else of a run; start a new run without --resume", capsys)


BENCH = ["bench_synthetic.md", "bench_synthetic.json", "bench_synthetic.png", "bench_x.jsonl.md"]


def test_overwrite_clears_the_old_runs_bench_results_too(tiny_init, done_run, tmp_path, capsys):
    out = copy_of(done_run, tmp_path / "run")
    for name in BENCH + ["notes.txt"]:
        (out / name).write_text("old")
    assert_exits(main, run_args(tiny_init, out, "--steps", "1"),
                 "bench_synthetic.json, bench_synthetic.md, bench_synthetic.png, bench_x.jsonl.md; "
                 "checkpoint at step 3", capsys)
    train(parse_args(run_args(tiny_init, out, "--steps", "1", "--overwrite")))
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("--overwrite")]
    assert said == [f"--overwrite: removed ckpt, log.jsonl, args.json, {', '.join(sorted(BENCH))} "
                    f"of the earlier run in {out}"]
    assert sorted(os.listdir(out)) == ["args.json", "ckpt", "log.jsonl", "notes.txt"]
    (out / "bench_synthetic.md").write_text("old")                # results alone are a trace too
    shutil.rmtree(out / "ckpt")
    os.remove(out / "log.jsonl")
    os.remove(out / "args.json")
    assert_exits(main, run_args(tiny_init, out, "--steps", "1"),
                 "already holds a run (bench_synthetic.md; no checkpoint was saved", capsys)


# -----------------------------------------------------------------------------
# Ctrl-C: one line, exit code 130, the last checkpoint kept, the lock released


def exit_code(args):
    """main(args)'s exit code; a Ctrl-C that escapes it fails the test (and not the whole run)."""
    try:
        main(args)
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped main")
    except SystemExit as e:
        return e.code
    return 0


def test_ctrl_c_in_the_loop_is_one_line_and_keeps_the_last_checkpoint(tiny_init, tmp_path,
                                                                      monkeypatch, capsys):
    steps, train_step = [], distill.train_step

    def ctrl_c_in_step_5(*a, **kw):
        steps.append(1)
        if len(steps) == 5:
            raise KeyboardInterrupt
        return train_step(*a, **kw)
    monkeypatch.setattr(distill, "train_step", ctrl_c_in_step_5)
    out = tmp_path / "run"
    assert exit_code(run_args(tiny_init, out, "--steps", "8")) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if not line.startswith("warning")] == [f"stopped (Ctrl-C) after 4 of 8 steps; {out}/ckpt keeps step 3: "
                                "continue it with --resume"]
    assert sorted(os.listdir(out)) == ["args.json", "ckpt", "log.jsonl"]      # no lock
    monkeypatch.undo()
    train(parse_args(run_args(tiny_init, out, "--steps", "8", "--resume")))


def test_ctrl_c_in_a_save_removes_the_half_checkpoint(tiny_init, tmp_path, monkeypatch, capsys):
    out, saves, save = tmp_path / "run", [], torch.save

    def ctrl_c_in_the_second_save(obj, path, *a, **kw):
        saves.append(path)
        if len(saves) == 2:
            raise KeyboardInterrupt
        return save(obj, path, *a, **kw)
    monkeypatch.setattr(run_dir.torch, "save", ctrl_c_in_the_second_save)
    assert exit_code(run_args(tiny_init, out, "--steps", "8")) == 130
    assert f"stopped (Ctrl-C) after 6 of 8 steps; {out}/ckpt keeps step 3" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["args.json", "ckpt", "log.jsonl"]      # no ckpt.tmp


def test_ctrl_c_before_the_first_save_and_while_loading(tiny_init, tmp_path, monkeypatch, capsys):
    def ctrl_c(*a, **kw):
        raise KeyboardInterrupt
    out = tmp_path / "run"
    monkeypatch.setattr(distill, "load_models", ctrl_c)
    assert exit_code(run_args(tiny_init, out, "--steps", "8")) == 130 and not out.exists()
    assert capsys.readouterr().err == f"stopped (Ctrl-C) before its first step: nothing was " \
                                      f"written in {out}\n"
    monkeypatch.undo()
    monkeypatch.setattr(distill, "train_step", ctrl_c)
    assert exit_code(run_args(tiny_init, out, "--steps", "8")) == 130
    assert "after 0 of 8 steps; no checkpoint was saved yet: start it over with --overwrite" in \
        capsys.readouterr().err


def test_ctrl_c_from_the_terminal(tiny_init, tmp_path):
    """A real SIGINT to a running distill.py: exit code 130, one line, no traceback."""
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(distill.__file__), "distill.py"),
                          *run_args(tiny_init, out, "--steps", "100000")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         # a terminal's Ctrl-C reaches it even where the suite runs as a background
                         # job (which starts with SIGINT ignored, and Python then keeps it ignored)
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in p.stdout:                 # the second log line: a checkpoint at step 3 is saved
            if line.startswith("step 4/"):
                break
        p.send_signal(signal.SIGINT)
        err = p.communicate(timeout=60)[1]
    finally:
        p.kill()
    assert p.returncode == 130, err
    lines = [line for line in err.splitlines() if not line.startswith("warning")]
    assert len(lines) == 1 and lines[0].startswith("stopped (Ctrl-C) after ") and \
        "keeps step" in lines[0] and lines[0].endswith("continue it with --resume"), err
    assert not (out / "lock").exists()


# -----------------------------------------------------------------------------
# A resume that changes the lr schedule says so


def test_a_resume_with_more_steps_says_how_the_lr_schedule_changes(tiny_init, done_run, tmp_path,
                                                                   capsys):
    """done_run ran 3 steps, all cool-down (fitted: 0 + 3); --steps 6 fits a 6-step cool-down,
    so steps 4-6 run at the lr of that one. The warning says so, and the log shows it."""
    out = copy_of(done_run, tmp_path / "run")
    capsys.readouterr()
    train(parse_args(run_args(tiny_init, out, "--steps", "6", "--resume", "--log-every", "1")))
    warnings = [w for w in capsys.readouterr().err.splitlines() if "changes the lr" in w]
    assert warnings == ["warning: --steps 3 -> 6 on --resume changes the lr of the steps still to "
                        "run (4-6): its cool-down now covers steps 1-6 (was 1-3)"]
    lrs = [r["lr"] for r in strict_json(out / "log.jsonl") if "loss" in r and r["step"] > 3]
    peak = distill.TrainConfig().lr
    assert lrs == pytest.approx([distill.lr_at(s, peak, 0, 6, 6) for s in (3, 4, 5)])


def test_schedule_change_is_said_only_where_the_lr_changes():
    def change(steps, saved, step=3, warmup=50, cooldown=400):
        fit = lambda total: (total, *distill.fit_schedule(warmup, cooldown, total))
        return run_dir.schedule_change(step, fit(saved), fit(steps))
    assert change(10, 10) is None                                   # the same length
    assert change(20, 10, warmup=2, cooldown=0) is None             # constant after its warm-up
    assert change(20, 10, step=10, warmup=2, cooldown=0) is None
    assert change(10, 20, step=12) is None                          # nothing left to run
    assert change(2000, 1000) == ("--steps 1000 -> 2000 on --resume changes the lr of the steps "
                                  "still to run (4-2000): its cool-down now covers steps "
                                  "1601-2000 (was 601-1000)")
    assert change(20, 10, warmup=15, cooldown=0).endswith("its warm-up is 15 steps (was 10)")
