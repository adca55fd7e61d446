"""distill.py: the losses against naive loops, exact resume, DDP, and bad-input messages."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import assert_exits, ROOT, tiny_config
import distill
from training import samples
from distill import TrainConfig, fit_schedule, hard_ce, lr_at, main, parse_args, soft_kl, train
from model import Transformer
from compat.hf import from_pretrained, save_pretrained
from training import run_dir
from training.run_dir import plan_steps


def test_hard_ce_equals_naive_loop():
    logits, target = torch.randn(7, 11), torch.randint(0, 11, (7,))
    weight = torch.tensor([1, 0, 1, 1, 0, 1, 1.0])
    naive = [-torch.log(torch.softmax(logits[i], 0)[target[i]]) for i in range(7) if weight[i]]
    torch.testing.assert_close(hard_ce(logits, target, weight), torch.stack(naive).mean())


def test_soft_kl_equals_naive_loop():
    logits, t_logits = torch.randn(6, 9), torch.randn(6, 9) * 2
    t = torch.softmax(t_logits, -1)
    t[2] = torch.nn.functional.one_hot(torch.tensor(4), 9).float()    # zeros in the teacher too
    weight = torch.tensor([1, 1, 1, 0, 1, 1.0])
    naive = []
    for i in range(6):
        if weight[i]:
            s = torch.softmax(logits[i], 0)
            naive.append(sum(t[i, v] * torch.log(t[i, v] / s[v]) for v in range(9) if t[i, v] > 0))
    torch.testing.assert_close(soft_kl(logits, t, weight), torch.stack(naive).mean())
    assert soft_kl(t_logits, torch.softmax(t_logits, -1), weight).abs() < 1e-6   # KL(p||p) = 0


def test_lr_schedule():
    lr = lambda step, cooldown: lr_at(step, 1e-3, 10, cooldown, 100)
    assert lr(0, 0) == pytest.approx(1e-4) and lr(9, 0) == pytest.approx(1e-3)
    assert lr(99, 0) == pytest.approx(1e-3)                           # constant after warm-up
    assert lr(49, 50) == pytest.approx(1e-3) and lr(75, 50) == pytest.approx(0.5e-3)
    assert lr(20, 400) == pytest.approx(1e-3 * 80 / 400)              # longer than the run


def test_a_schedule_longer_than_the_run_is_fitted_into_it():
    """fit_schedule: a run at least as long as its warm-up + cool-down keeps them (the default
    run's lr at every step as before); a shorter one gets both scaled down to fill it."""
    for total in (450, 800, 5000):
        assert fit_schedule(50, 400, total) == (50, 400)
    cfg = TrainConfig()
    assert fit_schedule(cfg.warmup, cfg.cooldown, cfg.steps) == (cfg.warmup, cfg.cooldown)
    assert fit_schedule(50, 400, 3) == (0, 3) and fit_schedule(50, 400, 90) == (10, 80)
    assert fit_schedule(50, 0, 20) == (20, 0) and fit_schedule(0, 400, 20) == (0, 20)
    for total in range(1, 450):
        warmup, cooldown = fit_schedule(50, 400, total)
        assert warmup + cooldown == total
        assert min(lr_at(s, 1.0, warmup, cooldown, total) for s in range(total)) >= 1 / total


def test_a_short_run_trains_at_a_real_learning_rate(tiny_init, tmp_path, capsys):
    """--steps 3 with the default warm-up 50 and cool-down 400: the run says so in one line and
    trains at lr peak, 2/3 and 1/3 of it (unfitted: peak * 1/50 * 3/400 and less)."""
    out = tmp_path / "run"
    train(parse_args(run_args(tiny_init, out, "--steps", "3", "--log-every", "1")))
    said = [line for line in capsys.readouterr().out.splitlines() if "shorter than" in line]
    assert said == ["--steps 3 is shorter than --warmup 50 + --cooldown 400: warm-up 0 and "
                    "cool-down 3 steps instead"]
    lrs = [r["lr"] for r in map(json.loads, open(out / "log.jsonl")) if "loss" in r]
    peak = TrainConfig().lr
    assert lrs == pytest.approx([peak, peak * 2 / 3, peak / 3])


def run_args(init, out, *extra):
    return ["--init", init, "--out", str(out), "--k", "4", "--seq-len", "64", "--micro-batch", "4",
            "--step-tokens", "512", "--log-every", "2", "--save-every", "3", "--threads", "1", *extra]


def weights(path):
    return from_pretrained(path).state_dict()


@pytest.mark.parametrize("mode", [[], ["--teacher", "soft"], ["--targets", "data", "--fixed-k"],
                                  ["--recipe", "paper"]])
def test_training_modes_run_and_log(tiny_init, tmp_path, mode):
    train(parse_args(run_args(tiny_init, tmp_path, "--steps", "4", *mode)))
    recs = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    logs = [r for r in recs if "loss" in r]
    assert [r["step"] for r in logs] == [2, 4]
    assert all(len(r["agree"]) == 4 and r["sup_tok_per_s"] > 0 for r in logs)
    m = from_pretrained(str(tmp_path / "ckpt"))
    assert m.cfg.mtp_token_id == 512 and m.cfg.mtp_k_max == 4
    assert os.path.isfile(tmp_path / "ckpt" / "tokenizer.tiktoken")


def test_resume_is_exact(tiny_init, tmp_path):
    """N steps, then resume for N more == 2N steps in one go (same weights, bit for bit).
    Constant lr after a warm-up both halves hold: with a cool-down (or a warm-up longer than the
    run, fit_schedule) the schedule depends on --steps, so the first half would be a different
    (shorter) run."""
    flat = ("--warmup", "2", "--cooldown", "0")
    train(parse_args(run_args(tiny_init, tmp_path / "once", "--steps", "6", *flat)))
    train(parse_args(run_args(tiny_init, tmp_path / "twice", "--steps", "3", *flat)))
    train(parse_args(run_args(tiny_init, tmp_path / "twice", "--steps", "6", "--resume", *flat)))
    a, b = weights(str(tmp_path / "once" / "ckpt")), weights(str(tmp_path / "twice" / "ckpt"))
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # and it did train: the student moved away from the init
    init = weights(tiny_init)
    assert not torch.equal(a["blocks.0.attn.qkv.weight"], init["blocks.0.attn.qkv.weight"])


def test_a_killed_short_run_resumes_into_the_same_fitted_schedule(tiny_init, tmp_path, monkeypatch):
    """--steps 6 under the default warm-up and cool-down (fitted: 0 + 6), killed right after its
    step-3 checkpoint and resumed == the same 6 steps in one go: the same lr at every step, the
    same weights bit for bit (the fit is a function of the saved settings alone)."""
    class Killed(Exception):
        pass
    save_run = distill.save_run

    def save_then_die(*a, **kw):
        save_run(*a, **kw)
        raise Killed
    train(parse_args(run_args(tiny_init, tmp_path / "once", "--steps", "6")))
    monkeypatch.setattr(distill, "save_run", save_then_die)
    with pytest.raises(Killed):
        train(parse_args(run_args(tiny_init, tmp_path / "twice", "--steps", "6")))
    monkeypatch.undo()
    train(parse_args(run_args(tiny_init, tmp_path / "twice", "--steps", "6", "--resume")))
    a, b = weights(str(tmp_path / "once" / "ckpt")), weights(str(tmp_path / "twice" / "ckpt"))
    for name in a:
        assert torch.equal(a[name], b[name]), name
    lrs = [[r["lr"] for r in map(json.loads, open(tmp_path / run / "log.jsonl")) if "loss" in r]
           for run in ("once", "twice")]
    peak = TrainConfig().lr                 # each record: its interval's last step (2, 4, 6)
    assert lrs[0] == lrs[1] == pytest.approx([peak * 5 / 6, peak * 3 / 6, peak / 6])


def test_plan_steps():
    # 10 steps took 30 s of a 2-minute budget: 90 s left at 3 s a step is 30 more
    assert plan_steps(10, 30.0, 2, 1000, 0, 0) == 40
    assert plan_steps(10, 30.0, 2, 25, 0, 0) == 25        # never past the --steps given
    assert plan_steps(10, 150.0, 2, 1000, 0, 0) == 10     # over budget already: stop now
    assert plan_steps(10, 150.0, 2, 1000, 0, 5) == 15     # ... after a whole cool-down
    assert plan_steps(10, 150.0, 2, 1000, 30, 5) == 35    # ... after a whole warm-up and cool-down


@pytest.mark.parametrize("done,loop_s,minutes,cooldown", [(10, 30.0, 2, 20), (10, 150.0, 2, 20),
                                                          (20, 1.0, 60, 400), (5, 9.0, 0.1, 3)])
def test_a_plan_leaves_the_lr_of_the_steps_done_as_it_was(done, loop_s, minutes, cooldown):
    """The steps before the plan ran at lr_at(..., total=--steps); the planned total must give
    them the same lr, and the cool-down its full length (the lr never jumps)."""
    cap = 1000
    total = plan_steps(done, loop_s, minutes, cap, 3, cooldown)
    assert total - done >= cooldown and fit_schedule(3, cooldown, total) == (3, cooldown)
    for step in range(done):
        assert lr_at(step, 1.0, 3, cooldown, total) == lr_at(step, 1.0, 3, cooldown, cap)
    if cooldown:
        assert lr_at(total - 1, 1.0, 3, cooldown, total) == pytest.approx(1 / cooldown)


def test_resuming_a_minutes_run_needs_its_plan(tiny_init, tmp_path, capsys):
    out = tmp_path / "run"
    train(parse_args(run_args(tiny_init, out, "--steps", "8", "--minutes", "100", "--cooldown", "2",
                              "--warmup", "1", "--log-every", "2", "--save-every", "4")))
    planned = json.load(open(out / "args.json"))
    assert planned["minutes"] == 100 and planned["steps"] == planned["planned_steps"] == 8
    assert_exits(main, run_args(tiny_init, out, "--steps", "100", "--resume"), "--steps 8 --cooldown 2",
                 capsys)


@pytest.mark.parametrize("minutes,cooldown", [(0.5, 4), (0.5, 0), (1e-4, 4), (1e-4, 0)])
def test_minutes_plans_the_length_once(tiny_init, tmp_path, monkeypatch, minutes, cooldown):
    """--minutes with a clock that advances 1 s per reading: the run plans its length once,
    after its first --log-every steps, runs to the plan with its cool-down whole, and ends there
    with a log line and a checkpoint. Over budget already at the plan (1e-4 minutes), it ends
    after one cool-down. Every logged lr is the schedule's with the planned length."""
    clock = iter(range(10**6))
    monkeypatch.setattr(distill.time, "perf_counter", lambda: float(next(clock)))
    out = tmp_path / "run"
    train(parse_args(run_args(tiny_init, out, "--steps", "1000", "--minutes", str(minutes),
                              "--cooldown", str(cooldown), "--warmup", "1", "--save-every", "1000")))
    recs = [json.loads(line) for line in open(out / "log.jsonl")]
    plans = [r for r in recs if "planned_steps" in r]
    assert len(plans) == 1 and plans[0]["step"] == 2            # once, at the first log line
    final = plans[0]["planned_steps"]
    if minutes < 0.01:
        assert final == 2 + cooldown
    else:
        assert 2 + cooldown <= final < 1000 and final > 4
    state = torch.load(out / "ckpt" / "train_state.pt", weights_only=False)
    assert state["step"] == final and state["args"]["planned_steps"] == final
    args = json.load(open(out / "args.json"))
    assert args["planned_steps"] == final and args["steps"] == 1000
    losses = [r for r in recs if "loss" in r]
    assert losses[-1]["step"] == final
    for r in losses:
        assert r["lr"] == pytest.approx(lr_at(r["step"] - 1, TrainConfig().lr, 1, cooldown, final))


def test_a_new_run_never_mixes_with_an_old_one_in_the_same_out(tiny_init, tmp_path, capsys):
    out = tmp_path / "run"
    train(parse_args(run_args(tiny_init, out, "--steps", "4")))
    assert_exits(main, run_args(tiny_init, out, "--steps", "2"), "already holds a run", capsys)
    train(parse_args(run_args(tiny_init, out, "--steps", "2", "--overwrite")))
    steps = [json.loads(line)["step"] for line in open(out / "log.jsonl")]
    assert max(steps) == 2                   # the 4-step run's records are gone with its checkpoint
    assert torch.load(out / "ckpt" / "train_state.pt", weights_only=False)["step"] == 2


def test_ddp_two_processes_keep_identical_weights(tiny_init, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", "29533", os.path.join(ROOT, "distill.py"),
           *run_args(tiny_init, tmp_path, "--steps", "3")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    saves = [json.loads(line) for line in open(tmp_path / "log.jsonl") if "saved" in line]
    assert saves and all(s["ranks_identical"] and s["world"] == 2 for s in saves)


def test_bad_input_messages(tiny_init, tmp_path, capsys):
    def fails(args, message):
        assert_exits(main, args, message, capsys)

    fails(run_args(str(tmp_path / "nowhere"), tmp_path / "o1"), "neither a checkpoint directory")
    fails(run_args(tiny_init, tmp_path / "o2", "--k", "1"), "must be >= 2")
    fails(run_args(tiny_init, tmp_path / "o3", "--seq-len", "12", "--regions", "4"), "too short")
    fails(run_args(tiny_init, tmp_path / "o4", "--resume"), "no checkpoint in")
    fails(run_args(tiny_init, tmp_path / "o4b", "--precision", "fp16"), "--precision must be auto or fp32")
    fails(run_args(tiny_init, tmp_path / "o4c", "--minutes", "-1"), "--minutes must be >= 0")
    fails(run_args(tiny_init, tmp_path / "o4d", "--minutes", "1", "--resume"), "the first run planned")
    fails(run_args(tiny_init, tmp_path / "o4e", "--minutes", "1", "--steps", "100", "--cooldown", "99"),
          "would start before that in --steps 100")
    fails(run_args(tiny_init, tmp_path / "o4f", "--minutes", "1", "--steps", "100", "--warmup", "60",
                   "--cooldown", "50"), "--minutes needs --steps 100 to hold --warmup 60 + --cooldown 50")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for name in os.listdir(tiny_init):
        (corrupt / name).write_bytes(open(os.path.join(tiny_init, name), "rb").read())
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 100)
    fails(run_args(str(corrupt), tmp_path / "o5"), "cannot read")
    # an init that already is an MTP checkpoint
    train(parse_args(run_args(tiny_init, tmp_path / "mtp", "--steps", "1")))
    fails(run_args(str(tmp_path / "mtp" / "ckpt"), tmp_path / "o6"), "already has an <MTP> token")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    fails(run_args(tiny_init, tmp_path / "o7", "--data", str(empty)), "has no usable rows")


def test_embedded_teacher_is_its_recipe_and_solves_held_out_problems(tmp_path):
    """The committed teacher was made by synthetic.teacher.TEACHER_RECIPE: its args.json holds
    every setting the recipe gives today (how the command was run aside) and its log names no
    path outside the recipe's --out; it solves at least 90% (greedy k=1, through bench.py, on
    the first 50 of the 200 held-out problems)."""
    from dataclasses import asdict
    import bench
    from synthetic.teacher import DEFAULT_TEACHER, TEACHER_RECIPE
    with open(os.path.join(DEFAULT_TEACHER, "args.json")) as f:
        made_with = json.load(f)
    recipe = asdict(parse_args(TEACHER_RECIPE))
    recipe["planned_steps"] = recipe["steps"]
    how_run = ("out", "resume", "overwrite")
    assert {k: v for k, v in made_with.items() if k not in how_run} == \
           {k: v for k, v in recipe.items() if k not in how_run}
    assert made_with["out"] == os.path.relpath(recipe["out"], ROOT)      # no machine's own path
    for rec in map(json.loads, open(os.path.join(DEFAULT_TEACHER, "log.jsonl"))):
        for path in (v for v in rec.values() if isinstance(v, str)):
            assert not os.path.isabs(path), path
            assert run_dir.lies_inside(os.path.join(ROOT, path), recipe["out"]), path
    bench.main(["--ckpt", DEFAULT_TEACHER, "--data", "synthetic", "--limit", "50", "--static", "1",
                "--taus", "", "--out", str(tmp_path / "teacher")])
    (k1,) = json.load(open(tmp_path / "teacher.json"))["results"]
    assert k1["strategy"] == "static k=1" and k1["acc"] >= 0.9, k1["acc"]


# -----------------------------------------------------------------------------
# Pieces of the method tested directly, not only through a run's figures


def test_draw_k_offset_draws_every_k_in_2_to_k_max_and_nothing_else():
    """Each step's k is uniform over [2, k_max] (--fixed-k: k_max only), its offset over one
    region stride [0, seq_len // regions)."""
    import random
    cfg = parse_args(["--k", "5", "--seq-len", "40", "--regions", "4"])
    rng = random.Random(0)
    draws = [distill.draw_k_offset(rng, cfg) for _ in range(2000)]
    assert {k for k, _ in draws} == {2, 3, 4, 5}
    assert {o for _, o in draws} == set(range(10))
    counts = [sum(k == j for k, _ in draws) for j in (2, 3, 4, 5)]
    assert min(counts) > 400                          # uniform: ~500 each
    cfg.fixed_k = True
    assert {distill.draw_k_offset(rng, cfg)[0] for _ in range(200)} == {5}


def test_the_mtp_row_is_trained_by_the_shared_optimizer_step(tmp_path):
    """One step of train() at lr 1e-2 (warm-up 1): AdamW's first step moves every weight with a
    gradient by ~lr, the <MTP> rows of the input embedding and of the (untied) lm_head among
    them; weight decay alone would move them by ~lr * 0.01 * |w|. So does every other tensor."""
    from synthetic.tokenizer import synthetic_tokenizer
    init, out = tmp_path / "init", tmp_path / "run"
    tok = synthetic_tokenizer()
    torch.manual_seed(0)
    save_pretrained(Transformer(tiny_config(vocab=tok.n_vocab, max_seq_len=256, tie=False)), init)
    tok.save(init)
    lr = 1e-2
    train(parse_args(run_args(str(init), out, "--steps", "1", "--lr", str(lr), "--warmup", "1",
                              "--cooldown", "0")))
    before = from_pretrained(str(init))
    mtp = before.add_mtp_token(seed=0)                # the row train() drew (seed 0)
    after = from_pretrained(str(out / "ckpt"))
    assert after.cfg.mtp_token_id == mtp
    for name in ("embed.weight", "lm_head.weight"):
        moved = (after.state_dict()[name][mtp] - before.state_dict()[name][mtp]).abs()
        assert moved.median() > 0.5 * lr, (name, moved.median())
    for name, p in after.named_parameters():
        moved = (p - before.state_dict()[name]).abs().max()
        assert moved > 0.5 * lr, (name, moved)


def test_stream_is_a_seeded_permutation_per_epoch_and_resumes_at_pos():
    s = samples.Stream(7, seed=3)
    first, second = s.take(7), s.take(7)
    assert sorted(first) == sorted(second) == list(range(7)) and first != second
    assert first == torch.randperm(7, generator=torch.Generator().manual_seed(3)).tolist()
    again = samples.Stream(7, seed=3)
    assert again.take(5) + again.take(9) == first + second       # across the epoch boundary
    assert samples.Stream(7, seed=3, pos=10).take(4) == (first + second)[10:14]


def test_ntp_step_is_next_token_cross_entropy_up_to_each_rows_end():
    """--pretrain's loss against a naive per-row loop: a mean over every next-token prediction
    of every row (its padding never), the rows of different lengths."""
    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab=20))
    rows, eos = [[3, 4, 5, 6, 1], [7, 8, 1]], 1
    loss, st = distill.ntp_step(model, rows, eos, torch.device("cpu"), denom=None)
    naive = []
    for r in rows:
        logits = model(torch.tensor([r[:-1]]))[0]
        naive += [-torch.log_softmax(logits[i], -1)[r[i + 1]] for i in range(len(r) - 1)]
    torch.testing.assert_close(loss, torch.stack(naive).mean())
    assert st["tokens"] == 6


