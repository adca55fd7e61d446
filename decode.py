"""
Multi-token decoding from an MTP checkpoint with a KV cache (docs/METHOD.md, "Inference").

    python decode.py --ckpt runs/mtp-synth/ckpt --prompt "Ava has 12 apples. ..." --tau 0.9 --viz
    python decode.py --ckpt DIR --prompt "..." --static-k 3
    python decode.py --ckpt DIR --prompt "..." --tau 0.9 --verify      # output == static k=1
    python decode.py --ckpt DIR --prompt "..." --tau 0.9 --verify --temperature 0.7 --top-p 0.9
    python decode.py --ckpt DIR --prompt "..." --device cuda --dtype bf16 --engine graphs

Each pass feeds the newly accepted tokens plus k_max-1 <MTP> tokens, reads k_max candidates from
one forward pass, accepts a leading run of them (static k, or ConfAdapt: all top-1 probabilities
above tau), and pops the <MTP> entries from the cache; accepted tokens enter the cache as inputs of
the next pass, so after every pass the cache holds real tokens only. `generate` does this for one
prompt in one short loop (read it first); `generate_batch` decodes several prompts in one forward
per pass, and is tested equal to it. With --verify the tokens accepted from <MTP> slots are
provisional until the next pass confirms them (docs/METHOD.md, "Verified mode"); --lean reads
fewer candidates where few are accepted. --temperature (with --top-k, --top-p, --seed) samples
every candidate from its slot's processed distribution instead of taking the argmax; verified,
the output is then distributed exactly as one-token-at-a-time sampling's (docs/METHOD.md,
"Sampling"). On a GPU, --engine graphs replays each pass from a CUDA graph over a static cache
(fast/cuda_graphs.py).
"""
import argparse
import hashlib
import html
import os
import statistics
import sys
import time
from collections import Counter

import torch

from data import plain_prompt

from compat.tokenizers import check_vocab, load_tokenizer, TokenizerError
from model import CheckpointError, KVCache
from compat.hf import from_pretrained


class DecodeError(ValueError):
    """Bad decoding input: the message names the problem and the fix."""


# -----------------------------------------------------------------------------
# Acceptance rules: how many of the k_max candidates one pass emits


def accept_static(conf, k):
    """Static k: the first k candidates every pass. conf (..., k_max) -> counts (...)."""
    return torch.full(conf.shape[:-1], min(k, conf.size(-1)), dtype=torch.long, device=conf.device)


def accept_confadapt(conf, tau):
    """ConfAdapt(tau): the longest leading run of candidates whose top-1 probability is > tau,
    and at least one (the first candidate is an ordinary next-token prediction).

    The confidence (readout) is the top-1 probability of the slot's distribution: of the softmax
    when greedy (temperature 0, as ever), of the processed distribution when sampling, never
    the sampled token's own probability. Under verification that matters: whether a slot's
    draft is proposed must not depend on which token was drawn there, or the proposed token is
    no longer distributed as q and the ratio test is biased (q = (0.8, 0.2), p = (0.5, 0.5),
    tau = 0.5: proposing only a likely draw commits token 0 with probability 0.6, not 0.5). The
    top-1 probability is known before the draw, and says how peaked the slot is: how likely its
    draws, and the drafts behind them, are to be the ones the next pass would make."""
    run = (conf > tau).long().cumprod(-1).sum(-1)
    return run.clamp(min=1)


# -----------------------------------------------------------------------------
# Sampling: the processed distribution, the draw, and the check of a sampled draft
# (docs/METHOD.md, "Sampling"). Every random number is a uniform from a row's own CPU generator


def process(logits, temperature, top_k=0, top_p=1.0, mtp=None):
    """The distribution a candidate is drawn from: logits (..., V) divided by the temperature,
    cut to the top_k most likely tokens (0: no cut; ties at the k-th are kept), softmax, cut to
    the smallest set of most likely tokens holding probability top_p (1: no cut), renormalised.
    Returns fp32 probabilities (..., V). <MTP> (id mtp, when given; the decoders have set its
    logit to -inf already) is never an output. temperature 0 is greedy: one-hot at the argmax,
    the limit as the temperature goes to 0 (with it verify_sampled is greedy verification)."""
    logits = logits.float()
    if mtp is not None:
        logits = logits.index_fill(-1, torch.tensor([mtp], device=logits.device), -torch.inf)
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.size(-1)).float()
    logits = logits / temperature
    if 0 < top_k < logits.size(-1):
        kth = logits.topk(top_k, -1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    probs = logits.softmax(-1)
    if top_p < 1.0:
        ranked, order = probs.sort(dim=-1, descending=True, stable=True)
        before = ranked.cumsum(-1) - ranked              # the mass of the more likely tokens
        drop = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, before >= top_p)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def draw(probs, u):
    """Inverse-CDF draw: the token whose interval of the cumulative distribution holds u.
    probs (..., V), non-negative, need not sum to 1; u (...) uniforms in [0, 1). The same u
    draws the same token on any device (up to the rounding of probs); a token of probability
    0 is never drawn."""
    c = probs.double().cumsum(-1)                                     # (..., V)
    v = (u.to(c.device, torch.float64) * c[..., -1])[..., None].contiguous()
    i = torch.searchsorted(c, v, right=True)[..., 0]
    last = ((probs > 0) * torch.arange(probs.size(-1), device=probs.device)).amax(-1)
    return torch.minimum(i, last)                     # u * total rounded up to the total


