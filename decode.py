"""
Multi-token decoding from an MTP checkpoint with a KV cache (METHOD.md, "Inference").

    python decode.py --ckpt runs/mtp-synth/ckpt --prompt "Ava has 12 apples. ..." --tau 0.9 --viz
    python decode.py --ckpt DIR --prompt "..." --static-k 3
    python decode.py --ckpt DIR --prompt "..." --tau 0.9 --viz-html chunks.html --device cuda

Each step feeds the newly accepted tokens plus k_max-1 <MTP> tokens, reads k_max candidates from
one forward pass, accepts a leading run of them (static k, or ConfAdapt: all top-1 probabilities
above tau), and pops the <MTP> entries from the cache; accepted tokens enter the cache as inputs of
the next step, so after every step the cache holds real tokens only.
"""
import argparse
import html
import sys
import time
from collections import Counter

import torch

from data import TokenizerError, load_tokenizer, plain_prompt
from model import CheckpointError, KVCache, Transformer


class DecodeError(ValueError):
    """Bad decoding input: the message names the problem and the fix."""


# -----------------------------------------------------------------------------
# Acceptance rules: how many of the k_max candidates one pass emits


def accept_static(conf, k):
    """Static k: the first k candidates every pass. conf (..., k_max) -> counts (...)."""
    return torch.full(conf.shape[:-1], min(k, conf.size(-1)), dtype=torch.long, device=conf.device)


def accept_confadapt(conf, tau):
    """ConfAdapt(tau): the longest leading run of candidates whose top-1 probability is > tau,
    and at least one (the first candidate is an ordinary next-token prediction)."""
    run = (conf > tau).long().cumprod(-1).sum(-1)
    return run.clamp(min=1)


# -----------------------------------------------------------------------------
# Timing: CUDA events around exactly each forward on the GPU, the host clock on the CPU


class PassTimer:
    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.pending, self.ms = [], []

    def __enter__(self):
        if self.cuda:
            self.start = torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.pending.append((self.start, end))
        else:
            self.ms.append(1000 * (time.perf_counter() - self.t0))

    def times(self):
        """Milliseconds per timed pass (synchronizes once, at the end, on CUDA)."""
        if self.pending:
            torch.cuda.synchronize()
            self.ms += [s.elapsed_time(e) for s, e in self.pending]
            self.pending = []
        return self.ms


# -----------------------------------------------------------------------------
# Generation: prefill and every later step are the same call, `step`


def check_request(model, prompt_ids, static_k, tau, k_max):
    """Validate a request; returns the number of candidates read per pass."""
    cfg = model.cfg
    if len(prompt_ids) == 0:
        raise DecodeError("the prompt is empty: give at least one token")
    if len(prompt_ids) >= cfg.max_seq_len:
        raise DecodeError(f"the prompt has {len(prompt_ids)} tokens; the model's context is "
                          f"{cfg.max_seq_len}: shorten it")
    if (static_k is None) == (tau is None):
        raise DecodeError("choose one rule: static_k (static k) or tau (ConfAdapt)")
    if tau is not None and not 0.0 <= tau <= 1.0:
        raise DecodeError(f"tau must be in [0, 1], got {tau}")
    if static_k is not None and static_k < 1:
        raise DecodeError(f"static k must be >= 1, got {static_k}")
    if k_max is not None and k_max < 1:
        raise DecodeError(f"k_max must be >= 1, got {k_max}")
    n = static_k if static_k is not None else (k_max or cfg.mtp_k_max or 4)
    if n > 1 and cfg.mtp_token_id is None:
        raise DecodeError(f"this checkpoint has no <MTP> token, so it predicts one token per pass; "
                          f"k={n} needs a model trained by distill.py (or use static k=1)")
    return n