def test_truncate_log_forgets_only_the_records_after_the_checkpoint(tmp_path):
    log = tmp_path / "log.jsonl"
    recs = [{"step": 2, "loss": 1.0}, {"step": 3, "saved": "ckpt"}, {"step": 4, "loss": 0.9},
            {"step": 6, "saved": "ckpt"}]
    log.write_text("".join(json.dumps(r) + "\n" for r in recs))
    run_dir.truncate_log(str(log), 3)
    assert [json.loads(line) for line in open(log)] == recs[:2]


def test_sorted_stream_draws_each_steps_samples_at_random_then_sorts_them_by_length():
    """--batching sorted: a step (a run of `group` samples) holds exactly the samples the plain
    seeded permutation gives it, in order of length, and the stream still resumes at pos."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 12, (50,), generator=g).tolist()
    plain = samples.Stream(50, seed=1)
    s = samples.Stream(50, seed=1, lengths=lengths, group=8)
    first, second = s.take(50), s.take(50)
    assert sorted(first) == sorted(second) == list(range(50)) and first != second
    for ours, theirs in ((first, plain.take(50)), (second, plain.take(50))):
        for start in range(0, 50, 8):
            step = ours[start:start + 8]
            assert sorted(step) == sorted(theirs[start:start + 8])
            assert [lengths[i] for i in step] == sorted(lengths[i] for i in step)
    again = samples.Stream(50, seed=1, pos=37, lengths=lengths, group=8)
    assert again.take(20) == (first + second)[37:57]


def short_rows(cfg, tok, n, longest):
    seqs, starts = distill.load_samples(cfg, tok)
    keep = [i for i in range(len(seqs)) if len(seqs[i]) <= longest][:n]
    return [seqs[i] for i in keep], starts and [starts[i] for i in keep]


@pytest.mark.parametrize("supervise", ["answer", "all"])
def test_a_short_batch_trains_exactly_what_a_full_length_one_does(tiny_init, tmp_path, supervise):
    """batch_shape cuts a batch of short rows to whole region strides past its longest row: the
    same supervised positions, the same summed loss and statistics as at full --seq-len, with
    none of the padding computed."""
    cfg = parse_args(run_args(tiny_init, tmp_path, "--seq-len", "160", "--supervise", supervise))
    student, teacher, tok = distill.load_models(cfg, torch.device("cpu"))
    rows, starts = short_rows(cfg, tok, 3, 90)
    n, m = distill.batch_shape(cfg, rows)
    stride = cfg.seq_len // distill.n_regions(cfg)
    assert max(map(len, rows)) <= n < max(map(len, rows)) + stride and n % stride == 0
    mtp = student.cfg.mtp_token_id
    answer = starts if supervise == "answer" else None
    for k, offset in [(4, 0), (3, 5), (2, 7)]:
        short = distill.pack(rows, k, offset, m, n, mtp, tok.eos_id, answer)
        full = distill.pack(rows, k, offset, distill.n_regions(cfg), cfg.seq_len, mtp, tok.eos_id,
                            answer)
        assert short.idx.size(1) < full.idx.size(1)
        got, st = distill.mtp_step(student, teacher, short, cfg, mtp, tok.eos_id, denom=1.0)
        want, st_full = distill.mtp_step(student, teacher, full, cfg, mtp, tok.eos_id, denom=1.0)
        torch.testing.assert_close(got, want)
        for name in ("agree", "count", "tokens"):
            torch.testing.assert_close(st[name], st_full[name])
    assert distill.batch_shape(parse_args(run_args(tiny_init, tmp_path, "--batching", "random")),
                               rows) == (64, 8)


def test_answer_supervision_keeps_exactly_the_regions_whose_targets_are_the_answer(tiny_init):
    """--supervise answer against a naive check: a region stays if it is there at all (before the
    row's EOS) and its prefix ends at the prompt's last token or later; answer_start is where the
    prompt's own tokens end."""
    from data import answer_start, plain_prompt, region_ends, sample_ids
    from compat.tokenizers import load_tokenizer
    from synthetic.problems import synthetic_problems
    tok = load_tokenizer(tiny_init)
    probs = synthetic_problems(4, seed=3)
    rows = [sample_ids(tok, r) for r in probs]
    starts = [answer_start(tok, r, s) for r, s in zip(probs, rows)]
    for r, s, a in zip(probs, rows, starts):
        assert tok.decode(s[:a]) == plain_prompt(r["question"])
        assert tok.decode(s[a:]).startswith(" " + r["answer"][:10])
    for offset in range(8):         # every offset: some region ends at the prompt's last token
        ends = region_ends(160, 20, offset)
        every = distill.pack(rows, 4, offset, 20, 160, 600, tok.eos_id)
        answer = distill.pack(rows, 4, offset, 20, 160, 600, tok.eos_id, starts)
        want = [[bool(every.valid[b, r]) and ends[r] >= starts[b] - 1 for r in range(20)]
                for b in range(4)]
        assert answer.valid.tolist() == want
        assert 0 < answer.valid.sum() < every.valid.sum()


def test_recipes_set_defaults_and_a_flag_beside_one_still_wins(tiny_init, tmp_path, capsys):
    paper = parse_args(["--recipe", "paper"])
    assert all(getattr(paper, name) == v for name, v in distill.RECIPES["paper"].items())
    assert parse_args([]) == TrainConfig()                  # the default recipe: the dataclass
    mixed = parse_args(["--recipe", "paper", "--lr", "1e-3", "--fixed-k"])
    assert (mixed.lr, mixed.fixed_k, mixed.supervise) == (1e-3, True, "all")
    assert parse_args(["--no-prefix-loss"]).prefix_loss is False
    assert_exits(main, run_args(tiny_init, tmp_path / "r", "--recipe", "fast"), "--recipe must be one of",
                 capsys)


def test_resuming_a_checkpoint_from_before_the_recipes_compares_what_it_did(tiny_init, tmp_path, capsys):
    """A checkpoint whose args lack recipe/supervise/batching was trained as the paper recipe
    trains (BEFORE_SAVED): resuming it with the paper recipe continues, with the default
    recipe it is refused, naming each change."""
    out = tmp_path / "old"
    train(parse_args(run_args(tiny_init, out, "--steps", "2", "--recipe", "paper")))
    path = out / "ckpt" / "train_state.pt"
    state = torch.load(path, weights_only=False)
    for name in run_dir.BEFORE_SAVED:
        del state["args"][name]
    torch.save(state, path)
    assert_exits(main, run_args(tiny_init, out, "--steps", "4", "--resume"),
                 "--batching 'random' -> 'sorted'", capsys)
    train(parse_args(run_args(tiny_init, out, "--steps", "4", "--resume", "--recipe", "paper")))


# -----------------------------------------------------------------------------
# Inputs that train less, or otherwise, than they seem: one warning line, or one error


def test_step_tokens_that_are_not_whole_micro_batches_are_said(tiny_init, tmp_path, capsys):
    """A step trains accum_steps whole micro-batches: --micro-batch 64 at the default
    --step-tokens trains 4 times the tokens it gives, --step-tokens 10 a whole micro-batch. The
    warning says what a step really trains (and a --micro-batch that divides it, if one does)."""
    cases = {("--micro-batch", "64"): "each step trains 1 x 64 sequences, 10240 tokens; "
                                      "--micro-batch 16 makes it 2560",
             ("--step-tokens", "10"): "each step trains 1 x 8 sequences, 1280 tokens",
             ("--step-tokens", "4000"): "each step trains 3 x 8 sequences, 3840 tokens; "
                                        "--micro-batch 5 makes it 4000"}
    for flags, said in cases.items():
        cfg = parse_args(list(flags))
        note = samples.step_size_note(cfg, 1)
        accum = samples.accum_steps(cfg, 1)
        assert said in note and f"{accum * cfg.micro_batch * cfg.seq_len} tokens" in note, note
    assert samples.step_size_note(parse_args([]), 1) is None        # 2 x 8 x 160 = 2560
    assert samples.step_size_note(parse_args(["--recipe", "paper"]), 1) is None
    assert samples.step_size_note(parse_args(["--micro-batch", "4"]), 2) is None
    train(parse_args(run_args(tiny_init, tmp_path / "run", "--steps", "1", "--step-tokens", "300")))
    warnings = [w for w in capsys.readouterr().err.splitlines() if "--step-tokens" in w]
    assert warnings == ["warning: --step-tokens 300 is not a whole number of micro-batches of 4 x "
                        "64 tokens: each step trains 1 x 4 sequences, 256 tokens"]


def write_rows(path, rows):
    path.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in rows))
    return str(path)


