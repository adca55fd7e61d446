"""
Multi-token decoding from an MTP checkpoint with a KV cache (docs/METHOD.md, "Inference").

    python decode.py --ckpt runs/mtp-synth/ckpt --prompt "Ava has 12 apples. ..." --tau 0.9 --viz
    python decode.py --ckpt DIR --prompt "..." --static-k 3
    python decode.py --ckpt DIR --prompt "..." --tau 0.9 --verify      # output == static k=1
    python decode.py --ckpt DIR --prompt "..." --tau 0.9 --verify --temperature 0.7 --top-p 0.9
    python decode.py --ckpt DIR --prompt "..." --device cuda --dtype bf16 --engine graphs

Each pass feeds the newly accepted tokens plus k_max-1 <MTP> tokens, reads k_max candidates from
one forward pass, lets a rule accept a leading run of them (Static(k): k; ConfAdapt(tau): while
every top-1 probability is above tau), and pops the <MTP> entries from the cache; accepted
tokens enter the cache as inputs of the next pass, so after every pass the cache holds real
tokens only. `generate` does this for one prompt in one loop; it is what the command line runs.
With --verify the tokens accepted from <MTP> slots are provisional until the next pass confirms
them (docs/METHOD.md, "Verified mode"). --temperature (with --top-k, --top-p, --seed) samples
every candidate from its slot's processed distribution; verified, the output is then distributed
exactly as one-token-at-a-time sampling's (docs/METHOD.md, "Sampling"). Many prompts at once:
fast/batch.py (generate_batch, tested equal to generate); CUDA graphs: fast/cuda_graphs.py.
"""
import argparse
import hashlib
import os
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass

import torch

from compat.hf import from_pretrained
from compat.tokenizers import TokenizerError, check_vocab, load_tokenizer
from data import plain_prompt
from display.chunks import chunks, viz_html, viz_terminal
from fast.cuda_graphs import CudaGraphs
from fast.lean import Lean
from model import CheckpointError, KVCache


class DecodeError(ValueError):
    """Bad decoding input: the message names the problem and the fix."""


# -----------------------------------------------------------------------------
# Decoding rules: how many candidates a pass reads, and how many of them it accepts. A rule is
# one small object; a new one is a class here and a line in RULE_FLAGS (README, "For courses")


class Rule:
    """A subclass gives its `name` (this rule with its settings: tables, logs), `family` (its
    kind: a plot's legend) and accept(); the rest has defaults."""
    family = "rule"

    def reads(self, k_max):
        """Candidates one pass reads, given the checkpoint's k_max."""
        return k_max

    def accept(self, conf):
        """How many of the candidates to accept: conf (..., n) top-1 probabilities -> (...)."""
        raise NotImplementedError

    def check(self):
        """Raise DecodeError for settings the rule cannot run with."""

    def start(self, n_max):
        """The read state of a prompt's first pass; its [0]: the candidates the pass reads."""
        return (n_max,)

    def adapt(self, state, take, n_max):
        """The next pass's read state after `take` of its candidates were accepted."""
        return state


@dataclass(frozen=True)
class Static(Rule):
    """Static k: the first k candidates every pass."""
    k: int
    family = "static"

    @property
    def name(self):
        return f"static k={self.k}"

    def reads(self, k_max):
        return self.k

    def accept(self, conf):
        return torch.full(conf.shape[:-1], min(self.k, conf.size(-1)), dtype=torch.long,
                          device=conf.device)

    def check(self):
        if not self.k >= 1:
            raise DecodeError(f"static k must be >= 1, got {self.k}")


