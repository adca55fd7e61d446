"""
Decoding speed at batch 1: our static k=1 greedy decoding (eager, CUDA graphs, torch.compile +
CUDA graphs) against stock Hugging Face transformers `generate` (greedy), with the same weights,
prompt, dtype and device, in the same process.

    python -m tools.bench_decode --ckpt checkpoints/smollm2-135m-instruct --device cuda --dtype bf16
    python -m tools.bench_decode --ckpt checkpoints/synth-teacher --engines eager --max-new 64   # CPU

Every run generates exactly --max-new tokens (no stop token), so tokens/s compare the same work:
the prefill and --max-new - 1 one-token passes. Each engine is warmed up first (one full run:
allocation, kernel choice, graph capture, compilation), reported apart; then --repeats runs are
timed on the host clock after a device synchronize at both ends, and the median is reported.
transformers is optional: without it the HF row is skipped with a message. Prints a markdown
table, then one JSON line.
"""
import argparse
import json
import statistics
import sys
import time

import torch

from compat.tokenizers import TokenizerError, load_tokenizer
from data import prompt_ids
from decode import (DecodeError, Static, check_output_path, generate, load_for_decoding,
                    make_engine, resolve_device)
from model import CheckpointError

DEFAULT_PROMPT = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many "
                  "clips in May. How many clips did Natalia sell altogether in April and May?")


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_runs(fn, repeats, device):
    """(warm-up seconds, [seconds of each timed run], output of the last run)."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    warm = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return warm, times, out


def ours(model, ids, n, engine, capacity):
    """Our static k=1 decode with a fresh engine's cache each run (graphs are kept: one engine)."""
    run = make_engine(model, 1, engine, capacity)
    return lambda: generate(model, ids, Static(1), max_new_tokens=n, engine=run)[0]


def hf_generate(path, ids, n, device, dtype):
    """Stock transformers: AutoModelForCausalLM.generate, greedy, exactly n new tokens."""
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    x = torch.tensor([ids], device=device)

    @torch.no_grad()
    def run():
        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                          min_new_tokens=n, do_sample=False, num_beams=1, pad_token_id=0)
        return out[0, len(ids):].tolist()
    return run


def common_prefix(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main(argv=None):
    p = argparse.ArgumentParser(description="batch-1 decoding speed: ours vs transformers")
    p.add_argument("--ckpt", required=True, help="checkpoint directory (HF layout + tokenizer)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="question, in the tokenizer's chat "
                   "format if it has one, else 'Q: ...\\nA:'")
    p.add_argument("--max-new", type=int, default=256, help="tokens generated per run")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default="bf16", help="fp32 | bf16 (both sides)")
    p.add_argument("--engines", default="eager,graphs,compile",
                   help="ours: eager, graphs (CUDA graphs), compile (torch.compile + graphs)")
    p.add_argument("--no-hf", action="store_true", help="skip transformers")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per row (median)")
    p.add_argument("--out", help="also write the JSON line to this file")
    a = p.parse_args(argv)
    try:
        if a.max_new < 1 or a.repeats < 1:
            raise DecodeError("--max-new and --repeats must be >= 1")
        if a.out:
            check_output_path(a.out, "--out")
        a.device = resolve_device(a.device)
        model = load_for_decoding(a.ckpt, a.device, a.dtype)
        tok = load_tokenizer(a.ckpt)
        ids = prompt_ids(tok, a.prompt)
        capacity = len(ids) + a.max_new + 1
        if capacity > model.cfg.max_seq_len:
            raise DecodeError(f"prompt ({len(ids)} tokens) + --max-new {a.max_new} exceeds the "
                              f"context ({model.cfg.max_seq_len}): lower --max-new or give a "
                              "shorter --prompt")
        runs = {f"ours, {e}": ours(model, ids, a.max_new, e, capacity)
                for e in a.engines.split(",") if e}
        for name in runs:                        # bad engine names fail before any timing
            make_engine(model, 1, name.split(", ")[1], capacity)
    except (DecodeError, CheckpointError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if not a.no_hf:
        try:
            runs["transformers generate"] = hf_generate(a.ckpt, ids, a.max_new, a.device,
                                                        model.embed.weight.dtype)
        except ImportError:
            print("transformers is not installed: no HF row (pip install transformers)")

    rows, reference = [], None
    for name, fn in runs.items():
        warm, times, out = timed_runs(fn, a.repeats, a.device)
        reference = reference or out             # ours first: the others are compared with it
        med = statistics.median(times)
        rows.append({"run": name, "warmup_s": warm, "median_s": med, "tokens": len(out),
                     "tokens_per_s": len(out) / med, "same_prefix": common_prefix(out, reference)})
    base = next((r for r in rows if r["run"] == "transformers generate"), None)
    device = torch.cuda.get_device_name() if a.device.startswith("cuda") else \
        f"CPU ({torch.get_num_threads()} threads)"
    print(f"{device} | {a.ckpt} | {a.dtype} | batch 1 | prompt {len(ids)} tokens | "
          f"{a.max_new} new tokens | median of {a.repeats} runs after one warm-up\n")
    print("| run | tokens/s | ms/token | vs transformers | warm-up s | same tokens as ours, eager |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        vs = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        print(f"| {r['run']} | {r['tokens_per_s']:.1f} | {1000 / r['tokens_per_s']:.2f} | {vs} | "
              f"{r['warmup_s']:.1f} | {r['same_prefix']}/{r['tokens']} |")
    line = json.dumps({"device": device, "ckpt": a.ckpt, "dtype": a.dtype, "prompt_tokens": len(ids),
                       "max_new": a.max_new, "rows": rows})
    print(line)
    if a.out:
        try:
            with open(a.out, "w") as f:
                f.write(line + "\n")
        except OSError as e:             # checked before the work, so: a full disk, a folder gone
            print(f"error: could not write {a.out}: {e.strerror}", file=sys.stderr)
            sys.exit(2)
    return rows


if __name__ == "__main__":
    main()
