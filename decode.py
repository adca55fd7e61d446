"""
Multi-token decoding from an MTP checkpoint with a KV cache (METHOD.md, "Inference").

    python decode.py --ckpt runs/mtp-synth/ckpt --prompt "Ava has 12 apples. ..." --tau 0.9 --viz
    python decode.py --ckpt DIR --prompt "..." --static-k 3
    python decode.py --ckpt DIR --prompt "..." --tau 0.9 --verify      # output == static k=1
    python decode.py --ckpt DIR --prompt "..." --tau 0.9 --viz-html chunks.html --device cuda \
        --dtype bf16 --engine graphs

Each step feeds the newly accepted tokens plus k_max-1 <MTP> tokens, reads k_max candidates from
one forward pass, accepts a leading run of them (static k, or ConfAdapt: all top-1 probabilities
above tau), and pops the <MTP> entries from the cache; accepted tokens enter the cache as inputs of
the next step, so after every step the cache holds real tokens only. generate_batch decodes
several prompts in one forward per step; the cache then also holds padding that no one attends to.
With --verify the tokens accepted from <MTP> slots are provisional until the next pass confirms
them (METHOD.md, "Verified mode"); --lean reads fewer candidates where few are accepted. On a GPU,
--engine graphs replays each pass from a CUDA graph over a static cache.
"""
import argparse
import html
import statistics
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
# Forward engines: how one pass runs. Eager is the reference; CudaGraphs replays captured passes


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


