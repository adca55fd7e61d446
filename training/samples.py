"""
A run's training samples and the order it takes them in: every sample's token ids, a seeded
permutation per epoch that a resumed run continues exactly (Stream), and how many micro-batches
make one optimizer step. distill.step_batches packs each micro-batch from them.
"""
import torch

from data import answer_in_window, answer_start, load_dataset, sample_ids
from training.log import warn
from training.options import ConfigError


class Stream:
    """The global sample order: a seeded permutation per epoch; `pos` = samples consumed so far,
    saved in the checkpoint so a resumed run sees exactly the samples it would have seen.
    lengths (--batching sorted): each run of `group` samples of the permutation (one optimizer
    step's, all ranks') is sorted by length, so that its micro-batches hold neighbouring lengths
    while every step still draws its samples at random."""

    def __init__(self, n, seed, pos=0, lengths=None, group=1):
        self.n, self.seed, self.pos, self.lengths, self.group = n, seed, pos, lengths, group
        self.kept = (None, None)            # (epoch, its order): every take of an epoch reads it

    def order(self, epoch):
        if self.kept[0] != epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.n, generator=g)
            if self.lengths is not None:
                lengths = torch.tensor(self.lengths)
                order = torch.cat([run[torch.argsort(lengths[run], stable=True)]
                                   for run in order.split(self.group)])
            self.kept = (epoch, order)
        return self.kept[1]

    def take(self, count):
        out = []
        for p in range(self.pos, self.pos + count):
            epoch, i = divmod(p, self.n)
            if i == 0 or not out:
                order = self.order(epoch)
            out.append(int(order[i]))
        self.pos += count
        return out


def load_samples(cfg, tok, warn=warn):
    """(token ids of every training sample of cfg.data, where each one's answer starts: only
    with --supervise answer, else None; it encodes every prompt a second time). What would train
    less than it seems is said in one line through `warn` (rows without an answer, left out;
    samples longer than --seq-len, cut), or refused where nothing of any answer would train."""
    rows = load_dataset(cfg.data, "train")
    answered = [r for r in rows if r["answer"].strip()]
    if rows and not answered:
        raise ConfigError(f"dataset {cfg.data!r}: every one of its {len(rows)} rows has an empty "
                          "answer, so there is nothing to learn: give rows with answers")
    if len(answered) < len(rows):
        warn(f"{len(rows) - len(answered)} of the {len(rows)} rows of {cfg.data} have an empty "
             "answer: they are left out")
    samples = [(s, r) for s, r in ((sample_ids(tok, r), r) for r in answered) if len(s) > 1]
    if not samples:
        raise ConfigError(f"dataset {cfg.data!r} has no usable rows")
    starts = [answer_start(tok, r, s) for s, r in samples] if cfg.supervise == "answer" else None
    check_cut(cfg, tok, samples, starts, warn)
    return [s for s, _ in samples], starts


def check_cut(cfg, tok, samples, starts, warn):
    """Samples longer than --seq-len are cut to it: a warning with their count and how many of
    them lose their whole answer, or an error when no sample keeps any of its answer."""
    cut = [i for i, (s, _) in enumerate(samples) if len(s) > cfg.seq_len]
    if not cut:
        return
    if starts:
        lost = sum(starts[i] >= cfg.seq_len for i in cut)
    else:
        lost = sum(not answer_in_window(tok, samples[i][1], samples[i][0], cfg.seq_len) for i in cut)
    longest = max(len(s) for s, _ in samples)
    if lost == len(samples):
        raise ConfigError(f"--seq-len {cfg.seq_len} cuts every sample before its answer begins: no "
                          f"answer token would be trained. Give a longer --seq-len (the samples are "
                          f"up to {longest} tokens long)")
    whole = f", {lost} of them before their answer begins" if lost else ""
    warn(f"{len(cut)} of the {len(samples)} samples are longer than --seq-len {cfg.seq_len} and are "
         f"cut to it{whole} (the longest is {longest} tokens): what is cut off is not trained")


def accum_steps(cfg, world):
    """Micro-batches per optimizer step (gradient accumulation), from --step-tokens."""
    return max(1, cfg.step_tokens // (cfg.micro_batch * world * cfg.seq_len))


def step_size_note(cfg, world):
    """A warning line when --step-tokens is not a whole number of micro-batches: a step trains
    accum_steps() whole ones, which is then not the size it gives (None: it is)."""
    micro = cfg.micro_batch * world * cfg.seq_len           # tokens of one micro-batch, all ranks
    if cfg.step_tokens % micro == 0:
        return None
    accum, rows = accum_steps(cfg, world), cfg.step_tokens // (world * cfg.seq_len)
    hint = ""
    if rows and cfg.step_tokens % (world * cfg.seq_len) == 0:      # micro-batches that divide it
        fits = max(d for d in range(1, min(rows, cfg.micro_batch) + 1) if rows % d == 0)
        hint = f"; --micro-batch {fits} makes it {cfg.step_tokens}"
    return (f"--step-tokens {cfg.step_tokens} is not a whole number of micro-batches of "
            f"{cfg.micro_batch * world} x {cfg.seq_len} tokens: each step trains {accum} x "
            f"{cfg.micro_batch * world} sequences, {accum * micro} tokens{hint}")


def sample_stream(cfg, seqs, world):
    """A new run's sample order (--batching sorted: each step's samples sorted by length)."""
    lengths = [len(s) for s in seqs] if cfg.batching == "sorted" else None
    return Stream(len(seqs), cfg.seed, lengths=lengths,
                  group=cfg.micro_batch * world * accum_steps(cfg, world))