@dataclass(frozen=True)
class ConfAdapt(Rule):
    """ConfAdapt(tau): the longest leading run of candidates whose top-1 probability is > tau,
    and at least one (the first candidate is an ordinary next-token prediction), of k_max
    candidates (None: the checkpoint's).

    The confidence is the top-1 probability of the slot's distribution: of the softmax when
    greedy, of the processed distribution when sampling, never the sampled token's own
    probability. Under verification that matters: whether a slot's draft is proposed must not
    depend on which token was drawn there, or the proposed token is no longer distributed as q
    and the ratio test is biased (q = (0.8, 0.2), p = (0.5, 0.5), tau = 0.5: proposing only a
    likely draw commits token 0 with probability 0.6, not 0.5)."""
    tau: float
    k_max: int | None = None
    family = "ConfAdapt"

    @property
    def name(self):
        return f"ConfAdapt tau={self.tau}"

    def reads(self, k_max):
        return self.k_max or k_max

    def accept(self, conf):
        run = (conf > self.tau).long().cumprod(-1).sum(-1)
        return run.clamp(min=1)

    def check(self):
        if not 0.0 <= self.tau <= 1.0:
            raise DecodeError(f"tau must be in [0, 1], got {self.tau}")
        if self.k_max is not None and not self.k_max >= 1:
            raise DecodeError(f"k_max must be >= 1, got {self.k_max}")


# The rules of the command lines: --FLAG VALUE makes the rule (decode.py); bench.py takes a
# comma-separated list of values for each flag. A new rule: its class above and one line here.
RULE_FLAGS = {
    "--static-k": (int, lambda k, a: Static(k), "accept exactly k tokens per pass"),
    "--tau": (float, lambda tau, a: ConfAdapt(tau, a.k_max),
              "ConfAdapt: accept while every candidate's top-1 probability is above tau"),
}


def label(rule, verify):
    """How the outputs name a rule: its name, verified or not."""
    return ("verified " if verify else "") + rule.name


def untrained(rule, cfg):
    """How many of the candidates a pass of `rule` reads lie past the checkpoint's trained k_max
    (0: none, or a checkpoint that does not say): guesses the student never learned to make."""
    return max(0, rule.reads(cfg.mtp_k_max) - cfg.mtp_k_max) if cfg.mtp_k_max else 0


# -----------------------------------------------------------------------------
# Sampling: the processed distribution, the draw, and the check of a sampled draft
# (docs/METHOD.md, "Sampling"). Every random number is a uniform from a row's own CPU generator


def process(logits, temperature, top_k=0, top_p=1.0):
    """The distribution a candidate is drawn from: logits (..., V) divided by the temperature,
    cut to the top_k most likely tokens (0: no cut; ties at the k-th are kept), softmax, cut to
    the smallest set of most likely tokens holding probability top_p (1: no cut), renormalised.
    Returns fp32 probabilities (..., V); <MTP> is never an output, its logit being -inf (the
    decoders set it so). temperature 0 is greedy: one-hot at the argmax, the limit as the
    temperature goes to 0 (with it verify_sampled is greedy verification)."""
    logits = logits.float()
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


def readout(logits, temperature, top_k, top_p, u):
    """Candidates from a pass's logits (..., V): (conf, cand, probs). Greedy (temperature 0):
    each slot's argmax and its softmax probability, probs None. Sampling: each drawn from its
    slot's processed distribution probs (process, draw with the uniforms u (...)), with the top-1
    probability of that distribution as its confidence (ConfAdapt says why)."""
    if temperature == 0:
        conf, cand = logits.float().softmax(-1).max(-1)
        return conf, cand, None
    probs = process(logits, temperature, top_k, top_p)
    return probs.amax(-1), draw(probs, u), probs


def sampled_guess(drafts, q, p, u):
    """One row's verify_sampled: the model's own tokens at its provisional tokens `drafts`, which
    commit_row checks them against: the drafts the ratio test confirms, then the residual's
    draw. q (m, V): the distributions the drafts were drawn from; p (>= m, V): the pass's, its
    first m rows read at them; u: the pass's uniforms (pass_uniforms), the residual's last."""
    m = len(drafts)
    r, fix = verify_sampled(torch.tensor(drafts, device=p.device), q, p[:m], u[:m], u[-1],
                            torch.tensor(m, device=p.device))
    return drafts[:int(r)] + [int(fix)]


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
# One prompt: check the request, commit what a pass confirmed and accepted, the loop around it


def default_k_max(cfg):
    """The candidates a pass reads unless a rule says otherwise: the k_max the checkpoint was
    trained for (mtp_k_max), or 4 for one that does not say."""
    return cfg.mtp_k_max or 4


