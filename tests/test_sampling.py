"""Sampling in decode.py: the processed distribution, the draw, the ratio test, the seeds, and an
exact check that verified sampling's outputs are distributed as one-token-at-a-time sampling's."""
import itertools
import math
from collections import Counter

import pytest
import torch

from conftest import mtp_model, rules, tiny_model
from decode import (DecodeError, Static, draw, generate, pass_uniforms, process, row_seed,
                    verify_sampled)
from fast.batch import generate_batch


def reference_process(logits, temperature, top_k=0, top_p=1.0, margins=None):
    """process for one slot, written out in plain Python: logits (a list) -> probabilities.
    margins: if given, gets how close the top-p cut came to taking one token more or less."""
    V = len(logits)
    if temperature == 0:
        best = max(range(V), key=lambda i: (logits[i], -i))          # the first of a tie
        return [float(i == best) for i in range(V)]
    z = [x / temperature for x in logits]
    if top_k:
        kth = sorted(z, reverse=True)[top_k - 1]
        z = [x if x >= kth else -math.inf for x in z]
    top = max(z)
    e = [math.exp(x - top) if x > -math.inf else 0.0 for x in z]
    p = [x / sum(e) for x in e]
    if top_p < 1.0:
        kept, mass = [], 0.0
        for i in sorted(range(V), key=lambda i: -p[i]):       # most likely first, ties by id
            if mass >= top_p:
                break
            kept.append(i)
            mass += p[i]
            if margins is not None and p[i] > 0:
                margins.append(abs(mass - top_p))
        p = [p[i] / mass if i in kept else 0.0 for i in range(V)]
    return p


SETTINGS = [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.5, 3, 1.0), (1.0, 0, 0.6), (0.8, 4, 0.7), (0.0, 0, 1.0)]


@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS)
def test_process_matches_a_reference(temperature, top_k, top_p):
    torch.manual_seed(1)
    logits = 2 * torch.randn(5, 9)
    logits[0, 3] = logits[0, 5] = logits[0].max() + 1     # a tie at the top
    logits[:, 8] = -math.inf                              # <MTP>, as the decoders set it
    got = process(logits, temperature, top_k, top_p)
    for row, g in zip(logits.tolist(), got):
        ref = reference_process(row[:8] + [-math.inf], temperature, top_k, top_p)
        assert g.tolist() == pytest.approx(ref, abs=1e-6)
        assert g[8] == 0 and abs(float(g.sum()) - 1) < 1e-6           # <MTP> is never an output


def test_draw_is_the_inverse_cdf():
    probs = torch.tensor([0.25, 0.0, 0.5, 0.25, 0.0])
    u = torch.tensor([0.0, 0.2499, 0.25, 0.7499, 0.75, 1 - 1e-16], dtype=torch.float64)
    assert draw(probs.expand(6, 5), u).tolist() == [0, 0, 2, 2, 3, 3]
    assert draw(3 * probs.expand(6, 5), u).tolist() == [0, 0, 2, 2, 3, 3]   # unnormalised
    assert int(draw(torch.tensor([0.5, 0.5, 0.0]), torch.tensor(1 - 1e-17))) == 1


def committed_distribution(q, p, grid=300):
    """The law of verify_sampled's committed token for one draft x ~ q, integrating both
    uniforms (the ratio test's, the residual's) on a midpoint grid: P(token) (V,)."""
    V, G = q.numel(), grid * grid
    mid = (torch.arange(grid) + 0.5).double() / grid
    u, u_fix = mid.repeat_interleave(grid).expand(V, G), mid.repeat(grid).expand(V, G)
    x = torch.arange(V)[:, None].expand(V, G)                        # every draft, every pair
    r, fix = verify_sampled(x[..., None], q.expand(V, G, 1, V), p.expand(V, G, 1, V),
                            u[..., None], u_fix, torch.ones(V, G, dtype=torch.long))
    token = torch.where(r == 1, x, fix)                                    # (V, G)
    onehot = torch.nn.functional.one_hot(token, V).double()               # (V, G, V)
    return (q.double()[:, None] * onehot.mean(1)).sum(0)


def test_verify_sampled_commits_p():
    """Whatever q a draft came from, the committed token is distributed as p; with the example
    of ConfAdapt's docstring too."""
    cases = [([0.8, 0.2], [0.5, 0.5]), ([0.1, 0.6, 0.3, 0.0], [0.5, 0.0, 0.2, 0.3]),
             ([0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1]), ([0.4, 0.6], [0.4, 0.6])]
    for q, p in cases:
        got = committed_distribution(torch.tensor(q), torch.tensor(p))
        assert got.tolist() == pytest.approx(p, abs=5e-3), (q, p)


