"""
What distill.py's log says: each log interval's sums (train_step adds to them), the interval's
record from every rank's sums, and its line on stdout and in OUT/log.jsonl; a warning's line.

    step 40/800 | loss 1.2345 | lr 3.00e-04 | 512 ms/step | 2100 sup tok/s | ETA 6:49
        conf@j 0.91 0.80 0.72 | agree@j 0.88 0.71 0.60
"""
import json
import sys
import time

import torch
import torch.distributed as dist


def warn(line):
    """A warning: the input was usable but surprising, in one line on stderr."""
    print(f"warning: {line}", file=sys.stderr, flush=True)


def fresh_stats(k):
    """What a log interval sums up, from its first step on: the steps' losses, their count,
    supervised tokens, and per MTP position j the top-1 confidence, agreement with the target
    and the number of supervised positions (length k: k_max)."""
    return {"loss": 0.0, "n": 0, "tokens": 0.0, "conf": torch.zeros(k), "agree": torch.zeros(k),
            "count": torch.zeros(k), "t0": time.perf_counter(), "lr": 0.0}


def interval_record(cfg, acc, step, world, device):
    """The log record of the steps since the last one, from every rank's statistics, not only
    rank 0's (a collective: every rank calls this)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    if world > 1:
        packed = torch.cat([torch.tensor([acc["loss"], acc["tokens"]]), acc["conf"],
                            acc["agree"], acc["count"]]).to(device)
        dist.all_reduce(packed)
        packed = packed.cpu()
        acc["loss"], acc["tokens"] = packed[0].item() / world, packed[1].item()
        acc["conf"], acc["agree"], acc["count"] = packed[2:].split(len(acc["conf"]))
    dt = time.perf_counter() - acc["t0"]
    rec = {"step": step, "loss": acc["loss"] / acc["n"], "lr": acc["lr"],
           "step_ms": 1000 * dt / acc["n"], "sup_tok_per_s": acc["tokens"] / dt}
    if not cfg.pretrain:
        has = acc["count"] > 0
        rec["conf"] = [round(float(c / n), 4) if h else None
                       for c, n, h in zip(acc["conf"], acc["count"], has)]
        rec["agree"] = [round(float(a / n), 4) if h else None
                        for a, n, h in zip(acc["agree"], acc["count"], has)]
    return rec


def write_log(rec, total, eta, log):
    """One record: a line or two on stdout, one line in log.jsonl."""
    line = (f"step {rec['step']}/{total} | loss {rec['loss']:.4f} | lr {rec['lr']:.2e} | "
            f"{rec['step_ms']:.0f} ms/step | {rec['sup_tok_per_s']:.0f} sup tok/s | "
            f"ETA {int(eta // 60)}:{int(eta % 60):02d}")
    if "agree" in rec:
        fmt = lambda xs: " ".join("-" if x is None else f"{x:.2f}" for x in xs)
        line += f"\n    conf@j {fmt(rec['conf'])} | agree@j {fmt(rec['agree'])}"
    print(line, flush=True)
    log.write(json.dumps(rec, allow_nan=False) + "\n")     # bare NaN is not JSON
    log.flush()
