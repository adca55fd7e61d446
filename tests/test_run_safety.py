"""distill.py and training/run_dir.py keep a run safe: its --out is never touched unasked (and --overwrite clears it only
once everything has loaded), one run at a time uses it, --resume continues exactly or refuses,
a diverged run stops with its last good checkpoint, every bad option is one line, a full disk
too, and a resumed run does not keep the previous train_state.pt open."""
import errno
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

import distill
from conftest import assert_exits, tiny_config
from distill import main, optimizer_update, parse_args, train
from model import Transformer
from compat.hf import from_pretrained, save_pretrained
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


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_last_checkpoint(tiny_init, tmp_path,
                                                                             monkeypatch, capsys):
    out, saves, save = tmp_path / "run", [], torch.save

    def full_disk_at_the_second_save(obj, path, *a, **kw):
        saves.append(path)
        if len(saves) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return save(obj, path, *a, **kw)
    monkeypatch.setattr(run_dir.torch, "save", full_disk_at_the_second_save)
    assert_exits(main, run_args(tiny_init, out, "--steps", "8"), "the disk is full", capsys)
    monkeypatch.undo()
    assert torch.load(out / "ckpt" / "train_state.pt", weights_only=False)["step"] == 3
    assert sorted(os.listdir(out)) == ["args.json", "ckpt", "log.jsonl"]    # no ckpt.tmp, no lock