def test_verify_sampled_by_hand():
    """The ratio test in order, padding on the left, the residual, and temperature 0's one-hot
    distributions giving greedy verification (confirm iff argmax; else the argmax)."""
    q = torch.tensor([[0.5, 0.5, 0.0], [0.9, 0.1, 0.0], [0.2, 0.2, 0.6]])
    p = torch.tensor([[0.3, 0.7, 0.0], [0.0, 0.5, 0.5], [0.2, 0.2, 0.6]])
    x = torch.tensor([0, 0, 2])
    # x0: 0.5 u < 0.3 iff u < 0.6; x1: p(0) = 0 never; x2: p = q always
    for u0, r_want in ((0.59, 1), (0.61, 0)):
        r, fix = verify_sampled(x, q, p, torch.tensor([u0, 0.0, 0.9]), torch.tensor(0.5),
                                torch.tensor(3))
        assert int(r) == r_want
    assert int(fix) == 1                    # residual of slot 0: (0, 0.2, 0) -> token 1
    r, fix = verify_sampled(x, q, p, torch.tensor([0.0, 0.0, 0.0]), torch.tensor(0.5),
                            torch.tensor(2))           # the first column is padding
    assert int(r) == 0 and int(fix) == 2               # slot 1 residual (0, 0.4, 0.5), u 0.5
    hot = lambda i: torch.nn.functional.one_hot(torch.tensor(i), 3).float()
    for draft, best in ((1, 1), (2, 0)):
        r, fix = verify_sampled(torch.tensor([draft]), hot([draft]), hot([best]),
                                torch.tensor([0.99]), torch.tensor(0.3), torch.tensor(1))
        assert int(r) == (draft == best) and (draft == best or int(fix) == best)
    assert process(torch.tensor([[0.1, 2.0, -1.0]]), 0.0).tolist() == [[0.0, 1.0, 0.0]]


def test_static_k_samples_every_slot():
    """Static k=3 at temperature 1: the first pass's three tokens are draws from its three
    slots' processed distributions with the row's first uniforms."""
    m = mtp_model()
    prompt, mtp = [4, 4, 2], m.cfg.mtp_token_id
    out, _ = generate(m, prompt, Static(3), max_new_tokens=3, temperature=1.3, top_k=20, seed=5)
    logits = m(torch.tensor([prompt + [mtp] * 2]))[0, -3:]
    u = pass_uniforms(torch.Generator().manual_seed(row_seed(5, 0)), 0, 3)
    logits[:, mtp] = -torch.inf
    assert out == draw(process(logits, 1.3, 20), u[:3]).tolist()


PROMPTS = [[59, 15, 1], [58, 30, 41, 27, 18, 40, 33], [53, 18, 5, 40, 45, 51, 43, 10, 54, 17, 38]]


def test_seeds_reproduce_and_rows_are_independent():
    """The same seed gives the same output; a row of a batch is that prompt decoded alone with
    row_seed(seed, b), whatever the other rows; generate is row 0; any engine draws the same."""
    m = mtp_model()
    kw = dict(max_new_tokens=12, temperature=1.0, top_p=0.9)
    for i, rule in enumerate(rules(0.02)):
        kw["verify"] = i % 2 == 0                 # every other rule verified
        outs, _ = generate_batch(m, PROMPTS, rule, seed=7, **kw)
        assert outs == generate_batch(m, PROMPTS, rule, seed=7, **kw)[0]
        assert outs != generate_batch(m, PROMPTS, rule, seed=8, **kw)[0]
        for b, p in enumerate(PROMPTS):
            alone, _ = generate_batch(m, [p], rule, seed=[row_seed(7, b)], **kw)
            assert alone[0] == outs[b], (rule, b)
        others, _ = generate_batch(m, [PROMPTS[2], PROMPTS[0]], rule, seed=[row_seed(7, 2), 0],
                                   **kw)
        assert others[0] == outs[2]
        assert generate(m, PROMPTS[0], rule, seed=7, **kw)[0] == outs[0]
        # the CUDA-graph engine's static cache layout, uncaptured: the same draws
        assert generate_batch(m, PROMPTS, rule, seed=7, engine="static", **kw)[0] == outs


def test_sampling_errors():
    m = mtp_model()
    for bad, message in (({"temperature": -1}, "temperature must be >= 0"),
                         ({"temperature": 1, "top_p": 0}, "top_p in"),
                         ({"temperature": 1, "top_k": -2}, "top_k must be >= 0"),
                         ({"top_p": 0.9}, "set a temperature > 0")):
        with pytest.raises(DecodeError, match=message):
            generate(m, [1, 2], Static(2), **bad)
    with pytest.raises(DecodeError, match="2 seeds for 3 prompts"):
        generate_batch(m, PROMPTS, Static(2), temperature=1.0, seed=[1, 2])


# -----------------------------------------------------------------------------
# The exact check: every 3-token output's probability under k=1 sampling, against the counts
# of verified sampling (Pearson's chi-square)

VOCAB, PROMPT, LENGTH = 6, [1, 2, 3], 3


