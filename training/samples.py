"""
A run's training samples and the order it takes them in: every sample's token ids, a seeded
permutation per epoch that a resumed run continues exactly (Stream), and how many micro-batches
make one optimizer step. distill.step_batches packs each micro-batch from them.
"""
import torch

from data import answer_start, load_dataset, sample_ids
from training.options import ConfigError


class Stream:
    """The global sample order: a seeded permutation per epoch; `pos` = samples consumed so far,
    saved in the checkpoint so a resumed run sees exactly the samples it would have seen.
    lengths (--batching sorted): each run of `group` samples of the permutation (one optimizer
    step's, all ranks') is sorted by length, so that its micro-batches hold neighbouring lengths
    while every step still draws its samples at random."""

    def __init__(self, n, seed, pos=0, lengths=None, group=1):
        self.n, self.seed, self.pos, self.lengths, self.group = n, seed, pos, lengths, group

    def order(self, epoch):
        g = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.n, generator=g)
        if self.lengths is None:
            return order
        lengths = torch.tensor(self.lengths)
        return torch.cat([run[torch.argsort(lengths[run], stable=True)]
                          for run in order.split(self.group)])

    def take(self, count):
        out = []
        for p in range(self.pos, self.pos + count):
            epoch, i = divmod(p, self.n)
            if i == 0 or not out:
                order = self.order(epoch)
            out.append(int(order[i]))
        self.pos += count
        return out


def load_samples(cfg, tok):
    """(token ids of every training sample of cfg.data, where each one's answer starts: only
    with --supervise answer, else None; it encodes every prompt a second time)."""
    rows = load_dataset(cfg.data, "train", cfg.data if cfg.data.endswith(".jsonl") else None)
    samples = [(s, r) for s, r in ((sample_ids(tok, r), r) for r in rows) if len(s) > 1]
    if not samples:
        raise ConfigError(f"dataset {cfg.data!r} has no usable rows")
    starts = [answer_start(tok, r, s) for s, r in samples] if cfg.supervise == "answer" else None
    return [s for s, _ in samples], starts


def accum_steps(cfg, world):
    """Micro-batches per optimizer step (gradient accumulation), from --step-tokens."""
    return max(1, cfg.step_tokens // (cfg.micro_batch * world * cfg.seq_len))


def sample_stream(cfg, seqs, world):
    """A new run's sample order (--batching sorted: each step's samples sorted by length)."""
    lengths = [len(s) for s in seqs] if cfg.batching == "sorted" else None
    return Stream(len(seqs), cfg.seed, lengths=lengths,
                  group=cfg.micro_batch * world * accum_steps(cfg, world))
