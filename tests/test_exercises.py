"""Checks for the course exercises (README, "For courses") that the other test files leave open:
each fails on a plausible wrong reimplementation (README names the bug each one catches)."""
import argparse

import pytest
import torch

from data import plain_prompt

from compat.tokenizers import load_tokenizer
from synthetic.problems import synthetic_problems
from decode import ConfAdapt, generate
from distill import DEFAULT_TEACHER
from model import KVCache
from compat.hf import from_pretrained


def test_confadapt_accepts_a_leading_run_strictly_above_tau():
    """The run stops at the first candidate NOT above tau; one equal to tau is not above it. A
    saturated softmax gives exactly 1.0 in float32, so with >= tau=1.0 would not be greedy."""
    conf = torch.tensor([[0.75, 0.75, 0.8, 0.9],      # the first equals tau: only the forced one
                         [0.9, 0.75, 0.9, 0.9],       # the second equals tau: the run ends at 1
                         [0.9, 0.8, 0.5, 0.9],        # a leading run of 2; the 4th does not count
                         [0.5, 0.9, 0.9, 0.9]])       # the first is below: still 1 (it is NTP)
    assert ConfAdapt(0.75).accept(conf).tolist() == [1, 1, 2, 1]
    assert ConfAdapt(1.0).accept(torch.ones(2, 4)).tolist() == [1, 1]
    assert ConfAdapt(0.4).accept(torch.full((4,), 0.5)).tolist() == 4      # any leading shape


def test_product_rule():
    """The exercise "a new rule": decode.Product(tau) accepts the leading run of candidates while
    the product of their top-1 probabilities stays above tau, and at least one; decode.py's
    --product makes it (one line in RULE_FLAGS). Skipped until it is written; the rest of the
    suite then runs it through every invariant (conftest.rules reads RULE_FLAGS)."""
    import decode
    if "--product" not in decode.RULE_FLAGS:
        pytest.skip("the exercise: write decode.Product and its --product line in RULE_FLAGS")
    kind, make, _ = decode.RULE_FLAGS["--product"]
    rule = make(kind("0.5"), argparse.Namespace(k_max=None))
    conf = torch.tensor([[0.9, 0.8, 0.9, 0.9],       # products .9 .72 .648 .583: all four
                         [0.4, 0.9, 0.9, 0.9],       # .4: none, but the first is always taken
                         [1.0, 0.5, 0.9, 0.9],       # 1.0, then .5, which is not above .5
                         [0.8, 0.7, 0.9, 0.9]])      # .8 .56 .504 .454: each is above .5, not so
    assert rule.accept(conf).tolist() == [4, 1, 1, 3]                   # their product
    assert rule.accept(conf[3]).tolist() == 3 and rule.reads(8) == 8


def context_model():
    """The embedded teacher plus a fresh <MTP>: a model whose next token depends on its context
    (a tiny random model's argmax hardly does, so a polluted cache would go unnoticed there)."""
    m = from_pretrained(DEFAULT_TEACHER).eval()
    m.add_mtp_token()
    m.cfg.mtp_k_max = 4
    tok = load_tokenizer(DEFAULT_TEACHER)
    return m, tok, tok.encode(plain_prompt(synthetic_problems(1, seed=11)[0]["question"]))


@torch.no_grad()
def test_cache_pop_leaves_only_real_tokens():
    m, tok, prompt = context_model()
    mtp, n = m.cfg.mtp_token_id, len(prompt)
    # one decoding pass by hand: prompt + 3 <MTP>, pop the masks, feed the accepted token
    cache = KVCache()
    first = int(m(torch.tensor([prompt + [mtp] * 3]), cache=cache)[0, n - 1, :mtp].argmax())
    cache.truncate(n)
    assert len(cache) == n
    step = m(torch.tensor([[first]]), cache=cache)[0, -1]
    torch.testing.assert_close(step, m(torch.tensor([prompt + [first]]))[0, -1], atol=1e-4, rtol=0)
    # whole generations: ConfAdapt(1.0) reads 4 candidates a pass (3 masks to pop) and emits 1,
    # so its output is greedy k=1: each token the argmax of one cache-free forward over the text
    out, st = generate(m, prompt, ConfAdapt(1.0), max_new_tokens=40, stop_ids=tok.stop_ids)
    logits = m(torch.tensor([prompt + out]))[0, n - 1:-1, :mtp]           # (len(out), V)
    assert out == logits.argmax(-1).tolist()
    assert len(out) > 20 and st["passes"] == len(out)