def check_request(model, prompt_ids, rule, temperature=0.0, top_k=0, top_p=1.0):
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
    if not hasattr(rule, "accept"):
        raise DecodeError(f"{rule!r} is not a decoding rule (e.g. Static(1), ConfAdapt(0.9))")
    rule.check()
    n = rule.reads(default_k_max(cfg))
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


def one_pass(run, timer, new, pending, n, mtp, device):
    """One forward over the new tokens and n-1 <MTP> slots; logits (pending + n, V) at the
    provisional tokens' predecessors (to verify them), at the last new token and at each slot
    (the candidates), <MTP> never an output; and the seconds a new CUDA graph took (untimed)."""
    masks, w = max(0, n - 1), len(new)
    idx = torch.tensor([new + [mtp] * masks], device=device)
    out_idx = torch.arange(w - pending - 1, w + masks, device=device)[None]
    setup = run.prepare(idx, None, None, out_idx)
    with timer:
        logits = run(idx, None, None, out_idx)[0]
    if mtp is not None:
        logits[:, mtp] = -torch.inf
    return logits, setup


@torch.no_grad()
def generate(model, prompt_ids, rule, max_new_tokens=256, stop_ids=(), verify=False,
             temperature=0.0, top_k=0, top_p=1.0, seed=0, engine="eager", timer=None):
    """Multi-token generation from one prompt: the whole method in one loop.

    rule: Static(k), ConfAdapt(tau), Lean(rule)... (how many candidates a pass reads and
    accepts). temperature 0 is greedy; above it each candidate is drawn from its slot's
    processed distribution (process), with uniforms from a CPU generator seeded by
    row_seed(seed, 0). verify: tokens accepted from <MTP> slots are provisional until the next
    pass confirms them (commit_row; sampling, verify_sampled): the output is then the model's
    own k=1 output (sampling: in distribution). engine: how a pass runs (make_engine). Returns
    (new ids, stats): per pass the committed count (accepted), the candidates' confidences and
    the cache length after the pop (cache_lens); confirmed, rejected, stopped, context_full;
    passes, tokens, effective_k; and the timings (timings)."""
    n_cand = check_request(model, prompt_ids, rule, temperature, top_k, top_p)
    if max_new_tokens < 1:
        raise DecodeError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    run = make_engine(model, 1, engine) if isinstance(engine, str) else engine
    run.reset()
    timer, t_start, setup_s = timer or PassTimer(model.device), time.perf_counter(), 0.0
    mtp, stops, ctx = model.cfg.mtp_token_id, set(stop_ids), model.cfg.max_seq_len
    gen = torch.Generator().manual_seed(row_seed(seed, 0)) if temperature else None
    out, reads = [], rule.start(n_cand)   # reads[0]: candidates to read (a Lean rule adapts it)
    new, pending = list(prompt_ids), 0    # tokens to feed; the last `pending` are provisional
    q_src, q_from = None, 0               # sampling: the distributions they were drawn from
    st = {"accepted": [], "confidences": [], "cache_lens": [], "confirmed": 0, "rejected": 0,
          "stopped": False, "context_full": False}
    while True:
        room, left = ctx - len(run.cache) - len(new), max_new_tokens - len(out) - pending
        n = 0 if pending and new[-1] in stops else max(0, min(reads[0], room, left))
        if not new or (n == 0 and not pending):            # done: nothing to read or verify
            st["context_full"] = room < 1 and left > 0 and not st["stopped"]
            break
        logits, setup = one_pass(run, timer, new, pending, n, mtp, model.device)
        setup_s += setup
        u = pass_uniforms(gen, pending, n).to(model.device) if gen else None
        conf, cand, probs = readout(logits, temperature, top_k, top_p, u if u is None else u[:-1])
        guess = cand[:pending].tolist()           # greedy: the model's own token at each one
        if probs is not None and pending:         # sampling: the ratio test, then the residual
            guess = sampled_guess(new[-pending:], q_src[q_from:q_from + pending], probs, u)
        take = int(rule.accept(conf[pending:]))
        r, committed, fresh, proposed, kept = commit_row(
            new, pending, guess, cand[pending:pending + n].tolist(), take, verify, stops)
        run.cache.truncate(len(run.cache) - len(new) - max(0, n - 1) + kept)   # the pop
        if r == pending and n:
            reads = rule.adapt(reads, min(take, n), n_cand)
        committed = committed[:max_new_tokens - len(out)]
        out += committed
        st["confirmed"], st["rejected"] = st["confirmed"] + r, st["rejected"] + pending - r
        st["accepted"].append(len(committed))
        st["confidences"].append([round(c, 4) for c in conf[pending:pending + n].tolist()])
        st["cache_lens"].append(len(run.cache))
        st["stopped"] = bool(out) and out[-1] in stops
        if st["stopped"] or len(out) >= max_new_tokens:
            break
        # sampling: the proposed tokens were drawn from their slots, after the first candidate
        q_src, q_from = probs, pending + 1
        new, pending = fresh + proposed, len(proposed)
    passes = len(st["accepted"])
    return out, {**finish_stats(st, out), **timings(timer, passes, len(out), t_start, setup_s)}