def peaked_model():
    """A tiny random Llama over 6 tokens (+ <MTP>) with its embeddings scaled up: its next
    token depends strongly on its context (it mostly repeats the last one) while its <MTP>
    slots, which cannot see the drafts before them, are much flatter, so q is far from p and
    a wrong verification rule shows."""
    m = tiny_model(vocab=VOCAB)
    with torch.no_grad():
        m.embed.weight.mul_(4.0)
    m.add_mtp_token()
    m.cfg.mtp_k_max = 4
    return m


@torch.no_grad()
def k1_law(m, temperature, top_k, top_p):
    """{output: its probability} for every LENGTH-token output of k=1 sampling, each factor a
    processed conditional of one cache-free forward (reference_process)."""
    prefixes = [list(t) for n in range(LENGTH) for t in itertools.product(range(VOCAB), repeat=n)]
    logits = m(torch.tensor([PROMPT + t + [0] * (LENGTH - 1 - len(t)) for t in prefixes]))
    margins, cond = [], {}
    for t, row in zip(prefixes, logits):
        z = row[len(PROMPT) + len(t) - 1, :VOCAB].tolist()
        cond[tuple(t)] = reference_process(z, temperature, top_k, top_p, margins)
    assert min(margins, default=1) > 1e-4      # no top-p cut within rounding of another
    law = {}
    for y in itertools.product(range(VOCAB), repeat=LENGTH):
        law[y] = math.prod(cond[y[:j]][y[j]] for j in range(LENGTH))
    return law


def chi_square(counts, law, min_expected=5):
    """Pearson's statistic of counts against exact probabilities, the rarest outputs pooled
    until each cell expects >= min_expected; its degrees of freedom and p-value (Wilson and
    Hilferty's normal approximation to the chi-square tail)."""
    n = sum(counts.values())
    cells, pool = [], [0.0, 0]                         # (expected, observed)
    for y, prob in sorted(law.items(), key=lambda kv: kv[1]):
        if pool[0] < min_expected:
            pool = [pool[0] + n * prob, pool[1] + counts.get(y, 0)]
        else:
            cells.append((n * prob, counts.get(y, 0)))
    cells.append(tuple(pool))
    stat = sum((o - e) ** 2 / e for e, o in cells if e > 0)
    df = len(cells) - 1
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return stat, df, 0.5 * math.erfc(z / math.sqrt(2))


# (temperature, top_k, top_p, mid): three temperatures, top-k and top-p cuts, each with a
# threshold between the two top-1 probabilities its <MTP> slots take, so that ConfAdapt's runs vary
SETTINGS = [(1.0, 0, 1.0, 0.312), (0.7, 4, 1.0, 0.463), (1.5, 0, 0.9, 0.2585), (1.0, 5, 0.8, 0.3975)]


def cases():
    """(rule, temperature, top_k, top_p): every rule of the shared list, each at one of the
    settings in turn, with that setting's threshold."""
    out = []
    for i in range(len(rules(0.5))):
        temperature, top_k, top_p, mid = SETTINGS[i % len(SETTINGS)]
        out.append((rules(mid)[i], temperature, top_k, top_p))
    return out


CASES = cases()


@pytest.mark.parametrize("rule,temperature,top_k,top_p", CASES, ids=str)
def test_verified_sampling_is_k1_sampling(rule, temperature, top_k, top_p):
    m, n = peaked_model(), 6000
    law = k1_law(m, temperature, top_k, top_p)
    outs, st = generate_batch(m, [PROMPT] * n, rule, max_new_tokens=LENGTH, verify=True, seed=1,
                              temperature=temperature, top_k=top_k, top_p=top_p)
    counts = Counter(tuple(o) for o in outs)
    assert all(law[y] > 0 for y in counts), "an output k=1 sampling never makes"
    stat, df, pvalue = chi_square(counts, law)
    rejected = sum(r["rejected"] for r in st["rows"]) / n
    confirmed = sum(r["confirmed"] for r in st["rows"]) / n
    print(f"{rule} T={temperature} top_k={top_k} top_p={top_p}: chi2 {stat:.1f} on {df} df, "
          f"p = {pvalue:.3g}; per row {confirmed:.2f} drafts confirmed, {rejected:.2f} rejected")
    assert pvalue > 1e-3
    if confirmed + rejected:      # a rule that proposes drafts: both branches of the check ran
        assert confirmed > 0.05 and rejected > 0.05


def test_the_exact_test_checks_drafts():
    """Most rules of the shared list propose drafts at their setting of the exact test, so that
    its verification is really exercised (static k=1 and ConfAdapt(0.9) here never propose)."""
    m = peaked_model()
    proposing = 0
    for rule, temperature, top_k, top_p in CASES:
        _, st = generate_batch(m, [PROMPT] * 50, rule, max_new_tokens=LENGTH, verify=True, seed=1,
                               temperature=temperature, top_k=top_k, top_p=top_p)
        proposing += sum(r["confirmed"] + r["rejected"] for r in st["rows"]) > 0
    assert proposing >= 6