def test_samples_longer_than_seq_len_are_counted_and_none_answered_is_refused(tiny_init, tmp_path,
                                                                               capsys):
    """The count of cut samples and of those cut before their answer begins, against the lengths
    of sample_ids and of the prompt alone; a --seq-len that cuts off every answer is refused."""
    from compat.tokenizers import load_tokenizer
    from data import plain_prompt, sample_ids
    tok = load_tokenizer(tiny_init)
    rows = [("What is 2 + 3?", "#### 5")] * 6 + [("What is 2 + 3?", "2 + 3 = 5. " * 12 + "#### 5")] * 3 \
        + [("Is it " + "2 + 3, " * 15 + "or 5?", "#### 5")]
    data = write_rows(tmp_path / "rows.jsonl", rows)
    lengths = [len(sample_ids(tok, {"question": q, "answer": a})) for q, a in rows]
    prompts = [len(tok.encode(plain_prompt(q))) for q, _ in rows]
    seen = set()
    for seq_len in (20, 40, 108, 200):
        cfg = parse_args(["--data", data, "--seq-len", str(seq_len)])
        said = []
        seqs, _ = samples.load_samples(cfg, tok, said.append)
        cut = sum(n > seq_len for n in lengths)
        lost = sum(n > seq_len and p >= seq_len for n, p in zip(lengths, prompts))
        seen.add((cut == len(rows), 0 < cut < len(rows), lost > 0))
        assert len(seqs) == len(rows) and len(said) == (cut > 0), said
        if cut:
            assert said[0].startswith(f"{cut} of the 10 samples are longer than --seq-len "
                                      f"{seq_len} and are cut to it"), said
            assert (f", {lost} of them before their answer begins" in said[0]) == (lost > 0)
            assert f"(the longest is {max(lengths)} tokens)" in said[0]
    assert len(seen) == 4                   # all cut, some, some with answers lost, none cut
    assert min(prompts) == 17
    assert_exits(main, run_args(tiny_init, tmp_path / "r", "--data", data, "--seq-len", "16"),
                 "--seq-len 16 cuts every sample before its answer begins: no answer token would "
                 "be trained", capsys)