def finish_stats(st, out):
    """A row's stats with its totals: passes, tokens, effective_k and the histogram of
    committed counts per pass."""
    passes = len(st["accepted"])
    return {**st, "passes": passes, "tokens": len(out), "effective_k": len(out) / max(1, passes),
            "histogram": dict(sorted(Counter(st["accepted"]).items()))}


# -----------------------------------------------------------------------------
# Engines: how one pass runs. Eager is the reference; fast/cuda_graphs.py replays captured
# passes over a static cache on a GPU. Timing: CUDA events on the GPU, the host clock on the CPU


class Eager:
    """The model with a growing KVCache: any shape, any device. An engine is called on a pass's
    (idx, pos, mask, out_idx) (pos and mask None: a causal pass continuing the cache), owns the
    `cache` the decoders truncate, and has prepare() (set up a new pass shape ahead of the timed
    pass: returns the seconds it took) and reset() (an empty cache for the next prompts)."""

    def __init__(self, model, batch):
        self.model, self.batch = model, batch
        self.reset()

    def reset(self):
        self.cache = KVCache()

    def prepare(self, idx, pos, mask, out_idx):
        return 0.0

    def __call__(self, idx, pos, mask, out_idx):
        return self.model(idx, pos=pos, mask=mask, cache=self.cache, out_idx=out_idx)


ENGINES = ("eager", "graphs", "compile", "static")


def check_engine(engine, device):
    """An engine that can run on `device` (DecodeError naming the fix if not)."""
    if engine not in ENGINES:
        raise DecodeError(f"unknown engine {engine!r}: {', '.join(ENGINES)}")
    if engine not in ("eager", "static") and torch.device(device).type != "cuda":
        raise DecodeError(f"engine {engine!r} needs a CUDA device; use eager (or static) on the CPU")


def make_engine(model, batch, engine="eager", capacity=None):
    """engine: eager | graphs (CUDA graphs) | compile (torch.compile + CUDA graphs) | static
    (the graphs' static-cache layout, uncaptured: for checking it on the CPU)."""
    check_engine(engine, model.device)
    if engine == "eager":
        return Eager(model, batch)
    return CudaGraphs(model, batch, capacity or model.cfg.max_seq_len,
                      graphs=engine != "static", compile=engine == "compile")


class PassTimer:
    """`with timer:` around each forward; times() -> milliseconds per timed pass."""

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
        if self.pending:                 # synchronizes once, at the end, on CUDA
            torch.cuda.synchronize()
            self.ms += [s.elapsed_time(e) for s, e in self.pending]
            self.pending = []
        return self.ms


