"""
Many prompts decoded at once: one forward per pass for all of them, each row accepting its own
number of tokens (decode.generate's loop, batched). A row's output is what decode.generate gives
for its prompt alone, pass for pass (tests/test_decode.py); bench.py decodes through this.

    from decode import ConfAdapt
    from fast.batch import generate_batch
    outs, stats = generate_batch(model, [ids_a, ids_b], ConfAdapt(0.9), verify=True)

All rows share one KV cache (decode's engines). Rows are right-padded to the widest row; a
padding slot is seen by no one (step_mask), and a finished row stays in the batch as padding
(dropping it would mean slicing every layer's cache).
"""
import time

import torch

from decode import (DecodeError, PassTimer, check_request, commit_row, finish_stats, make_engine,
                    pass_uniforms, readout, row_seed, timings, verify_sampled)


# -----------------------------------------------------------------------------
# Each row's state, and what it reads next


class Row:
    """One prompt's state in generate_batch: what it feeds next, what it has, its stats."""

    def __init__(self, prompt, reads, gen=None):
        self.new = list(prompt)     # tokens entering the cache next pass; the last `pending` of
        self.pending = 0            # them are provisional (verify), the others committed
        self.q_from = 0             # sampling: the column of the last pass they were drawn at
        self.gen = gen              # sampling: the row's CPU generator (its uniforms)
        self.n_real = 0             # real tokens this row has cached
        self.reads = reads          # [0]: candidates this row reads (rule.start; Lean adapts it)
        self.out, self.done = [], False
        self.stats = {"accepted": [], "confidences": [], "cache_lens": [], "confirmed": 0,
                      "rejected": 0, "context_full": False, "stopped": False}


def make_rows(prompts, reads, temperature, seed):
    """One Row per prompt, reading as `reads` (the rule's start) says; when sampling, each with
    its own CPU generator, seeded by seed[b] (a list: one seed per prompt) or by
    row_seed(seed, b) (an int)."""
    seeds = list(seed) if isinstance(seed, (list, tuple)) else \
        [row_seed(seed, b) for b in range(len(prompts))]
    if len(seeds) != len(prompts):
        raise DecodeError(f"{len(seeds)} seeds for {len(prompts)} prompts: give one per prompt")
    return [Row(p, reads, torch.Generator().manual_seed(s) if temperature else None)
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
            n = max(0, min(row.reads[0], room, left, 0 if stop_pending else n_cand))
            if not row.new or (n == 0 and not row.pending):
                row.done = True
                row.stats["context_full"] = room < 1 and left > 0 and not row.stats["stopped"]
        reads.append(n)
    return reads


# -----------------------------------------------------------------------------
# One batched pass: each row's tokens, positions and mask in one padded input, and the commit


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


def commit_pass(rows, logits, R, reads, rule, verify, n_cand, stops, max_new_tokens, stop_fn,
                sampling, q_src):
    """Every active row's commit step (commit_row) on this pass's logits (B, R + M, V). Returns
    how many of each row's new tokens stay in the cache, and (sampling) the pass's processed
    distributions, which the next pass checks the proposed tokens against."""
    conf, cand_l, probs, guesses = read_batch(rows, logits, R, reads, sampling, q_src)
    # the acceptance rule, on each row's candidates: the prediction at its last new token,
    # then its masks' (columns R-1 on)
    take = rule.accept(conf[:, R - 1:]).tolist()
    conf_l = conf.tolist()
    kept = [0] * len(rows)
    for b, row in enumerate(rows):
        if row.done:
            continue
        p, cands, st = row.pending, cand_l[b][R - 1:R - 1 + reads[b]], row.stats
        r, committed, fresh, proposed, kept[b] = commit_row(
            row.new, p, guesses[b], cands, take[b], verify, stops)
        if r == p and cands:
            row.reads = rule.adapt(row.reads, min(take[b], len(cands)), n_cand)
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


# -----------------------------------------------------------------------------
# The loop


@torch.no_grad()
def generate_batch(model, prompts, rule, max_new_tokens=256, stop_ids=(), stop_fn=None,
                   timer=None, verify=False, engine="eager", temperature=0.0, top_k=0, top_p=1.0,
                   seed=0):
    """decode.generate for several prompts at once: one forward per pass for all of them, each
    row accepting its own number of tokens; a row's output is what generate gives for its prompt.

    rule, verify, stop_ids and sampling (temperature, top_k, top_p) are generate's. seed: an
    int (row b's generator is seeded by row_seed(seed, b); row 0 is generate's) or one seed per
    prompt: a row's output never depends on the other rows. stop_fn(ids) -> bool ends a row
    after a pass (e.g. a stop string in the text). engine: a make_engine name, or a ready
    engine object (one per batch shape).

    Returns (new token ids per prompt, stats): passes, tokens (all rows), the timings of the
    whole batch (decode.timings) and rows: per prompt generate's stats.
    """
    # --- setup: the request, the engine, one Row per prompt
    if not prompts:
        raise DecodeError("no prompts: give at least one")
    n_cand = max(check_request(model, p, rule, temperature, top_k, top_p) for p in prompts)
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
    rows = make_rows(prompts, rule.start(n_cand), temperature, seed)
    stops, passes = set(stop_ids), 0
    q_src = None                      # sampling: the last pass's processed distributions

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
        kept, q_src = commit_pass(rows, logits, R, reads, rule, verify, n_cand, stops,
                                  max_new_tokens, stop_fn, (temperature, top_k, top_p), q_src)
        cached = pop(run.cache, rows, is_new, kept, cached)
    # --- the stats: timings of the whole batch, then each row's
    tokens = sum(len(row.out) for row in rows)
    return [row.out for row in rows], {
        "passes": passes, "tokens": tokens, **timings(timer, passes, tokens, t_start, setup_s),
        "rows": [finish_stats(row.stats, row.out) for row in rows]}
