"""distill.py at scale, on the CPU: FSDP2 over two gloo processes against one process, an FSDP run
killed and resumed, --grad-ckpt against plain backward, and the memory plan (tools/plan_memory.py) against the
model's own parameter count and autograd's own record of what a block saves."""
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, assert_exits, tiny_config
from data import pack
from distill import load_models, load_samples, main, mtp_step, n_regions, parse_args, supervised_weight, train
from parallel.distributed import checkpoint_blocks
from tools.plan_memory import block_activations, memory_plan, param_counts, plan_shapes
from tools.plan_memory import main as plan_main
from model import Transformer
from compat.hf import from_pretrained, config_to_hf

FIXTURES = os.path.join(ROOT, "tests", "fixtures")


# -----------------------------------------------------------------------------
# FSDP2 on two processes (gloo)


def fsdp_args(init, out, *extra):
    """A few steps at a large constant lr: each step moves weights by ~1e-3 (AdamW), so a wrong
    gradient shows far above the ~1e-7 that reduction order alone leaves."""
    return ["--init", init, "--out", str(out), "--k", "4", "--seq-len", "64", "--step-tokens", "512",
            "--log-every", "1", "--save-every", "2", "--lr", "1e-3", "--warmup", "1", "--cooldown", "0",
            "--threads", "1", *extra]


def free_port():
    """A port nobody listens on now (a fixed one clashes with a suite running beside this one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_processes(args):
    """`torchrun --nproc_per_node 2 distill.py ARGS` without torchrun's supervisor process (one
    torch import fewer per run): the same environment variables, set here."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "distill.py"), *args],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    try:
        errs = [p.communicate(timeout=300)[1] for p in procs]
    finally:
        for p in procs:          # one rank failed and the other waits for it forever: stop it
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(e[-3000:] for e in errs)


def losses(out):
    return [r["loss"] for r in map(json.loads, open(os.path.join(out, "log.jsonl"))) if "loss" in r]


def weights(path):
    return from_pretrained(str(path)).state_dict()


@pytest.fixture(scope="module")
def fsdp_run(tiny_init, tmp_path_factory):
    """4 steps on 2 processes with --fsdp, 4 sequences each per micro-batch (checkpoints at 2, 4)."""
    out = tmp_path_factory.mktemp("fsdp") / "run"
    two_processes(fsdp_args(tiny_init, out, "--fsdp", "--micro-batch", "4", "--steps", "4"))
    return out


def test_fsdp_on_two_processes_equals_one_process(tiny_init, fsdp_run, tmp_path):
    """Same global batch (8 sequences per micro-batch: 2 x 4 sharded, 1 x 8 plain): the same loss
    at every step and the same final weights, up to fp32 reduction order."""
    train(parse_args(fsdp_args(tiny_init, tmp_path, "--micro-batch", "8", "--steps", "4")))
    one, two = losses(tmp_path), losses(fsdp_run)
    assert len(one) == len(two) == 4 and two == pytest.approx(one, rel=1e-5)
    a, b = weights(tmp_path / "ckpt"), weights(fsdp_run / "ckpt")
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)
    init = weights(tiny_init)                          # and it trained: the weights moved
    assert not torch.allclose(a["blocks.0.mlp.fc.weight"], init["blocks.0.mlp.fc.weight"])
    saved = from_pretrained(str(fsdp_run / "ckpt"))    # an ordinary HF checkpoint
    assert saved.cfg.mtp_token_id == 512 and saved.cfg.mtp_k_max == 4
    assert saved.lm_head.weight is saved.embed.weight                   # still tied


def test_a_killed_fsdp_run_resumes_to_the_same_weights(tiny_init, fsdp_run, tmp_path):
    """Stopped at its step-2 checkpoint, resumed to step 4 == fsdp_run's 4 uninterrupted steps,
    bit for bit. Both halves also run --grad-ckpt, which must not change a single bit either."""
    out, flags = tmp_path / "run", ("--fsdp", "--grad-ckpt", "--micro-batch", "4")
    two_processes(fsdp_args(tiny_init, out, *flags, "--steps", "2"))
    two_processes(fsdp_args(tiny_init, out, *flags, "--steps", "4", "--resume"))
    a, b = weights(fsdp_run / "ckpt"), weights(out / "ckpt")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert losses(out) == losses(fsdp_run)