@torch.no_grad()
def generate(model, prompt_ids, max_new_tokens=256, static_k=None, tau=None, k_max=None,
             stop_ids=(), stop_fn=None, timer=None):
    """Greedy multi-token generation from one prompt.

    static_k: accept exactly k tokens per pass; tau: ConfAdapt(tau) over k_max candidates
    (k_max from the checkpoint's config, `mtp_k_max`, unless given). stop_fn(ids) -> bool ends
    generation after a pass (e.g. a stop string in the text). Returns (new token ids,
    stats): passes, tokens, effective_k, per-pass accepted counts and top-1 confidences, the
    time of each forward (ms), their sum (forward_ms), and the whole call's wall time (wall_ms,
    which tokens_per_s uses).
    """
    n_cand = check_request(model, prompt_ids, static_k, tau, k_max)
    if max_new_tokens < 1:
        raise DecodeError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    t_start = time.perf_counter()
    device, mtp = model.device, model.cfg.mtp_token_id
    timer = timer or PassTimer(device)
    cache = KVCache()
    new = torch.tensor(prompt_ids, device=device)          # tokens entering the cache this pass
    out, accepted, confs, cache_lens = [], [], [], []
    truncated = False
    stops = torch.tensor(sorted(stop_ids), device=device, dtype=torch.long)
    while len(out) < max_new_tokens:
        room = model.cfg.max_seq_len - len(cache) - len(new)  # context left for candidates
        n = min(n_cand, room, max_new_tokens - len(out))
        if n < 1:                                            # the context is full
            truncated = len(out) < max_new_tokens
            break
        x = torch.cat([new, torch.full((n - 1,), mtp if n > 1 else 0, device=device)])
        with timer:
            logits = model(x[None], cache=cache)[0, len(new) - 1:]   # (n, V): the n candidates
        if mtp is not None:
            logits[:, mtp] = -torch.inf                             # <MTP> is never an output
        probs = logits.float().softmax(-1)
        conf, cand = probs.max(-1)                                   # (n,), (n,)
        # the acceptance rule, applied
        take = int(accept_static(conf, static_k) if static_k is not None
                   else accept_confadapt(conf, tau))
        cache.truncate(len(cache) - (n - 1))                         # pop the <MTP> entries
        chunk = cand[:take]
        hit = torch.isin(chunk, stops).nonzero()
        if len(hit):                                                 # a stop token: trim after it
            chunk = chunk[:int(hit[0]) + 1]
        out += chunk.tolist()
        accepted.append(len(chunk))
        confs.append([round(c, 4) for c in conf.tolist()])
        cache_lens.append(len(cache))
        new = chunk
        if len(hit) or (stop_fn is not None and stop_fn(out)):
            break
    ms = timer.times()                                # synchronizes on CUDA
    wall = 1000 * (time.perf_counter() - t_start)      # everything: forwards, softmax, accept
    total = sum(ms[-len(accepted):]) if accepted else 0.0
    stats = {"passes": len(accepted), "tokens": len(out),
             "effective_k": len(out) / max(1, len(accepted)), "accepted": accepted,
             "histogram": dict(sorted(Counter(accepted).items())), "confidences": confs,
             "cache_lens": cache_lens, "ms": ms[-len(accepted):] if accepted else [],
             "forward_ms": total, "wall_ms": wall, "tokens_per_s": 1000 * len(out) / wall,
             "stopped": bool(out) and out[-1] in set(stop_ids), "context_full": truncated}
    return out, stats


# -----------------------------------------------------------------------------
# Showing the chunks: one colour per pass, by how many tokens it emitted

COLOURS = ["", "\033[48;5;153m", "\033[48;5;157m", "\033[48;5;229m", "\033[48;5;223m",
           "\033[48;5;217m", "\033[48;5;183m"]
HTML_COLOURS = ["#ffffff", "#cfe4ff", "#d4f7d4", "#fff5b8", "#ffe0b8", "#ffc4c4", "#e6ccff"]


def chunks(tok, out, accepted):
    pieces, i = [], 0
    for n in accepted:
        pieces.append((tok.decode(out[i:i + n]), n))
        i += n
    return pieces


def viz_terminal(pieces):
    return "".join(f"{COLOURS[min(n, len(COLOURS) - 1)]}{text}\033[0m" for text, n in pieces)