def timings(timer, passes, tokens, t_start, setup_s):
    """A decoding call's timings: each forward's ms and their sum (forward_ms), the call's wall
    time less CUDA-graph captures (wall_ms, which tokens_per_s uses; captures: setup_ms, made
    once per shape by a server, not once per request)."""
    ms = timer.times()[-passes:] if passes else []
    wall = 1000 * (time.perf_counter() - t_start - setup_s)
    return {"ms": ms, "forward_ms": sum(ms), "wall_ms": wall, "setup_ms": 1000 * setup_s,
            "tokens_per_s": 1000 * tokens / wall}


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
        read_only = os.statvfs(folder).f_flag & os.ST_RDONLY
        why = "a read-only file system" if read_only else "no permission"
        raise DecodeError(f"{flag} {path} cannot be written ({why}): pick another path")


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def load_for_decoding(path, device, dtype="fp32"):
    """A checkpoint as the decoders run it: eval mode, on `device`, weights in `dtype`."""
    if dtype not in DTYPES:
        raise DecodeError(f"--dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
    return from_pretrained(path, device=device, dtype=DTYPES[dtype]).eval()


def median_tokens_per_s(fn, repeats):
    """Median tokens/s of `repeats` runs of fn() -> stats: one run is at the mercy of whatever
    else the machine does."""
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
    rules = p.add_mutually_exclusive_group()
    for flag, (kind, _, help) in RULE_FLAGS.items():
        rules.add_argument(flag, type=kind, help=help + (" (the default: 0.9)" if flag == "--tau" else ""))
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
    p.add_argument("--engine", default="eager", choices=ENGINES,
                   help="eager | graphs (CUDA graphs) | compile (torch.compile + CUDA graphs) | "
                        "static (the graphs' cache layout, uncaptured)")
    p.add_argument("--viz", action="store_true", help="colour each pass's committed chunk by its size")
    p.add_argument("--viz-html", help="write the coloured chunks to this HTML file")
    p.add_argument("--repeats", type=int, default=5, help="runs timed for the speedup (median)")
    p.add_argument("--no-baseline", action="store_true", help="skip the k=1 runs for the speedup")
    a = p.parse_args(argv)
    given = [(flag, make, getattr(a, flag[2:].replace("-", "_"))) for flag, (_, make, _) in
             RULE_FLAGS.items() if getattr(a, flag[2:].replace("-", "_")) is not None]
    a.rule = given[0][1](given[0][2], a) if given else ConfAdapt(0.9, a.k_max)
    if a.lean:
        a.rule = Lean(a.rule)
    return a


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
        trained, beyond = model.cfg.mtp_k_max, untrained(a.rule, model.cfg)
        if beyond:
            print(f"warning: {a.rule.name} reads {trained + beyond} candidates per pass, {beyond} of "
                  f"them past the checkpoint's trained mtp_k_max {trained}: those guesses are "
                  "untrained", file=sys.stderr)
        kw = dict(max_new_tokens=a.max_new, stop_ids=tok.stop_ids, temperature=a.temperature,
                  top_k=a.top_k, top_p=a.top_p, seed=a.seed)
        capacity = min(model.cfg.max_seq_len, len(ids) + a.max_new + 2 * default_k_max(model.cfg))
        engine = make_engine(model, 1, a.engine, capacity)   # one for every run: graphs kept
        run = lambda rule, verify: generate(model, ids, rule, **kw, verify=verify, engine=engine)[1]
        generate(model, ids, a.rule, **{**kw, "max_new_tokens": 8}, engine=engine)    # warm-up
        out, st = generate(model, ids, a.rule, **kw, verify=a.verify, engine=engine)
    except (DecodeError, CheckpointError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    pieces = chunks(tok, out, st["accepted"])
    print(viz_terminal(pieces) if a.viz else tok.decode(out))
    name = label(a.rule, a.verify) + (f", temperature {a.temperature}" if a.temperature else "")
    print(f"\n[{name}] {st['tokens']} tokens in {st['passes']} passes: effective k "
          f"{st['effective_k']:.2f}, histogram {st['histogram']}, {st['forward_ms'] / st['passes']:.1f} "
          f"ms/pass, {st['tokens_per_s']:.1f} tokens/s on {a.device} ({a.dtype}, {a.engine})")
    if a.verify:
        print(f"verified: {st['confirmed']} provisional tokens confirmed, {st['rejected']} rejected")
    if st["context_full"]:
        print(f"warning: the output stops at the end of the model's context ({model.cfg.max_seq_len} "
              f"tokens: the prompt's {len(ids)} and {st['tokens']} new), short of --max-new "
              f"{a.max_new}: a shorter prompt leaves more room", file=sys.stderr)
    if not a.no_baseline and not (a.rule == Static(1) and not a.verify):   # k=1 against itself
        ours = median_tokens_per_s(lambda: run(a.rule, a.verify), a.repeats)
        base = median_tokens_per_s(lambda: run(Static(1), False), a.repeats)
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