def test_rows_with_empty_answers_are_left_out_and_all_empty_is_refused(tiny_init, tmp_path, capsys):
    from compat.tokenizers import load_tokenizer
    tok = load_tokenizer(tiny_init)
    data = write_rows(tmp_path / "some.jsonl", [("1 + 1?", "#### 2"), ("", ""), ("2 + 2?", " "),
                                                 ("3 + 3?", "#### 6")])
    said = []
    seqs, _ = samples.load_samples(parse_args(["--data", data]), tok, said.append)
    assert len(seqs) == 2 and said == [f"2 of the 4 rows of {data} have an empty answer: they are "
                                       "left out"]
    data = write_rows(tmp_path / "empty.jsonl", [("", "")] * 40)
    assert_exits(main, run_args(tiny_init, tmp_path / "r", "--data", data),
                 "every one of its 40 rows has an empty answer", capsys)


@pytest.mark.parametrize("flags,said", [
    (["--k", "1000"], "--seq-len >= 2000 or --k 80 or less"),
    (["--seq-len", "7"], "--regions 1, --seq-len >= 8 or --k 3 or less"),
    (["--seq-len", "12", "--regions", "4"], "--regions 3 or fewer, --seq-len >= 16 or --k 3 or less"),
    (["--seq-len", "5", "--regions", "2", "--k", "3"], "--regions 1, --seq-len >= 6 or --k 2"),
    (["--seq-len", "3", "--k", "4"], "--seq-len >= 8"),
])
def test_a_seq_len_too_short_for_its_regions_names_each_fix_that_fits(flags, said):
    """Every change the message proposes passes the check (applied alone)."""
    cfg = parse_args(flags)
    with pytest.raises(distill.ConfigError) as e:
        distill.check_config(cfg)
    assert str(e.value).endswith(said), str(e.value)
    fixes = re.findall(r"(--[a-z-]+) (?:>= )?(\d+)( or fewer| or less)?", said)
    assert len(fixes) == said.count("--")
    for flag, value, or_less in fixes:
        distill.check_config(parse_args(flags + [flag, value]))
        if or_less:                                             # the other end of the range
            distill.check_config(parse_args(flags + [flag, "1" if flag == "--regions" else "2"]))