def viz_html(pieces, title):
    spans = "".join(f'<span title="{n} tokens" style="background:{HTML_COLOURS[min(n, 6)]}">'
                    f"{html.escape(text)}</span>" for text, n in pieces)
    legend = " ".join(f'<span style="background:{c}">&nbsp;{i} tokens&nbsp;</span>'
                      for i, c in enumerate(HTML_COLOURS) if i)
    return (f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<body style='font-family:monospace'><p>{legend}</p>"
            f"<pre style='white-space:pre-wrap'>{spans}</pre></body>")


# -----------------------------------------------------------------------------
# CLI


def main(argv=None):
    p = argparse.ArgumentParser(description="Multi-token decoding from an MTP checkpoint")
    p.add_argument("--ckpt", required=True, help="checkpoint directory (HF layout + tokenizer)")
    p.add_argument("--prompt", required=True, help="the question / prompt text")
    rule = p.add_mutually_exclusive_group()
    rule.add_argument("--tau", type=float, help="ConfAdapt threshold (default 0.9)")
    rule.add_argument("--static-k", type=int, help="accept exactly k tokens per pass")
    p.add_argument("--k-max", type=int, help="candidates per pass for ConfAdapt (default: the checkpoint's)")
    p.add_argument("--max-new", type=int, default=256, help="most new tokens")
    p.add_argument("--format", choices=["auto", "qa", "chat", "raw"], default="auto",
                   help="auto: the tokenizer's chat format if it has one, else 'Q: ...\\nA:'")
    p.add_argument("--device", default="cpu")
    p.add_argument("--viz", action="store_true", help="colour each pass's chunk by its size")
    p.add_argument("--viz-html", help="write the coloured chunks to this HTML file")
    p.add_argument("--no-baseline", action="store_true", help="skip the k=1 run for the speedup")
    a = p.parse_args(argv)
    try:
        model = Transformer.from_pretrained(a.ckpt, device=a.device).eval()
        tok = load_tokenizer(a.ckpt)
        fmt = a.format if a.format != "auto" else ("chat" if tok.chat else "qa")
        if fmt == "chat" and not tok.chat:
            raise DecodeError("this tokenizer has no chat format: use --format qa or raw")
        ids = {"chat": lambda t: tok.prompt(t), "qa": lambda t: tok.encode(plain_prompt(t)),
               "raw": tok.encode}[fmt](a.prompt) if a.prompt else []
        rule = {"static_k": a.static_k} if a.static_k is not None \
            else {"tau": 0.9 if a.tau is None else a.tau}
        kw = dict(max_new_tokens=a.max_new, k_max=a.k_max, stop_ids=tok.stop_ids)
        generate(model, ids, **{**kw, "max_new_tokens": 8}, **rule)            # warm-up, discarded
        out, st = generate(model, ids, **kw, **rule)
    except (DecodeError, CheckpointError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    pieces = chunks(tok, out, st["accepted"])
    print(viz_terminal(pieces) if a.viz else tok.decode(out))
    name = f"static k={a.static_k}" if a.static_k is not None else f"ConfAdapt tau={rule['tau']}"
    print(f"\n[{name}] {st['tokens']} tokens in {st['passes']} passes: effective k "
          f"{st['effective_k']:.2f}, histogram {st['histogram']}, {st['forward_ms'] / st['passes']:.1f} "
          f"ms/pass, {st['tokens_per_s']:.1f} tokens/s on {a.device}")
    if not a.no_baseline:
        _, base = generate(model, ids, static_k=1, **kw)
        print(f"[static k=1] {base['tokens']} tokens, {base['tokens_per_s']:.1f} tokens/s: "
              f"wall-clock speedup {st['tokens_per_s'] / base['tokens_per_s']:.2f}x")
    if a.viz_html:
        with open(a.viz_html, "w") as f:
            f.write(viz_html(pieces, name))
        print(f"wrote {a.viz_html}")


if __name__ == "__main__":
    main()
