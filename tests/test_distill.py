"""distill.py: the losses against naive loops, exact resume, DDP, and bad-input messages."""
import itertools
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import assert_exits, ROOT
import distill
from distill import TrainConfig, hard_ce, lr_at, main, parse_args, plan_steps, soft_kl, train
from model import Transformer


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
    cfg = TrainConfig(lr=1e-3, warmup=10, steps=100, cooldown=0)
    assert lr_at(0, cfg) == pytest.approx(1e-4) and lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(99, cfg) == pytest.approx(1e-3)                     # constant after warm-up
    cfg.cooldown = 50
    assert lr_at(49, cfg) == pytest.approx(1e-3) and lr_at(75, cfg) == pytest.approx(0.5e-3)
    cfg.cooldown = 400                                               # longer than the run
    assert lr_at(20, cfg) == pytest.approx(1e-3 * 80 / 400)


def run_args(init, out, *extra):
    return ["--init", init, "--out", str(out), "--k", "4", "--seq-len", "64", "--micro-batch", "4",
            "--step-tokens", "512", "--log-every", "2", "--save-every", "3", "--threads", "1", *extra]


def weights(path):
    return Transformer.from_pretrained(path).state_dict()


@pytest.mark.parametrize("mode", [[], ["--teacher", "soft"], ["--targets", "data", "--fixed-k"],
                                  ["--prefix-loss"]])
def test_training_modes_run_and_log(tiny_init, tmp_path, mode):
    train(parse_args(run_args(tiny_init, tmp_path, "--steps", "4", *mode)))
    recs = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    logs = [r for r in recs if "loss" in r]
    assert [r["step"] for r in logs] == [2, 4]
    assert all(len(r["agree"]) == 4 and r["sup_tok_per_s"] > 0 for r in logs)
    m = Transformer.from_pretrained(str(tmp_path / "ckpt"))
    assert m.cfg.mtp_token_id == 512 and m.cfg.mtp_k_max == 4
    assert os.path.isfile(tmp_path / "ckpt" / "tokenizer.tiktoken")


def test_resume_is_exact(tiny_init, tmp_path):
    """N steps, then resume for N more == 2N steps in one go (same weights, bit for bit).
    Constant lr: with a cool-down the schedule depends on --steps, so the first half would be
    a different (shorter) run."""
    flat = ("--cooldown", "0")
    train(parse_args(run_args(tiny_init, tmp_path / "once", "--steps", "6", *flat)))
    train(parse_args(run_args(tiny_init, tmp_path / "twice", "--steps", "3", *flat)))
    train(parse_args(run_args(tiny_init, tmp_path / "twice", "--steps", "6", "--resume", *flat)))
    a, b = weights(str(tmp_path / "once" / "ckpt")), weights(str(tmp_path / "twice" / "ckpt"))
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # and it did train: the student moved away from the init
    init = weights(tiny_init)
    assert not torch.equal(a["blocks.0.attn.qkv.weight"], init["blocks.0.attn.qkv.weight"])


def test_plan_steps():
    # 10 steps took 30 s of a 2-minute budget: 90 s left at 3 s a step is 30 more
    assert plan_steps(10, 30.0, 2, 1000) == 40
    assert plan_steps(10, 30.0, 2, 25) == 25              # never past the --steps given
    assert plan_steps(10, 150.0, 2, 1000) == 10           # over budget already: stop now


def test_a_shorter_plan_starts_its_cooldown_from_the_current_lr():
    """Planned to end before the old cool-down would even start, the run starts it now: the lr
    does not jump down (it would to 20/500 of the peak with the cool-down left at 500)."""
    from distill import plan_length
    cfg = TrainConfig(lr=1.0, warmup=1, steps=1000, cooldown=500, minutes=1.0)
    plan_length(cfg, 100, 50.0, 1000, 1, torch.device("cpu"), None)   # 10 s left at 0.5 s a step
    assert (cfg.steps, cfg.cooldown) == (120, 20)
    assert lr_at(100, cfg) == 1.0 and lr_at(110, cfg) == pytest.approx(0.5)


def test_resuming_a_minutes_run_needs_its_plan(tiny_init, tmp_path, capsys):
    out = tmp_path / "run"
    train(parse_args(run_args(tiny_init, out, "--steps", "8", "--minutes", "100", "--cooldown", "2",
                              "--log-every", "2", "--save-every", "4")))
    planned = json.load(open(out / "args.json"))
    assert planned["minutes"] == 100 and planned["steps"] == 8
    assert_exits(main, run_args(tiny_init, out, "--steps", "100", "--resume"), "--steps 8 --cooldown 2",
                 capsys)


@pytest.mark.parametrize("cooldown", [4, 0])
def test_minutes_sets_the_length_and_the_cooldown_ends_it(tiny_init, tmp_path, monkeypatch, cooldown):
    """--minutes with a clock that advances 1 s per reading: the run plans its length at each
    log line before the cool-down, ends at the plan with a checkpoint, and the lr reaches 0 at
    the planned end (the cool-down kept its length). Without a cool-down the clock jumps past the
    budget: the plan that ends the run is made at its last step, which must be logged and saved."""
    clock = iter(range(10**6)) if cooldown else itertools.chain(range(16), range(1000, 10**6))
    monkeypatch.setattr(distill.time, "perf_counter", lambda: float(next(clock)))
    out = tmp_path / "run"
    train(parse_args(run_args(tiny_init, out, "--steps", "1000", "--minutes", "0.5",
                              "--cooldown", str(cooldown), "--warmup", "1", "--save-every", "1000")))
    recs = [json.loads(line) for line in open(out / "log.jsonl")]
    plans = [r for r in recs if "planned_steps" in r]
    final = plans[-1]["planned_steps"]
    assert plans and 4 < final < 1000 and [p["planned_steps"] for p in plans] != [1000]
    state = torch.load(out / "ckpt" / "train_state.pt", weights_only=False)
    assert state["step"] == final and state["args"]["steps"] == final
    assert json.load(open(out / "args.json"))["steps"] == final
    losses = [r for r in recs if "loss" in r]
    assert losses[-1]["step"] == final
    if cooldown:
        cfg = TrainConfig(**state["args"])
        assert lr_at(final - 1, cfg) == pytest.approx(cfg.lr / cfg.cooldown)   # the last cool-down step
        # re-planning stopped before the cool-down: no plan at or after its first step
        assert all(p["step"] < final - cooldown for p in plans)
    else:
        assert plans[-1]["step"] == plans[-1]["planned_steps"] == final


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
          "leaves none of --steps 100")
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
    """The committed teacher was made by distill.TEACHER_RECIPE and meets the >= 90% bar (greedy
    k=1, through bench.py, on the first 50 of the 200 held-out problems)."""
    from dataclasses import asdict
    import bench
    from distill import DEFAULT_TEACHER, TEACHER_RECIPE
    with open(os.path.join(DEFAULT_TEACHER, "args.json")) as f:
        made_with = json.load(f)
    recipe = asdict(parse_args(TEACHER_RECIPE))
    assert {k: v for k, v in made_with.items() if k not in ("out", "resume")} == \
           {k: recipe[k] for k in made_with if k not in ("out", "resume")}
    bench.main(["--ckpt", DEFAULT_TEACHER, "--data", "synthetic", "--limit", "50", "--static", "1",
                "--taus", "", "--out", str(tmp_path / "teacher")])
    (k1,) = json.load(open(tmp_path / "teacher.json"))["results"]
    assert k1["strategy"] == "static k=1" and k1["acc"] >= 0.9, k1["acc"]
