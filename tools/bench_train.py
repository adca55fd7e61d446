"""
Training speed: one MTP distillation step (distill.py's) against a plain next-token step.

    python -m tools.bench_train                           # the embedded default teacher, synthetic data, CPU
    python -m tools.bench_train --init checkpoints/smollm2-135m-instruct --data gsm8k --seq-len 160 \\
        --batch 64 --k 16 --steps 20 --device cuda [--compile] [--attention flex]

Both kinds of step run on the same student (init + <MTP>, as distill.py loads it) with the same
AdamW and the same fixed set of batches, drawn and packed the way distill.py draws them:
  MTP: distill.mtp_step (student forward/backward on the packed sequence + teacher forward on
       the student's rollout), then gradient clipping and the optimizer step, as distill.train;
  NTP: plain causal next-token fine-tuning on the same batches' ground-truth tokens (B, N),
       student forward/backward, same clipping and optimizer.
bf16 autocast on CUDA (fp32 with --precision fp32), fp32 on the CPU, as distill.py. Warm-up
steps run first and are not timed; the timed region is the N steps of one kind between two CUDA
events (host clock on the CPU). Batches are packed and moved to the device before timing
(distill.py packs on the host inside its loop; a data loader would hide that). Prints a markdown
table, then one JSON line.
"""
import argparse
import json
import random
import sys
import time

import torch
import torch.nn as nn

from data import DataError

from compat.tokenizers import TokenizerError
from distill import (TrainConfig, autocast, check_config, hard_ce, load_models, mtp_step,
                     n_regions, ntp_inputs, optimizer_update, step_batches, supervised_weight,
                     uses_bf16)
from fast.flex import FlexMask
from training.samples import load_samples, sample_stream
from model import CheckpointError
from training.options import add_config_args, ConfigError

# bf16 dense tensor-core peaks (TFLOP/s, no sparsity), matched in order on the device name
PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),
               ("A100", 312.0)]

# -----------------------------------------------------------------------------
# Configuration: the method's settings come from distill.TrainConfig (defaults written once there)

SHARED = ["init", "data", "k", "fixed_k", "regions", "seq_len", "supervise", "batching", "teacher",
          "seed", "compile", "attention", "device", "precision", "threads"]


def parse_args(argv=None):
    """(TrainConfig, bench args). TrainConfig.micro_batch = --batch and .steps = --steps."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_args(p, TrainConfig, only=SHARED)
    p.add_argument("--batch", type=int, default=64, help="sequences per step (one micro-batch)")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps of each kind")
    p.add_argument("--warmup-steps", type=int, default=-1,
                   help="untimed steps of each kind first; -1 = 3, or with --compile one pass over "
                        "the batch set + 2 (every packed length compiles before timing)")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="the device's peak for MFU; 0 = look the GPU up in a small bf16 table")
    a = p.parse_args(argv)
    cfg = TrainConfig(**{n: getattr(a, n) for n in SHARED}, micro_batch=a.batch, steps=a.steps,
                      step_tokens=a.batch * a.seq_len)        # one micro-batch per step
    return cfg, a


def check_args(cfg, a):
    for name in ("batch", "steps"):
        if getattr(a, name) < 1:
            raise ConfigError(f"--{name} must be >= 1 (got {getattr(a, name)})")
    if a.warmup_steps < -1:
        raise ConfigError(f"--warmup-steps must be >= 0, or -1 for the default (got {a.warmup_steps})")
    if a.peak_tflops < 0:
        raise ConfigError(f"--peak-tflops must be > 0, or 0 to look it up (got {a.peak_tflops})")
    check_config(cfg)                     # --k, --seq-len against the regions, --attention
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device must be auto, cpu or cuda (got {cfg.device!r})")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible; use --device cpu")


# -----------------------------------------------------------------------------
# The batches: drawn and packed as distill.train draws them (same stream, same k/offset draws)


def make_batches(cfg, samples, n, mtp_id, eos_id):
    """n packed batches of cfg.micro_batch rows (on the CPU): the first n steps of a distill.py run
    with this config (samples: load_samples'), one micro-batch per step."""
    stream, rng = sample_stream(cfg, samples[0], 1), random.Random(cfg.seed)
    return [step_batches(cfg, *samples, stream, rng, 0, 1, mtp_id, eos_id, torch.device("cpu"), 1)[0]
            for _ in range(n)]


# -----------------------------------------------------------------------------
# One optimizer step of each kind (what is timed)


def mtp_train_step(student, teacher, opt, P, denom, cfg, mtp_id, eos_id, amp):
    """One distillation step on one packed batch: distill.mtp_step, backward, update."""
    with amp:
        loss, _ = mtp_step(student, teacher, P, cfg, mtp_id, eos_id, denom)
    loss.backward()
    optimizer_update(student, opt, cfg)
    return loss


def ntp_train_step(student, opt, x, weight, cfg, amp):
    """One plain fine-tuning step: causal forward on x[:, :-1], cross-entropy on x[:, 1:]."""
    with amp:
        logits = student(x[:, :-1])                                   # (B, N-1, V+1)
        loss = hard_ce(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), weight.reshape(-1))
    loss.backward()
    optimizer_update(student, opt, cfg)
    return loss


