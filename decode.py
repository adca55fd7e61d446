"""
Multi-token decoding from an MTP checkpoint with a KV cache (METHOD.md, "Inference").

    python decode.py --ckpt runs/mtp-synth/ckpt --prompt "Ava has 12 apples. ..." --tau 0.9 --viz
    python decode.py --ckpt DIR --prompt "..." --static-k 3
    python decode.py --ckpt DIR --prompt "..." --tau 0.9 --viz-html chunks.html --device cuda

Each step feeds the newly accepted tokens plus k_max-1 <MTP> tokens, reads k_max candidates from
one forward pass, accepts a leading run of them (static k, or ConfAdapt: all top-1 probabilities
above tau), and pops the <MTP> entries from the cache; accepted tokens enter the cache as inputs of
the next step, so after every step the cache holds real tokens only. generate_batch decodes
several prompts in one forward per step; the cache then also holds padding that no one attends to.
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
# Generation: prefill and every later step are the same forward, for a batch of prompts


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


def step_layout(new, n_real, n_row, mtp):
    """The input of one batched pass: each row's new tokens right-padded to the widest row, then
    n-1 <MTP> slots (a row that reads n_b < n candidates pads the rest).

    new: B token tensors (empty for a finished row); n_real: real tokens each row has cached;
    n_row: candidates each row reads (0 if finished). Returns idx and pos (B, T), is_new (B, W)
    (the slots that stay in the cache as real tokens), real (B, T) (the slots that are not
    padding) and out_idx (B, n): where each row's candidates are read, its last new token and
    then its masks.
    """
    B, device = len(new), new[0].device
    W, n = max(len(x) for x in new), max(n_row)
    lens = torch.tensor([len(x) for x in new], device=device)[:, None]       # (B, 1)
    start = torch.tensor(n_real, device=device)[:, None]
    col = torch.arange(W + n - 1, device=device)[None]                         # (1, T)
    is_new = col < lens
    is_mask = (col >= W) & (col < W + torch.tensor(n_row, device=device)[:, None] - 1)
    # each row's positions continue its own real tokens; its masks follow its last new token
    pos = torch.where(is_new, start + col, torch.where(is_mask, start + lens + col - W, 0))
    idx = torch.cat([torch.nn.utils.rnn.pad_sequence(new, batch_first=True),   # pad id 0
                     torch.full((B, n - 1), mtp if n > 1 else 0, device=device)], 1)
    out_idx = torch.cat([(lens - 1).clamp(min=0), col[:, W:].expand(B, -1)], 1)
    return idx, pos, is_new[:, :W], is_new | is_mask, out_idx


def step_mask(cached, real):
    """(B, T, S) attention mask: a real slot sees its row's real cached slots and, causally, its
    row's real slots of this pass; padding is seen by no one and sees only itself (a query with
    no key at all would give NaN). cached: (B, L) real-slot flags of the cache, real: (B, T)."""
    T = real.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=real.device).tril()
    eye = torch.eye(T, dtype=torch.bool, device=real.device)
    old = cached[:, None, :] & real[:, :, None]                               # (B, T, L)
    fresh = causal & real[:, :, None] & real[:, None, :] | eye                # (B, T, T)
    return torch.cat([old, fresh], -1)


@torch.no_grad()
def generate_batch(model, prompts, max_new_tokens=256, static_k=None, tau=None, k_max=None,
                   stop_ids=(), stop_fn=None, timer=None):
    """Greedy multi-token generation from several prompts at once: one forward per step for all
    of them, each row accepting its own number of tokens.

    static_k: accept exactly k tokens per pass; tau: ConfAdapt(tau) over k_max candidates
    (k_max from the checkpoint's config, `mtp_k_max`, unless given). stop_fn(ids) -> bool ends a
    row after a pass (e.g. a stop string in the text). Returns (new token ids per prompt,
    stats): passes (forwards of the batch), tokens (all rows), the time of each forward (ms),
    their sum (forward_ms), the whole call's wall time (wall_ms, which tokens_per_s uses), and
    rows: per prompt its passes, tokens, effective_k, per-pass accepted counts and top-1
    confidences, its real cached tokens before each pass's accepted ones (cache_lens), stopped
    and context_full.

    All rows share one KVCache. A row's shorter input leaves padding slots in it, which the mask
    hides from everyone: every non-pad slot of a row is a real token of that row. A finished row
    stays in the batch as padding (dropping it would mean slicing every layer's cache).
    """
    if not prompts:
        raise DecodeError("no prompts: give at least one")
    n_cand = max(check_request(model, p, static_k, tau, k_max) for p in prompts)  # all the same
    if max_new_tokens < 1:
        raise DecodeError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    t_start = time.perf_counter()
    device, mtp, B = model.device, model.cfg.mtp_token_id, len(prompts)
    timer = timer or PassTimer(device)
    cache = KVCache()
    cached = torch.zeros(B, 0, dtype=torch.bool, device=device)  # (B, L): slot is a real token
    new = [torch.tensor(p, device=device) for p in prompts]  # tokens entering the cache; empty: done
    n_real = [0] * B                                         # real tokens each row has cached
    outs = [[] for _ in range(B)]
    rows = [{"accepted": [], "confidences": [], "cache_lens": [], "context_full": False}
            for _ in range(B)]
    stops, passes = set(stop_ids), 0
    while True:
        n_row = []                                 # candidates each row reads; 0: finished
        for b in range(B):
            room = model.cfg.max_seq_len - n_real[b] - len(new[b])  # context left for candidates
            n_b = min(n_cand, room, max_new_tokens - len(outs[b]))
            if len(new[b]) and n_b < 1:                              # the context is full
                rows[b]["context_full"], new[b] = True, new[b][:0]
            n_row.append(n_b if len(new[b]) else 0)
        if not any(n_row):
            break
        if B == 1:   # nothing to pad: skip the layout, whose small ops cost ~10% of a tiny pass
            w, n = len(new[0]), n_row[0]
            idx = torch.cat([new[0], torch.full((n - 1,), mtp if n > 1 else 0, device=device)])[None]
            with timer:
                logits = model(idx, cache=cache, out_idx=torch.arange(w - 1, w + n - 1,
                                                                      device=device)[None])
            cache.truncate(len(cache) - (n - 1))                     # pop the <MTP> slots
        else:
            idx, pos, is_new, real, out_idx = step_layout(new, n_real, n_row, mtp)
            padded = not (real.all() and cached.all())
            # no padding: the model's own causal mask and positions
            mask, pos = (step_mask(cached, real), pos) if padded else (None, None)
            with timer:
                logits = model(idx, pos=pos, mask=mask, cache=cache, out_idx=out_idx)  # (B, n, V)
            cache.truncate(cached.size(1) + is_new.size(1))         # pop the <MTP> slots
            cached = torch.cat([cached, is_new], 1)
        passes += 1
        if mtp is not None:
            logits[..., mtp] = -torch.inf                            # <MTP> is never an output
        conf, cand = logits.float().softmax(-1).max(-1)              # (B, n), (B, n)
        # the acceptance rule, applied to each row's own n_b candidates
        take = (accept_static(conf, static_k) if static_k is not None
                else accept_confadapt(conf, tau))
        take = take.clamp(max=torch.tensor(n_row, device=device)).tolist()
        conf_l, cand_l = conf.tolist(), cand.tolist()
        for b in range(B):
            if not n_row[b]:
                continue
            n_real[b] += len(new[b])
            chunk = cand_l[b][:take[b]]
            hit = next((i for i, t in enumerate(chunk) if t in stops), None)
            if hit is not None:                                      # a stop token: trim after it
                chunk = chunk[:hit + 1]
            outs[b] += chunk
            rows[b]["accepted"].append(len(chunk))
            rows[b]["confidences"].append([round(c, 4) for c in conf_l[b][:n_row[b]]])
            rows[b]["cache_lens"].append(n_real[b])
            done = (hit is not None or len(outs[b]) >= max_new_tokens
                    or (stop_fn is not None and stop_fn(outs[b])))
            new[b] = cand[b, :0 if done else len(chunk)]
    ms = timer.times()[-passes:]   # synchronizes on CUDA; passes >= 1: every prompt has room
    wall = 1000 * (time.perf_counter() - t_start)      # everything: forwards, softmax, accept
    for out, r in zip(outs, rows):
        r.update(passes=len(r["accepted"]), tokens=len(out),
                 effective_k=len(out) / max(1, len(r["accepted"])),
                 histogram=dict(sorted(Counter(r["accepted"]).items())),
                 stopped=bool(out) and out[-1] in stops)
    tokens = sum(len(out) for out in outs)
    stats = {"passes": passes, "tokens": tokens, "ms": ms, "forward_ms": sum(ms), "wall_ms": wall,
             "tokens_per_s": 1000 * tokens / wall, "rows": rows}
    return outs, stats


def generate(model, prompt_ids, max_new_tokens=256, static_k=None, tau=None, k_max=None,
             stop_ids=(), stop_fn=None, timer=None):
    """Greedy multi-token generation from one prompt: generate_batch with a batch of one.

    Returns (new token ids, stats): the batch's timing stats (passes, ms, forward_ms, wall_ms,
    tokens_per_s) and the row's (tokens, effective_k, accepted, histogram, confidences,
    cache_lens, stopped, context_full) in one dict.
    """
    outs, st = generate_batch(model, [prompt_ids], max_new_tokens, static_k, tau, k_max,
                              stop_ids, stop_fn, timer)
    return outs[0], {**st.pop("rows")[0], **st}


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
