"""distill.mtp_step against a per-region reference that never builds the packed layout.

The reference follows docs/METHOD.md literally, one sample and one region at a time, with plain causal
forwards: the student reads x_0..x_p + (k-1) <MTP>, its argmax is the rollout, the teacher reads
x_0..x_p + the rollout's first k-1 tokens, and each target is the teacher's (or, with --targets
data, the sample's own next token), EOS past the sample's EOS. The first region whose span covers
the EOS is the sample's last. Targets come from the whole sample, also past the N-token window.
"""
import copy
import random

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model
from data import pack
from distill import TrainConfig, mtp_step, step_denominators

V, EOS, N, M = 40, 1, 24, 3          # teacher vocabulary (the student adds <MTP> = V), window, regions


def models(seed=0):
    """(student, teacher): the teacher is the init; the student is the init + <MTP>, nudged so
    that the two disagree somewhere (as after some training)."""
    teacher = tiny_model(seed=seed, vocab=V).requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(True)
    student.add_mtp_token()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    return student, teacher


def samples(k, offset, seed=0):
    """Rows whose EOS falls everywhere around the last region's span: inside the window, just past
    it (index N .. p_last+k-1), beyond its reach; a short row; a row cut without an EOS."""
    r = random.Random(seed)
    p_last = offset + (M - 1) * (N // M)
    eos_at = sorted({10, N + k + 3} | set(range(p_last - 1, p_last + k + 2)))
    rows = [[r.randint(2, V - 1) for _ in range(e)] + [EOS] for e in eos_at]
    rows.append([r.randint(2, V - 1) for _ in range(N + 1)])             # cut, no EOS
    return rows


def sample_eos(s):
    """Index of the sample's EOS (its last token), or None for a row cut without one."""
    return len(s) - 1 if s[-1] == EOS else None


def reference_regions(student, teacher, seqs, k, offset, cfg):
    """[(student logits (k, V+1), target ids (k,), teacher probs (k, V+1) or None)] of every
    region of every sample, in plain causal forwards, one region at a time."""
    mtp, stride, out = student.cfg.mtp_token_id, N // M, []
    for s in seqs:
        e = sample_eos(s)
        for r in range(M):
            p = offset + r * stride
            if e is not None and p >= e:               # the prefix would end at or after the EOS
                break
            prefix = s[:p + 1]
            logits = student(torch.tensor([prefix + [mtp] * (k - 1)]))[0, -k:]      # (k, V+1)
            rollout = logits.detach()[:, :V].argmax(-1)       # <MTP> is never an output
            past = [e is not None and p + j > e for j in range(1, k + 1)]
            probs = None
            if cfg.targets == "data":
                target = [EOS if past[j - 1] else s[p + j] if p + j < len(s) else -1
                          for j in range(1, k + 1)]
            else:
                with torch.no_grad():
                    t_logits = teacher(torch.tensor([prefix + rollout[:-1].tolist()]))[0, -k:]
                target = [EOS if past[j] else int(t_logits[j].argmax()) for j in range(k)]
                probs = F.pad(t_logits.softmax(-1), (0, 1))                          # (k, V+1)
                probs[torch.tensor(past)] = F.one_hot(torch.tensor(EOS), V + 1).float()
            out.append((logits, torch.tensor(target), probs))
            if e is not None and p + k >= e:           # its span covers the EOS: the last region
                break
    return out


def reference_loss(student, teacher, seqs, k, offset, cfg):
    """The step's loss: mean over every supervised position of the step (+ the mean NTP loss over
    every ground-truth position of the windows, up to each EOS, with --prefix-loss)."""
    terms = []
    for logits, target, probs in reference_regions(student, teacher, seqs, k, offset, cfg):
        logp = logits.float().log_softmax(-1)
        for j in range(k):
            if cfg.teacher == "soft" and cfg.targets == "teacher":
                t = probs[j]
                terms.append((t * (t.clamp(min=1e-30).log() - logp[j])).sum())
            elif target[j] >= 0:
                terms.append(-logp[j, target[j]])
    loss = torch.stack(terms).mean()
    if cfg.prefix_loss:
        nll = []
        for s in seqs:
            row = (s + [EOS] * N)[:N]                          # the window, padded with EOS
            e = sample_eos(s)
            last = N - 1 if e is None else min(e, N - 1)       # next-token targets 1..last
            logp = student(torch.tensor([row]))[0].log_softmax(-1)
            nll += [-logp[t - 1, row[t]] for t in range(1, last + 1)]
        loss = loss + torch.stack(nll).mean()
    return loss


def distill_loss(student, teacher, seqs, k, offset, cfg, n_micro):
    """distill.py's loss for one step of these rows split into n_micro micro-batches, summed as
    the training loop's gradient accumulation sums them."""
    chunks = [seqs[i::n_micro] for i in range(n_micro)]
    micro = [pack(c, k, offset, M, N, student.cfg.mtp_token_id, EOS) for c in chunks]
    denom, prefix_denom = step_denominators(micro, cfg, 1, torch.device("cpu"))
    return sum(mtp_step(student, teacher, P, cfg, student.cfg.mtp_token_id, EOS, denom,
                        prefix_denom)[0] for P in micro)


def loss_and_grads(student, fn):
    student.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in student.named_parameters()}