def timed(step, n, cuda):
    """Run step(0..n-1) and time exactly that. Returns (milliseconds in all, peak GPU GiB or None)."""
    if not cuda:
        t0 = time.perf_counter()
        for i in range(n):
            step(i)
        return 1000 * (time.perf_counter() - t0), None
    torch.cuda.synchronize()                      # nothing queued before the start event
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(n):
        step(i)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end), torch.cuda.max_memory_allocated() / 2**30


# -----------------------------------------------------------------------------
# Model FLOPs (what the step needs, not what the kernels happen to compute)


def forward_flops(model, T, n_logits):
    """Matmul FLOPs of one forward over one row of T tokens with logits at n_logits positions.

    2 * (weights of every block's linear layers) per token; attention QK^T and AV, 2 * 2 * T^2 *
    n_head * head_dim per layer over the full T x T (PaLM's convention; the boolean-mask SDPA
    computes every entry, causal flash and FlexAttention skip some); the vocab projection
    2 * d * V only where logits are computed (mtp_step asks for the supervised positions only).
    Norms, RoPE, softmax and the loss are left out (small). A backward costs 2 forwards.
    """
    c = model.cfg
    body = sum(m.weight.numel() for m in model.blocks.modules() if isinstance(m, nn.Linear))
    attention = c.n_layer * 4 * T * T * c.n_head * c.head_dim
    return 2 * body * T + attention + 2 * c.d_model * c.vocab_size * n_logits


def mtp_flops(student, teacher, P):
    """Student forward + backward (3 forwards) and one teacher forward, on the packed length L."""
    B, L, (M, k) = P.idx.size(0), P.idx.size(1), P.sup.shape
    return B * (3 * forward_flops(student, L, M * k) + forward_flops(teacher, L, M * k))


def ntp_flops(student, P):
    N = len(P.gt)
    return P.idx.size(0) * 3 * forward_flops(student, N - 1, N - 1)


def peak_tflops(a, cuda):
    """(peak TFLOP/s or None, where it came from)."""
    if a.peak_tflops:
        return a.peak_tflops, "--peak-tflops"
    if not cuda:
        return None, "n/a (give --peak-tflops)"
    name = torch.cuda.get_device_name()
    for key, tf in PEAK_TFLOPS:
        if key in name:
            return tf, f"bf16 dense peak of {key}"
    return None, f"n/a ({name} is not in the table: give --peak-tflops)"


# -----------------------------------------------------------------------------


