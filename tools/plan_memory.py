"""
GPU memory per process for a distillation run, from --init's config.json alone (no weights are
read): exact bytes for weights, gradients and AdamW state, activations from what each block
saves for backward, estimates for the logits and FSDP's gathered buffers. docs/SCALING.md has
the paper's two checkpoints on 4 x 80 GB.

    python -m tools.plan_memory --init DIR --k 16 --micro-batch 32 --fsdp --nproc 4 --grad-ckpt
    python -m tools.plan_memory --init tests/fixtures/llama-3.1-8b --k 16 --gpu-mem 141

Every distill.py option is accepted (the plan reads --k, --seq-len, --regions, --micro-batch,
--precision, --fsdp, --grad-ckpt, --prefix-loss); --nproc and --gpu-mem describe the machine.
"""
import argparse
import os
import sys

from compat.hf import config_from_hf, read_config
from distill import RECIPES, TrainConfig, check_config, n_regions
from model import CheckpointError
from synthetic.teacher import DEFAULT_TEACHER
from training.options import ConfigError, add_config_args, parse_with_recipe

# The memory plan: bytes per GPU, from config.json's fields alone (no weights read)


def plan_shapes(hf):
    """The sizes the plan needs, from a config.json dict read the way the model loader reads it
    (compat.hf.config_from_hf: every field checked, the same errors as distill.py's)."""
    c = config_from_hf(hf)
    gpt2 = c.model_type == "gpt2"
    return dict(D=c.d_model, layers=c.n_layer, nh=c.n_head, nkv=c.n_kv_head, hs=c.head_dim,
                d_ff=c.d_ff, V=c.vocab_size, tied=c.tie_embeddings, gated=not gpt2,
                positions=c.max_seq_len if gpt2 else 0, qkv_bias=c.qkv_bias, o_bias=c.o_bias,
                mlp_bias=c.mlp_bias, norm_bias=gpt2, qk_norm=c.qk_norm)


def param_counts(s, V):
    """(root, block): parameters outside the blocks (embeddings, lm_head, final norm: FSDP's root
    group) and in each block, for a vocabulary of V rows."""
    D, q, kv, d_ff = s["D"], s["nh"] * s["hs"], s["nkv"] * s["hs"], s["d_ff"]
    norm = D * (2 if s["norm_bias"] else 1)
    attn = D * (q + 2 * kv) + q * D + (q + 2 * kv) * s["qkv_bias"] + D * s["o_bias"] \
        + 2 * s["hs"] * s["qk_norm"]
    mlp = D * d_ff * (3 if s["gated"] else 2) + (d_ff * (2 if s["gated"] else 1) + D) * s["mlp_bias"]
    root = V * D * (1 if s["tied"] else 2) + s["positions"] * D + norm
    return root, attn + mlp + 2 * norm


def block_activations(s):
    """Values one block keeps for backward, per token (bf16/fp32 elements), as model.Block saves
    them: each RMSNorm its input, normalised value and output (3 D; LayerNorm: input and output,
    2 D); the whole qkv output (v is a view of it), the rotated q and k (no RoPE in GPT-2: q and k
    are views too), the attention output and the out-projection's copy of it; the MLP's fc output,
    activation and product (4 d_ff; GPT-2: 2 d_ff). Qwen3's q/k norms add their normalised values.
    Assumes a fused attention kernel (SDPA's memory-efficient or flash one, or FlexAttention) that
    keeps no (L, L) score matrix per head; tests/test_fsdp.py checks it against autograd's own count."""
    q, kv, rope = s["nh"] * s["hs"], s["nkv"] * s["hs"], s["gated"]
    norms = (6 if rope else 4) * s["D"]
    attn = (q + 2 * kv) + (q + kv) * rope + 2 * q + (q + kv) * s["qk_norm"]
    return norms + attn + (4 if s["gated"] else 2) * s["d_ff"]