class CudaGraphs:
    """Decoding passes replayed from CUDA graphs over a static KVCache (model.KVCache.static).

    A pass of T tokens reading n logits per row is captured once per (T, n) and replayed after
    that: one launch instead of a few hundred small kernels, which is what a small model at a
    small batch is bound by on a GPU. Inputs are copied into the graph's own tensors first. The
    prefill (the first pass after reset: one shape per prompt length) runs uncaptured on the same
    cache. prepare() captures a new shape ahead of its pass, so that callers can time the pass
    without the capture. compile=True
    captures torch.compile'd passes instead of eager ones. graphs=False runs the very same
    static-cache passes uncaptured: the layout check on a machine without a GPU.
    """

    def __init__(self, model, batch, capacity, graphs=True, compile=False):
        cfg = model.cfg
        self.model, self.capacity, self.batch = model, capacity, batch
        self.graphs = graphs and model.device.type == "cuda"
        self.cache = KVCache.static(cfg, batch, capacity, model.embed.weight.dtype, model.device)
        self.fn = torch.compile(model, dynamic=False) if compile else model
        self.captured = {}              # (T, n) -> (graph, static inputs, static logits)

    def reset(self):
        """Empty the cache (its stale slots are masked out); captured graphs stay valid."""
        self.cache.length = 0

    def _pass(self, idx, pos, mask, write_at, out_idx):
        self.cache.write_at = write_at
        return self.fn(idx, pos=pos, mask=mask, cache=self.cache, out_idx=out_idx)

    def _static_inputs(self, idx, pos, mask, out_idx):
        """A pass's inputs in the static cache's layout: (pos, mask over every slot, write_at)."""
        B, T = idx.shape
        L, device = len(self.cache), idx.device
        if L + T > self.capacity:
            raise DecodeError(f"the static cache holds {self.capacity} slots; this pass needs {L + T}")
        if pos is None:                                   # no padding: positions continue the cache
            pos = torch.arange(L, L + T, device=device).expand(B, T)
        slot = torch.arange(self.capacity, device=device)
        if mask is None:                                  # causal over the real slots
            mask = (slot[None, :] <= L + torch.arange(T, device=device)[:, None]).expand(B, T, -1)
        else:                                             # (B, T, L + T) -> (B, T, capacity)
            mask = torch.nn.functional.pad(mask, (0, self.capacity - mask.size(-1)))
        return pos, mask, slot[L:L + T]

    def _replayed(self):
        """Passes after the prefill are replayed; the prefill (the first pass after reset, one
        shape per prompt length) runs as it comes."""
        return self.graphs and len(self.cache) > 0

    def prepare(self, idx, pos, mask, out_idx):
        """Capture this pass's shape if it is new, before the pass is timed: returns the seconds
        it took (device synchronized at both ends), 0.0 if there was nothing to capture. The
        capture's warm-up passes write the same k/v that the pass itself then writes."""
        key = (idx.size(1), out_idx.size(1))
        if not self._replayed() or key in self.captured:
            return 0.0
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        self.captured[key] = self._capture(idx, *self._static_inputs(idx, pos, mask, out_idx), out_idx)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    def __call__(self, idx, pos, mask, out_idx):
        self.prepare(idx, pos, mask, out_idx)             # (generate_batch has, untimed)
        pos, mask, write_at = self._static_inputs(idx, pos, mask, out_idx)
        if not self._replayed():
            self.cache.write_at = write_at
            logits = self.model(idx, pos=pos, mask=mask, cache=self.cache, out_idx=out_idx)
        else:
            graph, inputs, logits = self.captured[idx.size(1), out_idx.size(1)]
            for buf, x in zip(inputs, (idx, pos, mask, write_at, out_idx)):
                buf.copy_(x)
            graph.replay()
        self.cache.length += idx.size(1)
        return logits

    def _capture(self, *inputs):
        inputs = [x.clone() for x in inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):                     # warm-up (and compilation) off-graph;
            for _ in range(2):                            # it writes the same k/v the replay will
                self._pass(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self._pass(*inputs)
        return graph, inputs, logits


def make_engine(model, batch, engine="eager", capacity=None):
    """engine: eager | graphs (CUDA graphs) | compile (torch.compile + CUDA graphs) | static
    (the graphs' static-cache layout, uncaptured: for checking it on the CPU)."""
    if engine == "eager":
        return Eager(model, batch)
    if engine not in ("graphs", "compile", "static"):
        raise DecodeError(f"unknown engine {engine!r}: eager, graphs, compile or static")
    if engine != "static" and model.device.type != "cuda":
        raise DecodeError(f"engine {engine!r} needs a CUDA device; use eager (or static) on the CPU")
    return CudaGraphs(model, batch, capacity or model.cfg.max_seq_len,
                      graphs=engine != "static", compile=engine == "compile")


# -----------------------------------------------------------------------------
# Generation: prefill and every later pass are the same forward, for a batch of prompts


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
def generate_batch(model, prompts, max_new_tokens=256, static_k=None, tau=None, k_max=None,
                   stop_ids=(), stop_fn=None, timer=None, verify=False, lean=False,
                   engine="eager"):
    """Greedy multi-token generation from several prompts at once: one forward per pass for all
    of them, each row accepting its own number of tokens.

    static_k: accept exactly k tokens per pass; tau: ConfAdapt(tau) over k_max candidates
    (k_max from the checkpoint's config, `mtp_k_max`, unless given). stop_fn(ids) -> bool ends a
    row after a pass (e.g. a stop string in the text).
    verify: tokens accepted from <MTP> slots are provisional. The next pass feeds them anyway and
    reads the model's own next-token prediction at each; the longest prefix those predictions
    confirm is committed, and at the first disagreement the model's own token is committed
    instead, the rest is dropped from the cache, and that pass's candidates (read after a wrong
    token) are thrown away. The output is then the model's greedy k=1 output, token for token.
    lean: each row reads as many candidates as its recent acceptance suggests (next_slots).
    engine: a make_engine name, or a ready engine object (one per batch shape).

    Returns (new token ids per prompt, stats): passes (forwards of the batch), tokens (all rows),
    the time of each forward (ms), their sum (forward_ms), the whole call's wall time less the
    CUDA-graph captures of new pass shapes (wall_ms, which tokens_per_s uses; the captures:
    setup_ms), and rows: per prompt its passes, tokens, effective_k (committed tokens per pass),
    per-pass committed counts (accepted) and top-1 confidences of the candidates, its real cached
    tokens after each pass (cache_lens), provisional tokens confirmed and rejected, stopped and
    context_full.

    All rows share one KVCache. A row's shorter input leaves padding slots in it, which the mask
    hides from everyone: every non-pad slot of a row is a real token of that row. A finished row
    stays in the batch as padding (dropping it would mean slicing every layer's cache).
    """
    if not prompts:
        raise DecodeError("no prompts: give at least one")
    n_cand = max(check_request(model, p, static_k, tau, k_max) for p in prompts)  # all the same
    if max_new_tokens < 1:
        raise DecodeError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    t_start, setup_s = time.perf_counter(), 0.0        # setup: CUDA-graph captures, left out
    device, mtp, B, ctx = model.device, model.cfg.mtp_token_id, len(prompts), model.cfg.max_seq_len
    timer = timer or PassTimer(device)
    run = make_engine(model, B, engine) if isinstance(engine, str) else engine
    if run.batch != B:
        raise DecodeError(f"this engine was made for batches of {run.batch}, not {B}")
    run.reset()
    cache = run.cache
    cached = torch.zeros(B, 0, dtype=torch.bool, device=device)  # (B, L): slot is a real token
    new = [list(p) for p in prompts]       # tokens entering the cache next pass; the last `pending`
    pending = [0] * B                      # of them are provisional (verify); the others committed
    n_real = [0] * B                       # real tokens each row has cached
    lean_state = [(n_cand, 0, 0)] * B      # candidates each row reads (lean: adapts, next_slots)
    outs = [[] for _ in range(B)]
    rows = [{"accepted": [], "confidences": [], "cache_lens": [], "confirmed": 0, "rejected": 0,
             "context_full": False, "stopped": False} for _ in range(B)]
    stops, passes, done = set(stop_ids), 0, [False] * B
    while True:
        # --- plan: how many candidates each row reads (0: it only verifies its provisional run)
        n_read = [0] * B
        for b in range(B):
            if done[b]:
                continue
            room = ctx - n_real[b] - len(new[b])          # every emitted token fits the context
            left = max_new_tokens - len(outs[b]) - pending[b]
            stop_pending = pending[b] and new[b][-1] in stops
            n_read[b] = max(0, min(lean_state[b][0], room, left, 0 if stop_pending else n_cand))
            if not new[b] or (n_read[b] == 0 and not pending[b]):
                done[b] = True
                rows[b]["context_full"] = room < 1 and left > 0 and not rows[b]["stopped"]
        active = [b for b in range(B) if not done[b]]
        if not active:
            break
        masks = [max(0, n - 1) for n in n_read]           # <MTP> slots of each row
        reads = [pending[b] + 1 if not done[b] else 1 for b in range(B)]
        R = max(reads)

        # --- one forward pass for every row
        if B == 1:   # nothing to pad: skip the layout, whose small ops cost ~10% of a tiny pass
            w, m = len(new[0]), masks[0]
            idx = torch.tensor(new[0] + [mtp] * m, device=device)[None]
            out_idx = torch.arange(w - R, w + m, device=device)[None]
            setup_s += run.prepare(idx, None, None, out_idx)          # a new graph: untimed
            with timer:
                logits = run(idx, None, None, out_idx)                # (1, R + m, V)
        else:
            # laid out on the CPU, then one copy per tensor to the device (not one per row)
            idx, pos, is_new, real, out_idx = (t.to(device) for t in step_layout(
                [torch.tensor(x, dtype=torch.long) for x in new], n_real, masks, reads, mtp))
            padded = not (real.all() and cached.all())
            # no padding: the model's own causal mask and positions
            mask, pos = (step_mask(cached, real), pos) if padded else (None, None)
            setup_s += run.prepare(idx, pos, mask, out_idx)
            with timer:
                logits = run(idx, pos, mask, out_idx)                 # (B, R + M, V)
        passes += 1
        if mtp is not None:
            logits[..., mtp] = -torch.inf                            # <MTP> is never an output
        conf, cand = logits.float().softmax(-1).max(-1)              # (B, R + M)
        # the acceptance rule, on each row's candidates: the prediction at its last new token,
        # then its masks' (columns R-1 on)
        first = conf[:, R - 1:]
        take = (accept_static(first, static_k) if static_k is not None
                else accept_confadapt(first, tau)).tolist()
        conf_l, cand_l = conf.tolist(), cand.tolist()

        # --- commit: per row, what this pass confirmed, corrected and proposed (commit_row)
        kept = [0] * B                                    # new tokens that stay in the cache
        for b in active:
            p, cands = pending[b], cand_l[b][R - 1:R - 1 + n_read[b]]
            r, committed, fresh, proposed, kept[b] = commit_row(
                new[b], p, cand_l[b][R - 1 - p:R - 1], cands, take[b], verify, stops)
            if lean and r == p and cands:
                lean_state[b] = next_slots(lean_state[b], min(take[b], len(cands)), n_cand)
            rows[b]["confirmed"] += r
            rows[b]["rejected"] += p - r
            committed = committed[:max_new_tokens - len(outs[b])]
            outs[b] += committed
            rows[b]["accepted"].append(len(committed))
            rows[b]["confidences"].append([round(c, 4) for c in conf_l[b][R - 1:R - 1 + n_read[b]]])
            n_real[b] += kept[b]
            rows[b]["cache_lens"].append(n_real[b])
            rows[b]["stopped"] = bool(outs[b]) and outs[b][-1] in stops
            if (rows[b]["stopped"] or len(outs[b]) >= max_new_tokens
                    or (stop_fn is not None and stop_fn(outs[b]))):
                done[b], proposed = True, []
            new[b], pending[b] = ([], 0) if done[b] else (fresh + proposed, len(proposed))

        # --- pop: the <MTP> slots, and rejected provisional tokens, leave the cache
        if B == 1:
            cache.truncate(n_real[0])
        else:
            W = is_new.size(1)
            cache.truncate(cached.size(1) + W)
            keep = torch.arange(W, device=device)[None] < torch.tensor(kept, device=device)[:, None]
            cached = torch.cat([cached, keep], 1)
    ms = timer.times()[-passes:]   # synchronizes on CUDA; passes >= 1: every prompt has room
    # everything (forwards, softmax, accept) but one-time CUDA-graph captures, which a server
    # makes once per shape, not once per request
    wall = 1000 * (time.perf_counter() - t_start - setup_s)
    for out, r in zip(outs, rows):
        r.update(passes=len(r["accepted"]), tokens=len(out),
                 effective_k=len(out) / max(1, len(r["accepted"])),
                 histogram=dict(sorted(Counter(r["accepted"]).items())))
    tokens = sum(len(out) for out in outs)
    stats = {"passes": passes, "tokens": tokens, "ms": ms, "forward_ms": sum(ms), "wall_ms": wall,
             "setup_ms": 1000 * setup_s, "tokens_per_s": 1000 * tokens / wall, "rows": rows}
    return outs, stats


def generate(model, prompt_ids, max_new_tokens=256, static_k=None, tau=None, k_max=None,
             stop_ids=(), stop_fn=None, timer=None, verify=False, lean=False, engine="eager"):
    """Greedy multi-token generation from one prompt: generate_batch with a batch of one.

    Returns (new token ids, stats): the batch's timing stats (passes, ms, forward_ms, wall_ms,
    tokens_per_s) and the row's (tokens, effective_k, accepted, histogram, confidences,
    cache_lens, confirmed, rejected, stopped, context_full) in one dict.
    """
    outs, st = generate_batch(model, [prompt_ids], max_new_tokens, static_k, tau, k_max,
                              stop_ids, stop_fn, timer, verify, lean, engine)
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


def resolve_device(name):
    """auto: the GPU when there is one, else the CPU."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DecodeError(f"--device {name}: no CUDA device is visible; use --device cpu or auto")
    return name


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def load_for_decoding(path, device, dtype="fp32"):
    """A checkpoint as the decoders run it: eval mode, on `device`, weights in `dtype`."""
    if dtype not in DTYPES:
        raise DecodeError(f"--dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
    return Transformer.from_pretrained(path, device=device, dtype=DTYPES[dtype]).eval()


def median_tokens_per_s(fn, repeats):
    """Median tokens/s of `repeats` runs of fn() -> stats: one run is at the mercy of whatever
    else the machine does (one of them printed k=1 at 2.74x itself on a busy machine)."""
    return statistics.median(fn()["tokens_per_s"] for _ in range(repeats))


def main(argv=None):
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
    a = p.parse_args(argv)
    try:
        if a.repeats < 1 or a.max_new < 1:
            raise DecodeError("--repeats and --max-new must be >= 1")
        a.device = resolve_device(a.device)
        model = load_for_decoding(a.ckpt, a.device, a.dtype)
        tok = load_tokenizer(a.ckpt)
        fmt = a.format if a.format != "auto" else ("chat" if tok.chat else "qa")
        if fmt == "chat" and not tok.chat:
            raise DecodeError("this tokenizer has no chat format: use --format qa or raw")
        ids = {"chat": lambda t: tok.prompt(t), "qa": lambda t: tok.encode(plain_prompt(t)),
               "raw": tok.encode}[fmt](a.prompt) if a.prompt else []
        rule = {"static_k": a.static_k} if a.static_k is not None \
            else {"tau": 0.9 if a.tau is None else a.tau}
        kw = dict(max_new_tokens=a.max_new, k_max=a.k_max, stop_ids=tok.stop_ids)
        capacity = min(model.cfg.max_seq_len, len(ids) + a.max_new + 2 * (model.cfg.mtp_k_max or 4))
        engine = lambda: make_engine(model, 1, a.engine, capacity)       # a fresh cache per run
        run = lambda r, **x: generate(model, ids, **kw, **r, **x, engine=engine())[1]
        generate(model, ids, **{**kw, "max_new_tokens": 8}, **rule, engine=engine())  # warm-up
        out, st = generate(model, ids, **kw, **rule, verify=a.verify, lean=a.lean, engine=engine())
    except (DecodeError, CheckpointError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    pieces = chunks(tok, out, st["accepted"])
    print(viz_terminal(pieces) if a.viz else tok.decode(out))
    name = (f"static k={a.static_k}" if a.static_k is not None else f"ConfAdapt tau={rule['tau']}") \
        + (", verified" if a.verify else "") + (", lean" if a.lean else "")
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
        with open(a.viz_html, "w") as f:
            f.write(viz_html(pieces, name))
        print(f"wrote {a.viz_html}")


if __name__ == "__main__":
    main()
