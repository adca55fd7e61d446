"""The CUDA paths against the CPU, on a tiny model. Skipped without a GPU; on one machine with a GPU
run `python -m pytest -q tests/test_cuda.py`."""
import pytest
import torch

from conftest import mtp_model, rules, tiny_model
from data import pack
from decode import ConfAdapt, Static, generate, make_engine
from distill import (autocast, load_models, load_samples, mtp_step, n_regions, parse_args,
                     supervised_weight, train)
from compat.hf import from_pretrained
from fast.batch import generate_batch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_the_mtp_row_does_not_depend_on_the_device():
    cpu, gpu = tiny_model(), tiny_model().cuda()
    cpu.add_mtp_token(seed=3)
    gpu.add_mtp_token(seed=3)
    assert torch.equal(gpu.embed.weight.cpu(), cpu.embed.weight)


def one_step(init, device, precision):
    """Loss, gradients and agreement of one distillation micro-step on a fixed packed batch."""
    cfg = parse_args(["--init", init, "--k", "4", "--seq-len", "64", "--device", device,
                      "--precision", precision])
    dev = torch.device(device)
    student, teacher, tok = load_models(cfg, dev)
    rows = load_samples(cfg, tok)[0][:6]
    mtp = student.cfg.mtp_token_id
    P = pack(rows, 3, 2, n_regions(cfg), cfg.seq_len, mtp, tok.eos_id).to(dev)
    with autocast(dev, cfg):
        loss, st = mtp_step(student, teacher, P, cfg, mtp, tok.eos_id, supervised_weight(P, cfg).sum())
    loss.backward()
    return loss.item(), {n: p.grad.cpu() for n, p in student.named_parameters()}, st["agree"].cpu()


def test_a_distillation_step_on_cuda_matches_the_cpu(tiny_init):
    loss, grads, agree = one_step(tiny_init, "cpu", "auto")
    loss32, grads32, agree32 = one_step(tiny_init, "cuda", "fp32")
    assert loss32 == pytest.approx(loss, rel=1e-5) and torch.equal(agree32, agree)
    for name in grads:
        torch.testing.assert_close(grads32[name], grads[name], rtol=1e-3, atol=1e-6)
    loss16, _, _ = one_step(tiny_init, "cuda", "auto")          # bf16 autocast: close, not equal
    assert loss16 == pytest.approx(loss, rel=3e-2)


def test_training_on_cuda_writes_a_loadable_checkpoint(tiny_init, tmp_path):
    for precision in ("auto", "fp32"):
        out = tmp_path / precision
        train(parse_args(["--init", tiny_init, "--out", str(out), "--k", "4", "--seq-len", "64",
                          "--micro-batch", "4", "--step-tokens", "256", "--steps", "3",
                          "--device", "cuda", "--precision", precision]))
        m = from_pretrained(str(out / "ckpt"))
        assert m.cfg.mtp_token_id is not None
        assert all(torch.isfinite(p).all() for p in m.parameters())


def test_decoding_on_cuda_equals_the_cpu():
    m = mtp_model()
    prompt = [3, 14, 15, 9, 2, 6]
    for rule in rules(0.0212):
        cpu, _ = generate(m, prompt, rule, max_new_tokens=20)
        gpu, _ = generate(m.cuda(), prompt, rule, max_new_tokens=20)
        m.cpu()
        assert gpu == cpu, rule


def test_cuda_graphs_decode_as_eager():
    """Passes replayed from CUDA graphs over the static cache give eager decoding's tokens, for
    one prompt and a padded batch, every rule, verified or not (fp32: the same kernels)."""
    prompts = [[59, 15, 1], [58, 30, 41, 27, 18, 40, 33], [53, 18, 5, 40, 45, 51, 43, 10, 54]]
    for model_type, mid in (("llama", 0.0212), ("gpt2", 0.022)):
        m = mtp_model(model_type=model_type).cuda()
        for rule in rules(mid):
            for verify in (False, True):
                ref, _ = generate_batch(m, prompts, rule, max_new_tokens=20, verify=verify)
                graphs = make_engine(m, len(prompts), "graphs")       # capacity: the context
                for _ in range(2):               # the second run replays what the first captured
                    out, _ = generate_batch(m, prompts, rule, max_new_tokens=20, verify=verify,
                                            engine=graphs)
                    assert out == ref, (model_type, rule, verify)
                one, _ = generate(m, prompts[1], rule, max_new_tokens=20, verify=verify)
                assert generate(m, prompts[1], rule, max_new_tokens=20, verify=verify,
                                engine="graphs")[0] == one


def test_cuda_graphs_capture_in_bf16():
    """A bf16 model captures and replays (its RoPE frequencies stay fp32 on the GPU: rebuilding
    them on the CPU inside a capture fails), and a replay gives the captured run's tokens."""
    m = mtp_model().cuda().to(torch.bfloat16)
    prompt = [58, 30, 41, 27, 18, 40, 33]
    for rule in (Static(1), ConfAdapt(0.0)):
        graphs = make_engine(m, 1, "graphs")
        first, _ = generate(m, prompt, rule, max_new_tokens=20, engine=graphs)
        again, _ = generate(m, prompt, rule, max_new_tokens=20, engine=graphs)
        assert len(first) == 20 and again == first, rule


def test_captures_are_prepared_outside_the_timing():
    """A new pass shape is captured by prepare() before the pass, and the stats leave it out
    (setup_ms); the prefill (the first pass, one shape per prompt length) is never captured."""
    m = mtp_model().cuda()
    prompts = [[59, 15, 1], [58, 30, 41, 27, 18, 40, 33]]
    graphs = make_engine(m, len(prompts), "graphs")
    ref, _ = generate_batch(m, prompts, ConfAdapt(0.0), max_new_tokens=12)
    first, st1 = generate_batch(m, prompts, ConfAdapt(0.0), max_new_tokens=12, engine=graphs)
    again, st2 = generate_batch(m, prompts, ConfAdapt(0.0), max_new_tokens=12, engine=graphs)
    assert first == again == ref
    assert st1["setup_ms"] > 0 and st2["setup_ms"] == 0
    # after the prefill a pass feeds at most 4 accepted tokens and 3 <MTP> slots a row; the
    # prefill (the longest prompt and its slots) is never captured
    widths = {T for T, _ in graphs.captured}
    assert max(widths) <= 4 + 3 and len(prompts[1]) + 3 not in widths