def memory_plan(hf, cfg, nproc=1, micro_batch=None):
    """{what: bytes per process} for distilling the checkpoint of config.json `hf` with cfg's
    settings on CUDA (bf16 compute unless --precision fp32), in `nproc` processes."""
    s, mb = plan_shapes(hf), micro_batch or cfg.micro_batch
    V_s = s["V"] + (hf.get("mtp_token_id") is None)               # the student gains the <MTP> row
    root_t, block = param_counts(s, s["V"])
    root_s, _ = param_counts(s, V_s)
    P_s, P_t = root_s + s["layers"] * block, root_t + s["layers"] * block
    bf16 = cfg.precision == "auto"
    cb = 2 if bf16 else 4                                         # bytes of a compute value
    n = nproc if cfg.fsdp else 1                              # FSDP splits every state n ways
    rows = {"student weights (fp32 master)": 4 * P_s / n, "gradients (fp32)": 4 * P_s / n,
            "AdamW state (2 x fp32)": 8 * P_s / n,
            f"teacher weights ({'bf16' if bf16 else 'fp32'})": cb * P_t / n}
    if cfg.fsdp:   # gathered: the student's root (kept from forward to backward) and two blocks
        # (one computing, one prefetched); on top of that, the teacher's root during its forward,
        # or in backward the unsharded gradients of the root and a block with their fp32 copies
        # for the reduce-scatter, whichever is larger
        rows["FSDP gathered weights and gradients"] = cb * (root_s + 2 * block) \
            + max(cb * root_t, (cb + 4 * bf16) * (root_s + block))
    else:
        if bf16:
            rows["bf16 weight copies (autocast)"] = 2 * P_s
        if nproc > 1:
            rows["DDP gradient buckets (fp32)"] = 4 * P_s
    L = cfg.seq_len + n_regions(cfg) * (cfg.k - 1)                # packed length at k = k_max
    per_block = mb * L * cb * block_activations(s)
    rows["activations" + (" (--grad-ckpt)" if cfg.grad_ckpt else "")] = \
        mb * L * cb * s["layers"] * s["D"] + per_block if cfg.grad_ckpt else s["layers"] * per_block
    # student logits (bf16 + the fp32 copy the loss keeps, its fp32 gradient), the <MTP>-masked
    # fp32 readout and the teacher's logits: ~16 bytes per vocabulary entry per position in bf16
    positions = mb * (L if cfg.prefix_loss else n_regions(cfg) * cfg.k)
    rows["logits"] = positions * V_s * (16 if bf16 else 12)
    return rows, {"params": P_s, "teacher_params": P_t, "packed_len": L, "micro_batch": mb}


MOST_GIB = 1_000_000     # --gpu-mem at most: no GPU comes near it; inf or 1e300 overflow the sums


def format_plan(hf, cfg, nproc=1, gpu_mem=80.0):
    """The report: one line per item, the total, and whether it fits in gpu_mem GiB."""
    rows, info = memory_plan(hf, cfg, nproc)
    total = sum(rows.values())
    budget = 0.9 * gpu_mem * 2**30         # 10% kept for the CUDA context, NCCL, fragmentation
    # everything but activations and logits is fixed; those two grow linearly with micro-batch
    one, _ = memory_plan(hf, cfg, nproc, micro_batch=1)
    per_seq = sum(v for k, v in one.items() if k.startswith(("activations", "logits")))
    largest = int((budget - (sum(one.values()) - per_seq)) // per_seq)
    mode = f"FSDP over {nproc}" if cfg.fsdp else (f"DDP x{nproc}" if nproc > 1 else "1 process")
    lines = [f"plan: {hf.get('model_type')} {info['params'] / 1e9:.2f}B parameters (student, with "
             f"<MTP>), {mode}, {'bf16 compute' if cfg.precision == 'auto' else 'fp32'} on CUDA; "
             f"micro-batch {info['micro_batch']} x packed length {info['packed_len']} "
             f"(N={cfg.seq_len}, M={n_regions(cfg)}, k_max={cfg.k})"
             + (", --grad-ckpt" if cfg.grad_ckpt else "")]
    lines += [f"  {name:<40} {v / 2**30:8.2f} GiB" for name, v in rows.items()]
    lines.append(f"  {'total per process':<40} {total / 2**30:8.2f} GiB")
    verdict = "fits" if total <= budget else "does NOT fit"
    most = f"largest micro-batch that fits: {largest}" if largest >= 1 else \
        f"no micro-batch fits: the rest alone takes {(total - per_seq * info['micro_batch']) / 2**30:.1f} GiB"
    lines.append(f"{verdict} in {gpu_mem:g} GiB (budget 90%: {budget / 2**30:.1f} GiB); {most}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description="GPU memory per process for a distill.py run, from "
                                "config.json alone", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_args(p, TrainConfig)
    p.add_argument("--nproc", type=int, default=1, help="the number of processes (GPUs)")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="GPU memory per process in GiB")
    a = vars(parse_with_recipe(p, RECIPES, argv))
    nproc, gpu_mem = a.pop("nproc"), a.pop("gpu_mem")
    a.pop("plan")                       # distill.py's pointer to this tool; here it is the plan
    cfg = TrainConfig(**a)
    try:
        if nproc < 1 or not 0 < gpu_mem <= MOST_GIB:
            raise ConfigError(f"--nproc must be >= 1 and --gpu-mem a GPU's memory in GiB, above 0 "
                              f"and at most {MOST_GIB:,} (got {nproc}, {gpu_mem})")
        if cfg.pretrain:
            raise ConfigError("the plan estimates a distillation run (student + teacher), not --pretrain")
        check_config(cfg)
        path = os.path.join(cfg.init or DEFAULT_TEACHER, "config.json")
        if not os.path.isfile(path):
            raise ConfigError(f"the plan reads {path}, which does not exist: pass --init DIR, a "
                              "local directory with the checkpoint's config.json (no weights needed)")
        print(format_plan(read_config(os.path.dirname(path)).hf, cfg, nproc, gpu_mem))
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