class Spy(torch.nn.Module):
    """A teacher that records every input it is given."""

    def __init__(self, teacher):
        super().__init__()
        self.teacher, self.inputs = teacher, []

    def forward(self, idx, **kw):
        self.inputs.append(idx.clone())
        return self.teacher(idx, **kw)


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_the_teacher_scores_the_students_own_rollout(mode):
    """What the teacher reads in mask slot j of every region is the student's argmax at the slot
    before (from a plain causal forward of the student on that region alone), and ground truth
    everywhere else. The teacher here keeps an <MTP> row, so a swap that feeds it the packed
    input itself fails on the comparison, not on an index error."""
    student, _ = models()
    spy = Spy(copy.deepcopy(student).requires_grad_(False))
    k, offset = 4, 5
    seqs = samples(k, offset)
    mtp = student.cfg.mtp_token_id
    P = pack(seqs, k, offset, M, N, mtp, EOS)
    cfg = TrainConfig(k=4, seq_len=N, regions=M, teacher=mode)
    mtp_step(student, spy, P, cfg, mtp, EOS, denom=1.0)
    (seen,) = spy.inputs                                    # (B, L): ONE teacher pass
    checked = 0
    for b, s in enumerate(seqs):
        for r in range(M):
            if not P.valid[b, r]:
                continue
            p = offset + r * (N // M)
            with torch.no_grad():
                logits = student(torch.tensor([s[:p + 1] + [mtp] * (k - 1)]))[0, -k:]
            rollout = logits[:, :V].argmax(-1)              # <MTP> (id V) is never an output
            assert seen[b, P.sup[r, 1:]].tolist() == rollout[:-1].tolist(), (b, r)
            checked += 1
    assert checked >= 2 * len(seqs)
    slots = P.sup[:, 1:].flatten()
    outside = torch.ones(P.idx.size(1), dtype=torch.bool)
    outside[slots] = False
    assert torch.equal(seen[:, outside], P.idx[:, outside])   # the ground truth is untouched


MODES = {"hard": {}, "soft": {"teacher": "soft"}, "data": {"targets": "data"},
         "prefix-loss": {"prefix_loss": True}}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k,offset", [(4, 5), (3, 7), (2, 4)])
def test_mtp_step_equals_the_per_region_reference(mode, k, offset):
    """Loss and gradients of one step, split into 1 or 3 micro-batches, equal the reference's."""
    student, teacher = models()
    cfg = TrainConfig(k=4, seq_len=N, regions=M, **MODES[mode])
    seqs = samples(k, offset)
    ref_loss, ref_grads = loss_and_grads(
        student, lambda: reference_loss(student, teacher, seqs, k, offset, cfg))
    for n_micro in (1, 3):
        loss, grads = loss_and_grads(
            student, lambda: distill_loss(student, teacher, seqs, k, offset, cfg, n_micro))
        torch.testing.assert_close(loss, ref_loss, atol=2e-6, rtol=1e-5)
        for name, g in ref_grads.items():
            torch.testing.assert_close(grads[name], g, atol=2e-6, rtol=1e-4, msg=f"{name}, {n_micro} micro")


def test_eos_just_past_the_window_gets_eos_targets():
    """The edge the reference caught: a sample whose EOS lies at index N .. p_last+k-1 (outside
    the window the model sees, inside the last region's span) gets EOS past its EOS, its real
    tokens before it, and no region after that one."""
    k, offset = 4, 7                                   # regions end at 7, 15, 23; span 24..27
    r = random.Random(1)
    for e in range(N, N + k - 1):                      # EOS at 24, 25, 26
        s = [r.randint(2, V - 1) for _ in range(e)] + [EOS]
        P = pack([s], k, offset, M, N, V, EOS)
        assert P.valid[0].tolist() == [True, True, True]
        assert P.past_eos[0, 2].tolist() == [j > e for j in range(24, 28)]
        assert P.targets[0, 2].tolist() == [s[j] if j <= e else EOS for j in range(24, 28)]
        assert P.length.tolist() == [N]                # the window holds N of its tokens


def test_data_targets_past_the_window_are_the_samples_own_tokens():
    """--targets data: ground truth past the window is known when the sample has it; only a
    sample cut without an EOS leaves targets past its last token unknown."""
    k, offset = 4, 7
    long = list(range(2, 2 + 40)) + [EOS]              # EOS far past the window
    cut = list(range(2, 2 + N + 2))                    # N+2 tokens, no EOS
    P = pack([long, cut], k, offset, M, N, V, EOS)
    assert P.targets[0, 2].tolist() == long[24:28]
    assert P.targets[1, 2].tolist() == cut[24:26] + [-1, -1]
    assert not P.past_eos.any()