def verify_sampled(x, q, p, u, u_fix, n):
    """Speculative sampling's check of provisional tokens, with the model as its own draft.

    x (..., m), m >= 1: provisional tokens, right-aligned: the last n (...) of the m columns are
    real, the columns before them padding; q (..., m, V): the processed distribution each was drawn
    from (its <MTP> slot's); p (..., m, V): the model's processed next-token distribution at
    its position, read by the pass that fed it; u (..., m), u_fix (...): uniforms. In order,
    x_j is confirmed iff u_j q(x_j) < p(x_j) (probability min(1, p/q)); at the first rejection
    the committed token is drawn from normalise(max(0, p - q)) there, and the rest is dropped.
    The committed token is then distributed as p whatever q is (Leviathan et al. 2023, Chen
    et al. 2023), if q is really what x was drawn from. Returns (r (...) confirmed, fix (...)
    the residual's draw, meaningless where r == n)."""
    m, V = x.size(-1), p.size(-1)
    qx, px = q.gather(-1, x[..., None])[..., 0], p.gather(-1, x[..., None])[..., 0]
    pad = torch.arange(m, device=x.device) < (m - n)[..., None]
    lead = ((u * qx < px) | pad).long().cumprod(-1).sum(-1)     # padding, then the confirmed run
    at = lead.clamp(max=m - 1)[..., None]                          # the first rejection's column
    p_at = p.gather(-2, at[..., None].expand(*at.shape, V))[..., 0, :]           # (..., V)
    q_at = q.gather(-2, at[..., None].expand(*at.shape, V))[..., 0, :]
    residual = (p_at - q_at).clamp(min=0)
    # p and q within rounding of each other can reject with an empty residual: p less x then
    fallback = p_at.scatter(-1, x.gather(-1, at), 0.0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, fallback)
    return lead - (m - n), draw(residual, u_fix)


def sampled_guesses(drafts, q_src, q_from, p, u, u_fix):
    """verify_sampled for a batch of rows. drafts: each row's provisional tokens; q_src
    (B, T, V): the processed distributions of the pass that drew them, row b's from column
    q_from[b] on; p (B, m, V), u (B, m): the distributions and uniforms for them, right-aligned
    in m columns; u_fix (B,). Returns per row the model's own tokens at its provisional tokens,
    what commit_row checks them against: the drafts it confirms, then the residual's draw."""
    B, m, V = p.shape
    x = [[0] * (m - len(d)) + d for d in drafts]                             # right-aligned
    at = [[0] * (m - len(d)) + list(range(f, f + len(d))) for d, f in zip(drafts, q_from)]
    at = torch.tensor(at, device=p.device)
    q = q_src.gather(1, at[..., None].expand(B, m, V))                       # (B, m, V)
    n = torch.tensor([len(d) for d in drafts], device=p.device)
    r, fix = verify_sampled(torch.tensor(x, device=p.device), q, p, u, u_fix, n)
    return [d[:rb] + [fb] for d, rb, fb in zip(drafts, r.tolist(), fix.tolist())]


def readout(logits, temperature, top_k, top_p, u):
    """Candidates from a pass's logits (..., V): (conf, cand, probs). Greedy (temperature 0):
    each slot's argmax and its softmax probability, probs None. Sampling: each drawn from its
    slot's processed distribution probs (process, draw with the uniforms u (...)), with the top-1
    probability of that distribution as its confidence (accept_confadapt says why)."""
    if temperature == 0:
        conf, cand = logits.float().softmax(-1).max(-1)
        return conf, cand, None
    probs = process(logits, temperature, top_k, top_p)
    return probs.amax(-1), draw(probs, u), probs