def run(cfg, a):
    check_args(cfg, a)
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.attention == "flex" and not cuda:
        raise ConfigError("--attention flex needs CUDA (FlexAttention has no backward on the CPU); "
                          "use --attention sdpa")
    student, teacher, tok = load_models(cfg, device)
    samples = load_samples(cfg, tok)
    if cfg.seq_len + cfg.k - 1 > student.cfg.max_seq_len:
        raise ConfigError(f"--seq-len {cfg.seq_len} + k {cfg.k} exceeds the model's context "
                          f"({student.cfg.max_seq_len})")
    mtp_id, eos_id = student.cfg.mtp_token_id, tok.eos_id

    # everything a step consumes, made before any timing
    batches = [P.to(device) for P in make_batches(cfg, samples, a.steps, mtp_id, eos_id)]
    sup_tokens = [float(supervised_weight(P, cfg).sum()) for P in batches]   # as distill counts
    denoms = [torch.tensor(max(1.0, s), device=device) for s in sup_tokens]
    ntp = [ntp_inputs(P) for P in batches]
    ntp_tokens = sum(float(w.sum()) for _, w in ntp)
    flops = {"mtp": sum(mtp_flops(student, teacher, P) for P in batches),
             "ntp": sum(ntp_flops(student, P) for P in batches)}
    if cfg.attention == "flex":     # one block mask per batch (the layout is the same for every row)
        for P in batches:
            P.mask = FlexMask(P.mask)

    raw = student
    if cfg.compile:
        student, teacher = torch.compile(student), torch.compile(teacher)
    opt = torch.optim.AdamW(raw.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    amp = autocast(device, cfg)
    n_warmup = a.warmup_steps if a.warmup_steps >= 0 else (len(batches) + 2 if cfg.compile else 3)

    def mtp(i):
        mtp_train_step(student, teacher, opt, batches[i], denoms[i], cfg, mtp_id, eos_id, amp)

    def plain(i):
        ntp_train_step(student, opt, *ntp[i], cfg, amp)

    n = len(batches)
    # warm both kinds first (compilation, allocator, kernel choice), untimed; then time each
    for i in range(n_warmup):
        mtp(i % n)
    for i in range(n_warmup):
        plain(i % n)
    mtp_total, mtp_mem = timed(mtp, n, cuda)
    ntp_total, ntp_mem = timed(plain, n, cuda)

    # -------------------------------------------------------------------------
    # report
    mtp_ms, ntp_ms = mtp_total / n, ntp_total / n
    peak, peak_from = peak_tflops(a, cuda)
    tflops = {"mtp": flops["mtp"] / mtp_total / 1e9, "ntp": flops["ntp"] / ntp_total / 1e9}
    mfu = {kind: tf / peak if peak else None for kind, tf in tflops.items()}
    mean_len = sum(P.idx.size(1) for P in batches) / len(batches)
    device_name = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    n_params = sum(p.numel() for p in raw.parameters())
    res = {
        "device": device_name, "init": cfg.init or "(embedded default teacher)", "data": cfg.data,
        "params": n_params, "batch": a.batch, "seq_len": cfg.seq_len, "k_max": cfg.k,
        "fixed_k": cfg.fixed_k, "regions": n_regions(cfg), "mean_packed_len": mean_len,
        "attention": cfg.attention, "compile": cfg.compile, "teacher": cfg.teacher,
        "steps": n, "warmup_steps": n_warmup,
        "mtp_ms": mtp_ms, "ntp_ms": ntp_ms, "ratio": mtp_ms / ntp_ms,
        "flops_ratio": flops["mtp"] / flops["ntp"],
        "mtp_sup_tokens": sum(sup_tokens), "mtp_sup_tok_per_s": sum(sup_tokens) / (mtp_total / 1000),
        "ntp_tokens": ntp_tokens, "ntp_tok_per_s": ntp_tokens / (ntp_total / 1000),
        "mtp_tflops": tflops["mtp"], "ntp_tflops": tflops["ntp"],
        "peak_tflops": peak, "mtp_mfu": mfu["mtp"], "ntp_mfu": mfu["ntp"],
        "mtp_peak_gib": mtp_mem, "ntp_peak_gib": ntp_mem,
    }
    pct = lambda x: f"{100 * x:.1f}%" if x is not None else peak_from
    gib = lambda x: f"{x:.2f}" if x is not None else "-"
    print(f"{device_name} | {n_params / 1e6:.2f}M params | data {cfg.data} | batch {a.batch} x "
          f"N={cfg.seq_len} | k in [{cfg.k if cfg.fixed_k else 2}, {cfg.k}], {n_regions(cfg)} regions, "
          f"mean packed length {mean_len:.1f} | attention {cfg.attention}"
          f"{' | compiled' if cfg.compile else ''} | {n} timed steps each after {n_warmup} "
          f"warm-up | {'bf16 autocast' if uses_bf16(device, cfg) else 'fp32'}\n")
    print("| step | ms/step | tokens/s | TFLOP/s | MFU | peak GiB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    print(f"| MTP distillation (student fwd+bwd, teacher fwd) | {mtp_ms:.1f} | "
          f"{res['mtp_sup_tok_per_s']:.0f} supervised | {tflops['mtp']:.3g} | {pct(mfu['mtp'])} | "
          f"{gib(mtp_mem)} |")
    print(f"| NTP fine-tuning (student fwd+bwd) | {ntp_ms:.1f} | {res['ntp_tok_per_s']:.0f} "
          f"next-token | {tflops['ntp']:.3g} | {pct(mfu['ntp'])} | {gib(ntp_mem)} |")
    print(f"\nMTP / NTP step time: {res['ratio']:.3f} (model FLOPs ratio {res['flops_ratio']:.3f}: "
          "the ratio at equal MFU)")
    print(json.dumps(res))
    return res


def main(argv=None):
    cfg, a = parse_args(argv)
    try:
        return run(cfg, a)
    except (ConfigError, CheckpointError, TokenizerError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