def test_fsdp_input_errors(tiny_init, fsdp_run, tmp_path, capsys):
    assert_exits(main, fsdp_args(tiny_init, tmp_path / "o", "--fsdp"), "run it as torchrun", capsys)
    copy = tmp_path / "copy"
    shutil.copytree(fsdp_run, copy)       # an FSDP checkpoint resumed without --fsdp
    assert_exits(main, fsdp_args(tiny_init, copy, "--resume", "--steps", "6"),
                 "was written with --fsdp", capsys)


# -----------------------------------------------------------------------------
# Activation checkpointing


def saved_storages(into):
    """A context in which autograd records {storage address: bytes} of every tensor it saves for
    backward; a view keeps its whole storage alive, so each storage counts once."""
    def record(t):
        into[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    return torch.autograd.graph.saved_tensors_hooks(record, lambda t: t)


def test_grad_ckpt_leaves_loss_and_gradients_unchanged_and_saves_less(tiny_init):
    cfg = parse_args(["--init", tiny_init, "--k", "4", "--seq-len", "64", "--recipe", "paper"])
    runs = []
    for ckpt in (False, True):
        student, teacher, tok = load_models(cfg, torch.device("cpu"))
        if ckpt:
            checkpoint_blocks(student)
        P = pack(load_samples(cfg, tok)[0][:6], 3, 2, n_regions(cfg), cfg.seq_len,
                 student.cfg.mtp_token_id, tok.eos_id)
        saved = {}   # what autograd keeps for backward outside the checkpointed blocks
        with saved_storages(saved):
            loss, _ = mtp_step(student, teacher, P, cfg, student.cfg.mtp_token_id, tok.eos_id,
                               supervised_weight(P, cfg).sum())
        loss.backward()
        runs.append((loss, {n: p.grad for n, p in student.named_parameters()}, sum(saved.values())))
    (loss, grads, kept), (loss_c, grads_c, kept_c) = runs
    assert torch.equal(loss_c, loss)
    for name in grads:
        assert torch.equal(grads_c[name], grads[name]), name
    assert kept_c < 0.5 * kept, (kept_c, kept)


# -----------------------------------------------------------------------------
# The memory plan


@pytest.mark.parametrize("kw", [{}, {"tie": False}, {"model_type": "qwen2"}, {"model_type": "gpt2"},
                                {"gqa": False, "mlp_bias": True}, {"model_type": "qwen3"},
                                {"model_type": "qwen3", "qkv_bias": True, "o_bias": True}])
def test_plan_counts_parameters_as_the_model_has_them(kw):
    cfg = tiny_config(**kw)
    model = Transformer(cfg)
    hf = config_to_hf(cfg)
    s = plan_shapes(hf)
    root, block = param_counts(s, s["V"])
    assert root + cfg.n_layer * block == sum(p.numel() for p in model.parameters())
    model.add_mtp_token()
    _, info = memory_plan(hf, parse_args(["--k", "4", "--seq-len", "64"]))
    assert info["params"] == sum(p.numel() for p in model.parameters())


def test_plan_of_the_papers_checkpoints_from_their_config_alone(capsys):
    """The published parameter counts, from config.json only (the fixtures hold no weights)."""
    published = {"llama-3.1-8b": 8_030_261_248, "qwen3-4b-instruct-2507": 4_022_468_096}
    for name, count in published.items():
        with open(os.path.join(FIXTURES, name, "config.json")) as f:
            _, info = memory_plan(json.load(f), parse_args(["--k", "16"]))
        assert info["teacher_params"] == count, name
    llama = os.path.join(FIXTURES, "llama-3.1-8b")
    rows = {}
    for n in (1, 4):
        plan_main(["--init", llama, "--fsdp", "--nproc", str(n), "--k", "16", "--grad-ckpt"])
        out = capsys.readouterr().out
        rows[n] = {line[:42].strip(): float(line[42:].split()[0]) for line in out.splitlines()
                   if line.endswith("GiB") and line.startswith("  ")}
    assert rows[4]["AdamW state (2 x fp32)"] == pytest.approx(rows[1]["AdamW state (2 x fp32)"] / 4,
                                                              abs=0.01)
    assert "fits in 80 GiB" in out
    plan_main(["--init", llama, "--k", "16", "--gpu-mem", "24"])
    assert "does NOT fit in 24 GiB" in capsys.readouterr().out


def test_plan_errors(tmp_path, capsys):
    """The plan reads config.json as the model loader does (compat.hf.read_config): what distill.py
    refuses, the plan refuses with the same line; and --gpu-mem is a GPU's memory."""
    assert_exits(plan_main, ["--init", str(tmp_path)], "config.json", capsys)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    assert_exits(plan_main, ["--init", str(tmp_path)], "unknown model_type 'mamba'", capsys)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    assert_exits(plan_main, ["--init", str(tmp_path)], "has no 'vocab_size' field", capsys)
    assert_exits(plan_main, ["--init", str(tmp_path), "--nproc", "0"], "--nproc must be >= 1", capsys)
    assert_exits(plan_main, ["--init", str(tmp_path), "--pretrain"], "not --pretrain", capsys)
    with open(os.path.join(FIXTURES, "llama-3.1-8b", "config.json")) as f:
        llama = json.load(f)
    for change, message in [({"vocab_size": "128256"}, "vocab_size = '128256' is not a whole number"),
                            ({"num_attention_heads": 0}, "num_attention_heads = 0 is not a whole number"),
                            ({"rope_scaling": {"rope_type": "yarn"}}, "rope type 'yarn' is not supported")]:
        (tmp_path / "config.json").write_text(json.dumps({**llama, **change}))
        assert_exits(plan_main, ["--init", str(tmp_path)], message, capsys)
    (tmp_path / "config.json").write_text('{"model_type": "llama",')
    assert_exits(plan_main, ["--init", str(tmp_path)], "config.json is not a usable config", capsys)
    for gib in ("0", "nan", "inf", "1e300"):
        assert_exits(plan_main, ["--init", os.path.join(FIXTURES, "llama-3.1-8b"), "--gpu-mem", gib],
                     "--gpu-mem a GPU's memory in GiB, above 0 and at most 1,000,000", capsys)


@pytest.mark.parametrize("kw", [{}, {"model_type": "gpt2"}, {"model_type": "qwen2"}, {"model_type": "qwen3"},
                                {"d_model": 64, "d_ff": 160, "n_head": 8, "head_dim": 8}])
def test_plan_block_activations_match_what_autograd_saves(kw):
    """The per-token count of block_activations against the distinct tensors a block's forward
    leaves for backward (fp32, CPU: its fused SDPA keeps no (L, L) scores either)."""
    cfg = tiny_config(**kw)
    model = Transformer(cfg)
    B, T = 2, 50
    x = torch.randn(B, T, cfg.d_model, requires_grad=True)
    mask = torch.ones(T, T, dtype=torch.bool).tril()[None, None]
    rope = None
    if cfg.model_type != "gpt2":
        freqs = torch.arange(T)[:, None].float() * model.inv_freq
        emb = torch.cat((freqs, freqs), -1)[None, None]
        rope = (emb.cos(), emb.sin())
    storages = {}
    with saved_storages(storages):
        model.blocks[0](x, rope, mask, False, None, 0)
    shared = {p.untyped_storage().data_ptr() for p in model.parameters()}     # weights, not activations
    shared |= {t.untyped_storage().data_ptr() for t in (mask, *(rope or ()))}  # made once per forward
    per_token = sum(n for ptr, n in storages.items() if ptr not in shared) / (B * T * 4)
    assert per_token == pytest.approx(block_activations(plan_shapes(config_to_hf(cfg))), rel=0.03)