def row_seed(seed, *index):
    """The seed of one row's generator: a hash of (seed, index...), so that rows, problems and
    samples never share a stream, and any row can be run alone: row b of
    generate_batch(prompts, seed=s) is generate_batch([prompts[b]], seed=[row_seed(s, b)])."""
    digest = hashlib.blake2b(repr((seed,) + index).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def pass_uniforms(gen, pending, n):
    """One row's uniforms for a pass: one per logit it reads (its `pending` provisional tokens'
    ratio tests, then its max(n, 1) candidates), and one for a residual draw. A fixed count
    per pass, whatever happens, so a row's stream depends on its own passes only."""
    return torch.rand(pending + max(n, 1) + 1, generator=gen, dtype=torch.float64)


# -----------------------------------------------------------------------------
# One prompt: commit what a pass confirmed and accepted, the loop around it


def check_request(model, prompt_ids, static_k, tau, k_max, temperature=0.0, top_k=0, top_p=1.0):
    """Validate a request; returns the number of candidates read per pass."""
    cfg = model.cfg
    if not 0.0 <= temperature < float("inf"):
        raise DecodeError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if top_k < 0 or not 0.0 < top_p <= 1.0:
        raise DecodeError(f"top_k must be >= 0 (0: no cut) and top_p in (0, 1] (1: no cut), got "
                          f"{top_k} and {top_p}")
    if temperature == 0 and (top_k or top_p < 1.0):
        raise DecodeError("top_k and top_p cut a sampled distribution: set a temperature > 0")
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


def commit_row(new, pending, guess, cands, take, verify, stops):
    """One row's commit step after a pass: verification, then the acceptance rule's chunk.

    new: the tokens the pass fed, the last `pending` of them provisional (accepted from <MTP>
    slots by the pass before); guess: the model's own next token read at each provisional
    token's predecessor; cands: the candidates read (the prediction at the last new token, then
    the masks'), of which the rule accepts `take`. The longest provisional prefix that `guess`
    confirms is committed; at the first disagreement the model's own token is committed instead,
    the rest of `new` leaves the cache, and `cands` (read after a wrong token) are thrown away.
    Without `verify` nothing is pending and the whole chunk is committed at once.
    Returns (r confirmed, committed, fresh: the committed tokens not yet in the cache, proposed:
    the next provisional run, kept: how many of `new` stay in the cache). A committed stop token
    ends the row's output; a proposed one is trimmed after and waits for its confirmation.
    """
    w, r = len(new), 0
    while r < pending and new[w - pending + r] == guess[r]:
        r += 1
    fresh, proposed, kept = [], [], w
    if r < pending:                    # the first disagreement: the model's token, drop the rest
        fresh, kept = [guess[r]], w - pending + r
    elif cands:
        chunk = cands[:take]
        fresh, proposed = (chunk[:1], chunk[1:]) if verify else (chunk, [])
    committed = new[w - pending:w - pending + r] + fresh
    hit = next((i for i, t in enumerate(committed) if t in stops), None)
    if hit is not None:                                   # a committed stop token: trim after it
        committed, proposed = committed[:hit + 1], []
    else:                                                 # a provisional one is verified first
        hit = next((i for i, t in enumerate(proposed) if t in stops), None)
        proposed = proposed if hit is None else proposed[:hit + 1]
    return r, committed, fresh, proposed, kept



@torch.no_grad()
def generate(model, prompt_ids, max_new_tokens=256, static_k=None, tau=None, k_max=None,
             stop_ids=(), verify=False, temperature=0.0, top_k=0, top_p=1.0, seed=0):
    """Multi-token generation from one prompt: the whole method in one loop.

    static_k: accept exactly k tokens per pass; tau: ConfAdapt(tau) over k_max candidates
    (k_max: the checkpoint's `mtp_k_max` unless given). temperature 0 is greedy; above it each
    candidate is drawn from its slot's processed distribution (process), with uniforms from a
    CPU generator seeded by row_seed(seed, 0). verify: tokens accepted from <MTP> slots are
    provisional until the next pass confirms them (commit_row; sampling, verify_sampled): the
    output is then the model's own k=1 output (sampling: in distribution). Returns (new ids,
    stats): passes, tokens, effective_k; per pass the committed count (accepted), candidates'
    confidences, cache length after the pop (cache_lens); confirmed, rejected, stopped, context_full."""
    n_cand = check_request(model, prompt_ids, static_k, tau, k_max, temperature, top_k, top_p)
    if max_new_tokens < 1:
        raise DecodeError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    mtp, stops, ctx = model.cfg.mtp_token_id, set(stop_ids), model.cfg.max_seq_len
    gen = torch.Generator().manual_seed(row_seed(seed, 0)) if temperature else None
    cache, out = KVCache(), []
    new, pending = list(prompt_ids), 0    # tokens to feed; the last `pending` are provisional
    st = {"accepted": [], "confidences": [], "cache_lens": [], "confirmed": 0, "rejected": 0,
          "stopped": False, "context_full": False}
    while True:
        room, left = ctx - len(cache) - len(new), max_new_tokens - len(out) - pending
        n = 0 if pending and new[-1] in stops else max(0, min(n_cand, room, left))
        if not new or (n == 0 and not pending):            # done: nothing to read or verify
            st["context_full"] = room < 1 and left > 0 and not st["stopped"]
            break
        # one forward: the new tokens and n-1 <MTP> slots; logits at the provisional tokens'
        # predecessors (to verify them), at the last new token and at each slot (candidates)
        masks, w = max(0, n - 1), len(new)
        idx = torch.tensor([new + [mtp] * masks], device=model.device)
        out_idx = torch.arange(w - pending - 1, w + masks, device=model.device)[None]
        logits = model(idx, cache=cache, out_idx=out_idx)[0]     # (pending + 1 + masks, V)
        if mtp is not None:
            logits[:, mtp] = -torch.inf                          # <MTP> is never an output
        u = pass_uniforms(gen, pending, n).to(model.device) if gen else None
        conf, cand, probs = readout(logits, temperature, top_k, top_p,
                                    None if u is None else u[:-1])
        guess = cand[:pending].tolist()           # greedy: the model's own token at each one
        if probs is not None and pending:         # sampling: the ratio test, then the residual
            guess = sampled_guesses([new[w - pending:]], q_src, [q_from], probs[None, :pending],
                                    u[None, :pending], u[-1:])[0]
        rule = accept_static(conf[pending:], static_k) if static_k is not None \
            else accept_confadapt(conf[pending:], tau)
        r, committed, fresh, proposed, kept = commit_row(
            new, pending, guess, cand[pending:pending + n].tolist(), int(rule), verify, stops)
        cache.truncate(len(cache) - w - masks + kept)            # pop: <MTP> slots, rejections
        committed = committed[:max_new_tokens - len(out)]
        out += committed
        st["confirmed"], st["rejected"] = st["confirmed"] + r, st["rejected"] + pending - r
        st["accepted"].append(len(committed))
        st["confidences"].append([round(c, 4) for c in conf[pending:pending + n].tolist()])
        st["cache_lens"].append(len(cache))
        st["stopped"] = bool(out) and out[-1] in stops
        if st["stopped"] or len(out) >= max_new_tokens:
            break
        # sampling: the proposed tokens were drawn from their slots', after the first candidate
        q_src, q_from = None if probs is None else probs[None], pending + 1
        new, pending = fresh + proposed, len(proposed)
    return out, finish_stats(st, out)


def finish_stats(st, out):
    """A row's stats with its totals: passes, tokens, effective_k and the histogram of
    committed counts per pass."""
    passes = len(st["accepted"])
    return {**st, "passes": passes, "tokens": len(out), "effective_k": len(out) / max(1, passes),
            "histogram": dict(sorted(Counter(st["accepted"]).items()))}


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
# The layout of a batched pass: each row's tokens, positions and mask in one padded input


def step_layout(new, n_real, n_masks, n_reads, mtp):
    """The input of one batched pass: each row's new tokens right-padded to the widest row (W),
    then the row's <MTP> slots (a row with fewer than the most pads the rest).

    new: B token tensors (empty for a finished row); n_real: real tokens each row has cached;
    n_masks: <MTP> slots each row reads; n_reads: how many of its last new tokens each row reads
    logits at (1: only the last, whose prediction is the first candidate; verified decoding also
    reads at its provisional tokens). Returns idx and pos (B, T), is_new (B, W) (the slots that
    stay in the cache as real tokens), real (B, T) (the slots that are not padding) and out_idx
    (B, R + M): where each row's logits are read, its last R new tokens, then its masks.
    """
    B, device = len(new), new[0].device
    W, M, R = max(len(x) for x in new), max(n_masks), max(n_reads)
    lens = torch.tensor([len(x) for x in new], device=device)[:, None]       # (B, 1)
    start = torch.tensor(n_real, device=device)[:, None]
    col = torch.arange(W + M, device=device)[None]                             # (1, T)
    is_new = col < lens
    is_mask = (col >= W) & (col < W + torch.tensor(n_masks, device=device)[:, None])
    # each row's positions continue its own real tokens; its masks follow its last new token
    pos = torch.where(is_new, start + col, torch.where(is_mask, start + lens + col - W, 0))
    idx = torch.cat([torch.nn.utils.rnn.pad_sequence(new, batch_first=True),   # pad id 0
                     torch.full((B, M), mtp if M else 0, device=device)], 1)
    reads = (lens - R + torch.arange(R, device=device)[None]).clamp(min=0)     # (B, R)
    out_idx = torch.cat([reads, col[:, W:].expand(B, -1)], 1)
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


# -----------------------------------------------------------------------------
# Forward engines: how one pass runs. Eager is the reference; fast/cuda_graphs.py replays
# captured passes over a static cache on a GPU


class Eager:
    """The model with a growing KVCache: any shape, any device."""

    def __init__(self, model, batch):
        self.model, self.batch = model, batch
        self.reset()

    def reset(self):
        """An empty cache for the next batch of prompts."""
        self.cache = KVCache()

    def prepare(self, idx, pos, mask, out_idx):
        """Nothing to set up before a pass (CudaGraphs captures here)."""
        return 0.0

    def __call__(self, idx, pos, mask, out_idx):
        return self.model(idx, pos=pos, mask=mask, cache=self.cache, out_idx=out_idx)


def make_engine(model, batch, engine="eager", capacity=None):
    """engine: eager | graphs (CUDA graphs) | compile (torch.compile + CUDA graphs) | static
    (the graphs' static-cache layout, uncaptured: for checking it on the CPU)."""
    if engine == "eager":
        return Eager(model, batch)
    if engine not in ("graphs", "compile", "static"):
        raise DecodeError(f"unknown engine {engine!r}: eager, graphs, compile or static")
    if engine != "static" and model.device.type != "cuda":
        raise DecodeError(f"engine {engine!r} needs a CUDA device; use eager (or static) on the CPU")
    from fast.cuda_graphs import CudaGraphs
    return CudaGraphs(model, batch, capacity or model.cfg.max_seq_len,
                      graphs=engine != "static", compile=engine == "compile")


# -----------------------------------------------------------------------------
# A batch of prompts: one forward per pass for all of them, each row accepting its own tokens


def next_slots(state, take, n_max):
    """Leaner passes: how many candidates a row reads next pass, from what it accepted.

    Reading k_max candidates costs k_max-1 <MTP> slots even when the row accepts one token, and
    on a CPU even one extra slot costs most of a pass (a 2-row matmul is no gemv). state =
    (candidates read, failed probes in a row, one-candidate passes since the last probe). A row
    that accepted a guess reads one more than it accepted, or twice as many if it took them all
    (up to n_max). A row that accepted only its first candidate reads one (a plain k=1 pass) and
    probes with two again after 1, 3, 7, ... 31 such passes: hesitant stretches pay almost
    nothing, confident ones ramp up within a pass or two. Returns the next state.
    """
    slots, misses, idle = state
    if take >= 2:                                    # an <MTP> guess was accepted
        return min(n_max, 2 * slots) if take >= slots else take + 1, 0, 0
    if slots > 1:                                    # a probe (or a wide read) found nothing
        return 1, min(misses + 1, 5), 0
    idle += 1                                        # a k=1 pass; probe when its wait is over
    return (2, misses, 0) if idle >= 2 ** misses - 1 else (1, misses, idle)


class Row:
    """One prompt's state in generate_batch: what it feeds next, what it has, its stats."""

    def __init__(self, prompt, n_cand, gen=None):
        self.new = list(prompt)     # tokens entering the cache next pass; the last `pending` of
        self.pending = 0            # them are provisional (verify), the others committed
        self.q_from = 0             # sampling: the column of the last pass they were drawn at
        self.gen = gen              # sampling: the row's CPU generator (its uniforms)
        self.n_real = 0             # real tokens this row has cached
        self.lean = (n_cand, 0, 0)  # candidates this row reads (--lean adapts it: next_slots)
        self.out, self.done = [], False
        self.stats = {"accepted": [], "confidences": [], "cache_lens": [], "confirmed": 0,
                      "rejected": 0, "context_full": False, "stopped": False}


def make_rows(prompts, n_cand, temperature, seed):
    """One Row per prompt; when sampling, each with its own CPU generator, seeded by seed[b]
    (a list: one seed per prompt) or by row_seed(seed, b) (an int)."""
    seeds = list(seed) if isinstance(seed, (list, tuple)) else \
        [row_seed(seed, b) for b in range(len(prompts))]
    if len(seeds) != len(prompts):
        raise DecodeError(f"{len(seeds)} seeds for {len(prompts)} prompts: give one per prompt")
    return [Row(p, n_cand, torch.Generator().manual_seed(s) if temperature else None)
            for p, s in zip(prompts, seeds)]


def plan_reads(rows, n_cand, max_new_tokens, ctx, stops):
    """How many candidates each row reads this pass (0: it only verifies its provisional run);
    a row with nothing left to read or verify is marked done."""
    reads = []
    for row in rows:
        n = 0
        if not row.done:
            room = ctx - row.n_real - len(row.new)        # every emitted token fits the context
            left = max_new_tokens - len(row.out) - row.pending
            stop_pending = row.pending and row.new[-1] in stops
            n = max(0, min(row.lean[0], room, left, 0 if stop_pending else n_cand))
            if not row.new or (n == 0 and not row.pending):
                row.done = True
                row.stats["context_full"] = room < 1 and left > 0 and not row.stats["stopped"]
        reads.append(n)
    return reads


def batched_pass(run, timer, rows, R, masks, cached, mtp, device):
    """One forward for every row: each row's new tokens, then its <MTP> slots. Returns the
    logits (B, R + M, V) at each row's last R new tokens and its M slots, is_new (B, W) (the
    slots that stay in the cache as real tokens; None at batch 1) and the seconds spent
    capturing a new pass shape."""
    if len(rows) == 1:   # nothing to pad: skip the layout, whose small ops cost ~10% of a tiny pass
        w, m = len(rows[0].new), masks[0]
        idx = torch.tensor(rows[0].new + [mtp] * m, device=device)[None]
        out_idx = torch.arange(w - R, w + m, device=device)[None]
        setup = run.prepare(idx, None, None, out_idx)             # a new graph: untimed
        with timer:
            return run(idx, None, None, out_idx), None, setup    # (1, R + m, V)
    # laid out on the CPU, then one copy per tensor to the device (not one per row)
    reads = [row.pending + 1 if not row.done else 1 for row in rows]
    idx, pos, is_new, real, out_idx = (t.to(device) for t in step_layout(
        [torch.tensor(row.new, dtype=torch.long) for row in rows], [row.n_real for row in rows],
        masks, reads, mtp))
    padded = not (real.all() and cached.all())
    # no padding: the model's own causal mask and positions
    mask, pos = (step_mask(cached, real), pos) if padded else (None, None)
    setup = run.prepare(idx, pos, mask, out_idx)
    with timer:
        return run(idx, pos, mask, out_idx), is_new, setup            # (B, R + M, V)


def read_batch(rows, logits, R, reads, sampling, q_src):
    """Every row's candidates from one pass's logits (B, R + M, V), and the model's own tokens
    at its provisional tokens (what commit_row checks them against): (conf, cand (lists),
    probs, guesses). Sampling: each row's uniforms (pass_uniforms) sit under the logits it
    reads (columns R-1-pending on), its residual's in an extra last column; q_src: the last
    pass's probs, which its provisional tokens were drawn from."""
    B, T = logits.shape[:2]
    u = None
    if sampling[0]:
        u = [[0.5] * (T + 1) for _ in rows]
        for b, row in enumerate(rows):
            if not row.done:
                ub = pass_uniforms(row.gen, row.pending, reads[b]).tolist()
                at = R - 1 - row.pending
                u[b][at:at + len(ub) - 1], u[b][-1] = ub[:-1], ub[-1]
        u = torch.tensor(u, dtype=torch.float64, device=logits.device)
    conf, cand, probs = readout(logits, *sampling, None if u is None else u[:, :-1])
    cand_l = cand.tolist()
    drafts = [row.new[len(row.new) - row.pending:] for row in rows]
    if probs is None or R == 1:          # greedy: the model's own token is its argmax
        return conf, cand_l, probs, [cand_l[b][R - 1 - len(d):R - 1] for b, d in enumerate(drafts)]
    # sampling: the provisional tokens sit right-aligned in the R-1 columns before the last
    guesses = sampled_guesses(drafts, q_src, [row.q_from for row in rows], probs[:, :R - 1],
                              u[:, :R - 1], u[:, -1])
    return conf, cand_l, probs, guesses


def commit_pass(rows, logits, R, reads, rule, verify, lean, n_cand, stops, max_new_tokens, stop_fn,
                sampling, q_src):
    """Every active row's commit step (commit_row) on this pass's logits (B, R + M, V). Returns
    how many of each row's new tokens stay in the cache, and (sampling) the pass's processed
    distributions, which the next pass checks the proposed tokens against."""
    conf, cand_l, probs, guesses = read_batch(rows, logits, R, reads, sampling, q_src)
    # the acceptance rule, on each row's candidates: the prediction at its last new token,
    # then its masks' (columns R-1 on)
    take = rule(conf[:, R - 1:]).tolist()
    conf_l = conf.tolist()
    kept = [0] * len(rows)
    for b, row in enumerate(rows):
        if row.done:
            continue
        p, cands, st = row.pending, cand_l[b][R - 1:R - 1 + reads[b]], row.stats
        r, committed, fresh, proposed, kept[b] = commit_row(
            row.new, p, guesses[b], cands, take[b], verify, stops)
        if lean and r == p and cands:
            row.lean = next_slots(row.lean, min(take[b], len(cands)), n_cand)
        st["confirmed"] += r
        st["rejected"] += p - r
        committed = committed[:max_new_tokens - len(row.out)]
        row.out += committed
        st["accepted"].append(len(committed))
        st["confidences"].append([round(c, 4) for c in conf_l[b][R - 1:R - 1 + reads[b]]])
        row.n_real += kept[b]
        st["cache_lens"].append(row.n_real)
        st["stopped"] = bool(row.out) and row.out[-1] in stops
        if (st["stopped"] or len(row.out) >= max_new_tokens
                or (stop_fn is not None and stop_fn(row.out))):
            row.done, proposed = True, []
        row.new, row.pending = ([], 0) if row.done else (fresh + proposed, len(proposed))
        row.q_from = R             # the proposed tokens' slots: after the first candidate's
    return kept, probs


@torch.no_grad()
def generate_batch(model, prompts, max_new_tokens=256, static_k=None, tau=None, k_max=None,
                   stop_ids=(), stop_fn=None, timer=None, verify=False, lean=False,
                   engine="eager", temperature=0.0, top_k=0, top_p=1.0, seed=0):
    """generate for several prompts at once: one forward per pass for all of them, each row
    accepting its own number of tokens; a row's output is what generate gives for its prompt.

    The rules, verify, stop_ids and sampling (temperature, top_k, top_p) are generate's. seed:
    an int (row b's generator is seeded by row_seed(seed, b); row 0 is generate's) or one seed
    per prompt: a row's output never depends on the other rows. stop_fn(ids) -> bool ends a
    row after a pass (e.g. a stop string in the text). lean: each row reads as many candidates
    as its recent acceptance suggests (next_slots). engine: a make_engine name, or a ready
    engine object (one per batch shape).

    Returns (new token ids per prompt, stats): passes, tokens (all rows), each forward's ms and
    their sum (forward_ms), the call's wall time less CUDA-graph captures (wall_ms, which
    tokens_per_s uses; captures: setup_ms), and rows: per prompt generate's stats. All rows
    share one KVCache; a shorter row's padding slots are hidden by the mask, and a finished row
    stays in the batch as padding (dropping it would mean slicing every layer's cache).
    """
    # --- setup: the request, the engine, one Row per prompt
    if not prompts:
        raise DecodeError("no prompts: give at least one")
    n_cand = max(check_request(model, p, static_k, tau, k_max, temperature, top_k, top_p)
                 for p in prompts)                                                   # all the same
    if max_new_tokens < 1:
        raise DecodeError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    t_start, setup_s = time.perf_counter(), 0.0        # setup: CUDA-graph captures, left out
    device, mtp, B, ctx = model.device, model.cfg.mtp_token_id, len(prompts), model.cfg.max_seq_len
    timer = timer or PassTimer(device)
    run = make_engine(model, B, engine) if isinstance(engine, str) else engine
    if run.batch != B:
        raise DecodeError(f"this engine was made for batches of {run.batch}, not {B}")
    run.reset()
    cached = torch.zeros(B, 0, dtype=torch.bool, device=device)  # (B, L): slot is a real token
    rows, stops, passes = make_rows(prompts, n_cand, temperature, seed), set(stop_ids), 0
    q_src = None                      # sampling: the last pass's processed distributions
    rule = (lambda c: accept_static(c, static_k)) if static_k is not None \
        else (lambda c: accept_confadapt(c, tau))

    # --- the passes: plan the reads, one forward, commit per row, pop the cache
    while True:
        reads = plan_reads(rows, n_cand, max_new_tokens, ctx, stops)
        if all(row.done for row in rows):
            break
        masks = [max(0, n - 1) for n in reads]           # <MTP> slots of each row
        # logits are read at each row's last R new tokens: the most provisional tokens any row
        # verifies, plus the last one (its prediction is the first candidate)
        R = max(row.pending + 1 if not row.done else 1 for row in rows)
        logits, is_new, setup = batched_pass(run, timer, rows, R, masks, cached, mtp, device)
        setup_s += setup
        passes += 1
        if mtp is not None:
            logits[..., mtp] = -torch.inf                # <MTP> is never an output
        kept, q_src = commit_pass(rows, logits, R, reads, rule, verify, lean, n_cand, stops,
                                  max_new_tokens, stop_fn, (temperature, top_k, top_p), q_src)
        cached = pop(run.cache, rows, is_new, kept, cached)
    # --- the stats: timings of the whole batch, then each row's
    return [row.out for row in rows], batch_stats(rows, timer, passes, t_start, setup_s)


def pop(cache, rows, is_new, kept, cached):
    """The pop after a batched pass: the <MTP> slots, and rejected provisional tokens, leave the
    cache. One row: cut back to its real tokens. Several: cut off the pass's mask slots and
    mark which kept slots are real tokens; returns the new real-slot flags (B, L)."""
    if len(rows) == 1:
        cache.truncate(rows[0].n_real)
        return cached
    W, device = is_new.size(1), cached.device
    cache.truncate(cached.size(1) + W)
    keep = torch.arange(W, device=device)[None] < torch.tensor(kept, device=device)[:, None]
    return torch.cat([cached, keep], 1)


def batch_stats(rows, timer, passes, t_start, setup_s):
    """generate_batch's stats: the timings of the whole batch, then each row's."""
    ms = timer.times()[-passes:]   # synchronizes on CUDA; passes >= 1: every prompt has room
    # everything (forwards, softmax, accept) but one-time CUDA-graph captures, which a server
    # makes once per shape, not once per request
    wall = 1000 * (time.perf_counter() - t_start - setup_s)
    tokens = sum(len(row.out) for row in rows)
    return {"passes": passes, "tokens": tokens, "ms": ms, "forward_ms": sum(ms), "wall_ms": wall,
            "setup_ms": 1000 * setup_s, "tokens_per_s": 1000 * tokens / wall,
            "rows": [finish_stats(row.stats, row.out) for row in rows]}




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


def resolve_device(name):
    """auto: the GPU when there is one, else the CPU."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cpu" and not (name == "cuda" or name.startswith("cuda:") and name[5:].isdigit()):
        raise DecodeError(f"--device must be auto, cpu, cuda or cuda:N (got {name!r})")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DecodeError(f"--device {name}: no CUDA device is visible; use --device cpu or auto")
    return name


def check_output_path(path, flag):
    """Before any work: a file can be written at `path` (its folder exists, it is not a folder)."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise DecodeError(f"{flag} {path} is a folder: give a file name in it")
    if not os.path.isdir(folder):
        raise DecodeError(f"{flag} {path}: the folder {folder} does not exist: create it first")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise DecodeError(f"{flag} {path} cannot be written (no permission): pick another path")


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def load_for_decoding(path, device, dtype="fp32"):
    """A checkpoint as the decoders run it: eval mode, on `device`, weights in `dtype`."""
    if dtype not in DTYPES:
        raise DecodeError(f"--dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
    return from_pretrained(path, device=device, dtype=DTYPES[dtype]).eval()


def decode_one(model, ids, **kw):
    """generate_batch on one prompt: (its tokens, the batch's timings and the row's stats)."""
    outs, st = generate_batch(model, [ids], **kw)
    return outs[0], {**st.pop("rows")[0], **st}


def median_tokens_per_s(fn, repeats):
    """Median tokens/s of `repeats` runs of fn() -> stats: one run is at the mercy of whatever
    else the machine does (one of them printed k=1 at 2.74x itself on a busy machine)."""
    return statistics.median(fn()["tokens_per_s"] for _ in range(repeats))


def add_sampling_args(p, seed_help):
    """--temperature, --top-k, --top-p and --seed (decode.py's and bench.py's)."""
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0: greedy; above 0 every candidate is sampled (verified: the output is "
                        "distributed exactly as static k=1 sampling's)")
    p.add_argument("--top-k", type=int, default=0,
                   help="sample from the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="sample from the smallest set of most likely tokens holding this mass")
    p.add_argument("--seed", type=int, default=0, help=seed_help)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Multi-token decoding from an MTP checkpoint")
    p.add_argument("--ckpt", required=True, help="checkpoint directory (HF layout + tokenizer)")
    p.add_argument("--prompt", required=True, help="the question / prompt text")
    rule = p.add_mutually_exclusive_group()
    rule.add_argument("--tau", type=float, help="ConfAdapt threshold (default 0.9)")
    rule.add_argument("--static-k", type=int, help="accept exactly k tokens per pass")
    p.add_argument("--k-max", type=int, help="candidates per pass for ConfAdapt (default: the checkpoint's)")
    p.add_argument("--verify", action="store_true",
                   help="verified: the next pass checks every token accepted from an <MTP> slot, "
                        "so the output is exactly static k=1's")
    p.add_argument("--lean", action="store_true",
                   help="read as many candidates per pass as recent passes accepted, not k_max")
    p.add_argument("--max-new", type=int, default=256, help="most new tokens")
    add_sampling_args(p, "sampling seed (same seed, same output)")
    p.add_argument("--format", choices=["auto", "qa", "chat", "raw"], default="auto",
                   help="auto: the tokenizer's chat format if it has one, else 'Q: ...\\nA:'")
    p.add_argument("--device", default="auto", help="auto (the GPU if there is one) | cpu | cuda")
    p.add_argument("--dtype", default="fp32", help="weights and activations: fp32 | bf16")
    p.add_argument("--engine", default="eager",
                   help="eager | graphs (CUDA graphs) | compile (torch.compile + CUDA graphs)")
    p.add_argument("--viz", action="store_true", help="colour each pass's committed chunk by its size")
    p.add_argument("--viz-html", help="write the coloured chunks to this HTML file")
    p.add_argument("--repeats", type=int, default=5, help="runs timed for the speedup (median)")
    p.add_argument("--no-baseline", action="store_true", help="skip the k=1 runs for the speedup")
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    try:
        if a.repeats < 1 or a.max_new < 1:
            raise DecodeError("--repeats and --max-new must be >= 1")
        if a.viz_html:
            check_output_path(a.viz_html, "--viz-html")
        a.device = resolve_device(a.device)
        model = load_for_decoding(a.ckpt, a.device, a.dtype)
        tok = load_tokenizer(a.ckpt)
        check_vocab(tok, model.cfg, a.ckpt)
        fmt = a.format if a.format != "auto" else ("chat" if tok.chat else "qa")
        if fmt == "chat" and not tok.chat:
            raise DecodeError("this tokenizer has no chat format: use --format qa or raw")
        ids = {"chat": lambda t: tok.prompt(t), "qa": lambda t: tok.encode(plain_prompt(t)),
               "raw": tok.encode}[fmt](a.prompt) if a.prompt else []
        rule = {"static_k": a.static_k} if a.static_k is not None \
            else {"tau": 0.9 if a.tau is None else a.tau}
        kw = dict(max_new_tokens=a.max_new, k_max=a.k_max, stop_ids=tok.stop_ids,
                  temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed)
        capacity = min(model.cfg.max_seq_len, len(ids) + a.max_new + 2 * (model.cfg.mtp_k_max or 4))
        engine = lambda: make_engine(model, 1, a.engine, capacity)       # a fresh cache per run
        run = lambda r, **x: decode_one(model, ids, **kw, **r, **x, engine=engine())[1]
        decode_one(model, ids, **{**kw, "max_new_tokens": 8}, **rule, engine=engine())  # warm-up
        out, st = decode_one(model, ids, **kw, **rule, verify=a.verify, lean=a.lean, engine=engine())
    except (DecodeError, CheckpointError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    pieces = chunks(tok, out, st["accepted"])
    print(viz_terminal(pieces) if a.viz else tok.decode(out))
    name = (f"static k={a.static_k}" if a.static_k is not None else f"ConfAdapt tau={rule['tau']}") \
        + (", verified" if a.verify else "") + (", lean" if a.lean else "") \
        + (f", temperature {a.temperature}" if a.temperature else "")
    print(f"\n[{name}] {st['tokens']} tokens in {st['passes']} passes: effective k "
          f"{st['effective_k']:.2f}, histogram {st['histogram']}, {st['forward_ms'] / st['passes']:.1f} "
          f"ms/pass, {st['tokens_per_s']:.1f} tokens/s on {a.device} ({a.dtype}, {a.engine})")
    if a.verify:
        print(f"verified: {st['confirmed']} provisional tokens confirmed, {st['rejected']} rejected")
    plain_k1 = a.static_k == 1 and not a.verify and not a.lean
    if not a.no_baseline and not plain_k1:      # k=1 against itself says nothing
        ours = median_tokens_per_s(lambda: run(rule, verify=a.verify, lean=a.lean), a.repeats)
        base = median_tokens_per_s(lambda: run({"static_k": 1}), a.repeats)
        print(f"[static k=1] median of {a.repeats} runs each: {base:.1f} tokens/s against "
              f"{ours:.1f}: wall-clock speedup {ours / base:.2f}x")
    if a.viz_html:
        try:
            with open(a.viz_html, "w") as f:
                f.write(viz_html(pieces, name))
        except OSError as e:
            print(f"error: could not write {a.viz_html}: {e.strerror}", file=sys.stderr)
            sys.exit(2)
        print(f"wrote {a.viz_html}")


if __name__ == "__main__":
    main()
