"""decode.py and fast/batch.py: the rules, cache bookkeeping, equivalence with plain greedy
decoding, verified decoding against k=1, and batched decoding against one prompt at a time. The
rules come from one shared list (conftest.rules)."""
import itertools
import json

import pytest
import torch

from compat.hf import from_pretrained, save_pretrained
from conftest import mtp_model, rules, tiny_model
from decode import ConfAdapt, DecodeError, Rule, Static, generate, main
from fast.lean import Lean
from fast.batch import generate_batch

# a threshold among this random model's confidences (~0.02), so rows accept different counts; no
# confidence of these runs is within 3e-6 of it, far above the batch-vs-single float noise
MID = {"llama": 0.0212, "gpt2": 0.022}


def greedy_reference(model, prompt, n, stop_ids=()):
    """Plain greedy NTP decoding with no cache: the whole sequence every step."""
    seq = list(prompt)
    for _ in range(n):
        nxt = int(model(torch.tensor([seq]))[0, -1].argmax())
        seq.append(nxt)
        if nxt in stop_ids:
            break
    return seq[len(prompt):]


def test_accept_rules():
    conf = torch.tensor([[0.95, 0.92, 0.5, 0.99], [0.3, 0.99, 0.99, 0.99], [0.99, 0.99, 0.99, 0.99]])
    assert ConfAdapt(0.9).accept(conf).tolist() == [2, 1, 4]
    assert ConfAdapt(1.0).accept(conf).tolist() == [1, 1, 1]
    assert ConfAdapt(0.0).accept(conf).tolist() == [4, 4, 4]
    assert Static(3).accept(conf).tolist() == [3, 3, 3]
    assert Static(9).accept(conf).tolist() == [4, 4, 4]
    assert Lean(ConfAdapt(0.9)).accept(conf).tolist() == [2, 1, 4]
    assert [r.name for r in (Static(3), ConfAdapt(0.9), Lean(ConfAdapt(0.9)))] == \
        ["static k=3", "ConfAdapt tau=0.9", "ConfAdapt tau=0.9, lean"]
    assert (Static(4).reads(8), ConfAdapt(0.9).reads(8), ConfAdapt(0.9, k_max=3).reads(8)) == (4, 8, 3)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_static_k1_equals_greedy(model_type):
    m = mtp_model(model_type=model_type)
    prompt = [3, 14, 15, 9, 2, 6]
    ref = greedy_reference(m, prompt, 25)
    out, st = generate(m, prompt, Static(1), max_new_tokens=25)
    assert out == ref and st["passes"] == 25 and st["effective_k"] == 1.0
    # the same model before <MTP> existed: k=1 needs no mask token at all
    plain = tiny_model(model_type=model_type)
    assert generate(plain, prompt, Static(1), max_new_tokens=25)[0] == greedy_reference(plain, prompt, 25)


def test_confadapt_tau1_is_greedy_and_tau0_emits_k_max():
    m = mtp_model()
    prompt = [5, 8, 13, 21]
    ref = greedy_reference(m, prompt, 24)
    out, st = generate(m, prompt, ConfAdapt(1.0), max_new_tokens=24)
    assert out == ref and set(st["accepted"]) == {1}
    out, st = generate(m, prompt, ConfAdapt(0.0), max_new_tokens=24)
    assert st["accepted"] == [4] * 6 and len(out) == 24
    out, st = generate(m, prompt, ConfAdapt(0.0, k_max=3), max_new_tokens=24)
    assert st["accepted"] == [3] * 8


def test_stop_token_trims_and_stops():
    m = mtp_model()
    prompt = [7, 7, 7]
    free, st = generate(m, prompt, ConfAdapt(0.0), max_new_tokens=30)
    stop = free[5]                              # a token the model emits in its 2nd pass
    first = free.index(stop)
    out, st = generate(m, prompt, ConfAdapt(0.0), max_new_tokens=30, stop_ids=[stop])
    assert out == free[:first + 1] and st["stopped"]
    ref = greedy_reference(m, prompt, 30, stop_ids=[stop])
    assert generate(m, prompt, Static(1), max_new_tokens=30, stop_ids=[stop])[0] == ref


def test_static_k_tokens_come_from_one_pass():
    """Static k=2: the second token of each pass is the <MTP> slot's prediction (not greedy)."""
    m = mtp_model()
    prompt = [4, 4, 2]
    out, st = generate(m, prompt, Static(2), max_new_tokens=6)
    x = torch.tensor([prompt + [m.cfg.mtp_token_id]])
    logits = m(x)[0, -2:]
    logits[:, m.cfg.mtp_token_id] = -torch.inf      # <MTP> is an input symbol, never emitted
    first = logits.argmax(-1).tolist()
    assert out[:2] == first and st["accepted"] == [2, 2, 2]


# prompts of different lengths, so the batch pads them (and later each row's accepted chunk)
PROMPTS = [[59, 15, 1], [58, 30, 41, 27, 18, 40, 33],
           [53, 18, 5, 40, 45, 51, 43, 10, 54, 17, 38, 45]]


def assert_rows_match_single(m, prompts, outs, st, rule, **kw):
    """Each row of a batch is what generate gives for its prompt alone: tokens and per-row stats
    exactly, top-1 confidences up to their 4-digit rounding."""
    for p, out, row in zip(prompts, outs, st["rows"]):
        ref, one = generate(m, p, rule, **kw)
        assert out == ref, rule
        assert {k: v for k, v in row.items() if k != "confidences"} == \
            {k: one[k] for k in row if k != "confidences"}, rule
        for c, d in zip(row["confidences"], one["confidences"]):
            assert c == pytest.approx(d, abs=2e-4)
    assert st["passes"] == max(r["passes"] for r in st["rows"])
    assert st["tokens"] == sum(len(o) for o in outs) and len(st["ms"]) == st["passes"]


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_batch_equals_one_prompt_at_a_time(model_type):
    m = mtp_model(model_type=model_type)
    diverged = False
    for rule in rules(MID[model_type]):
        outs, st = generate_batch(m, PROMPTS, rule, max_new_tokens=24)
        assert_rows_match_single(m, PROMPTS, outs, st, rule, max_new_tokens=24)
        per_pass = zip(*(r["accepted"] for r in st["rows"]))
        diverged |= any(len(set(counts)) > 1 for counts in per_pass)
    assert diverged                                             # rows really accepted differently


def test_batch_stop_tokens_per_row():
    m = mtp_model(model_type="gpt2")
    free, _ = generate_batch(m, PROMPTS, ConfAdapt(0.0), max_new_tokens=24)
    stop = free[0][6]                        # row 0 emits it inside its 2nd pass's chunk of 4
    outs, st = generate_batch(m, PROMPTS, ConfAdapt(0.0), max_new_tokens=24, stop_ids=[stop])
    assert outs[0] == free[0][:free[0].index(stop) + 1] and st["rows"][0]["stopped"]
    assert any(len(o) == 24 and not r["stopped"] for o, r in zip(outs, st["rows"]))
    assert_rows_match_single(m, PROMPTS, outs, st, ConfAdapt(0.0), max_new_tokens=24, stop_ids=[stop])


def test_batch_context_full_per_row():
    """A row near the end of the context stops there; the others go on (gpt2: learned positions,
    which fail loudly past the context)."""
    m = mtp_model(model_type="gpt2")
    prompts = [[1, 2, 3], list(range(60)) * 2 + [7]]    # 121 tokens of a 128-token context
    outs, st = generate_batch(m, prompts, ConfAdapt(0.0), max_new_tokens=20)
    # row 1 reads 4 candidates, then only the 3 the context has room for while row 0 reads 4
    assert st["rows"][1]["accepted"] == [4, 3] and st["rows"][1]["context_full"]
    assert st["rows"][0]["accepted"] == [4] * 5 and not st["rows"][0]["context_full"]
    assert_rows_match_single(m, prompts, outs, st, ConfAdapt(0.0), max_new_tokens=20)


def test_bad_input_messages():
    m = mtp_model()
    with pytest.raises(DecodeError, match="prompt is empty"):
        generate(m, [], ConfAdapt(0.9))
    with pytest.raises(DecodeError, match="context"):
        generate(m, list(range(10)) * 13, ConfAdapt(0.9))
    with pytest.raises(DecodeError, match=r"tau must be in \[0, 1\]"):
        generate(m, [1], ConfAdapt(1.5))
    with pytest.raises(DecodeError, match="k must be >= 1"):
        generate(m, [1], Static(0))
    with pytest.raises(DecodeError, match="k_max must be >= 1"):
        generate(m, [1], Lean(ConfAdapt(0.5, k_max=0)))
    with pytest.raises(DecodeError, match="not a decoding rule"):
        generate(m, [1], 0.9)
    with pytest.raises(DecodeError, match="no <MTP> token"):
        generate(tiny_model(), [1], Static(3))
    with pytest.raises(DecodeError, match="no prompts"):
        generate_batch(m, [], ConfAdapt(0.9))
    with pytest.raises(DecodeError, match="prompt is empty"):
        generate_batch(m, [[1, 2], []], ConfAdapt(0.9))


def test_cli_errors_are_messages(tmp_path, capsys):
    m = tiny_model()
    save_pretrained(m, tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["--ckpt", str(tmp_path), "--prompt", "x", "--tau", "0.5"])
    assert e.value.code == 2
    assert "no tokenizer" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# Verified decoding: the output is the model's own greedy k=1 output, whatever the rule


def assert_cache_holds_committed(prompt_len, st):
    """After every pass the cache holds the prompt and committed tokens only: all of them but
    the pass's last committed token (the next pass's first input) in verified decoding."""
    committed = 0
    for n, length in zip(st["accepted"], st["cache_lens"]):
        committed += n
        assert length == prompt_len + committed - 1


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_verified_equals_static_k1(model_type):
    m = mtp_model(model_type=model_type)
    prompt = [3, 14, 15, 9, 2, 6]
    ref, _ = generate(m, prompt, Static(1), max_new_tokens=30)
    rejected = 0
    for rule in rules(MID[model_type]):
        out, st = generate(m, prompt, rule, max_new_tokens=30, verify=True)
        assert out == ref, rule
        assert sum(st["accepted"]) == 30 and st["passes"] == len(st["accepted"])
        assert st["effective_k"] == 30 / st["passes"]
        assert_cache_holds_committed(len(prompt), st)
        rejected += st["rejected"]
    assert rejected > 0                         # the random model's guesses were really checked


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_verified_batch_equals_static_k1(model_type):
    m = mtp_model(model_type=model_type)
    ref, _ = generate_batch(m, PROMPTS, Static(1), max_new_tokens=24)
    for rule in rules(MID[model_type]):
        outs, st = generate_batch(m, PROMPTS, rule, max_new_tokens=24, verify=True)
        assert outs == ref, rule
        for p, row in zip(PROMPTS, st["rows"]):
            assert_cache_holds_committed(len(p), row)
        assert_rows_match_single(m, PROMPTS, outs, st, rule, max_new_tokens=24, verify=True)


def test_verified_stop_token_inside_a_provisional_run():
    """A stop token the model proposes from an <MTP> slot ends the output only once the next
    pass confirms it; if rejected, decoding goes on exactly as k=1 does."""
    m = mtp_model()
    prompt = [7, 7, 7]
    free, st = generate(m, prompt, ConfAdapt(0.0), max_new_tokens=30)   # unverified: k_max a pass
    ref_free, _ = generate(m, prompt, Static(1), max_new_tokens=30)
    for stop in {free[5], free[6], ref_free[4], ref_free[9]}:
        ref, _ = generate(m, prompt, Static(1), max_new_tokens=30, stop_ids=[stop])
        refs, _ = generate_batch(m, PROMPTS + [prompt], Static(1), max_new_tokens=30,
                                 stop_ids=[stop])
        for rule in rules(MID["llama"]):
            out, st = generate(m, prompt, rule, max_new_tokens=30, verify=True, stop_ids=[stop])
            assert out == ref and st["stopped"] == (stop in ref_free), (stop, rule)
            outs, _ = generate_batch(m, PROMPTS + [prompt], rule, max_new_tokens=30, verify=True,
                                     stop_ids=[stop])
            assert outs == refs, (stop, rule)


def test_verified_context_filling_up():
    m = mtp_model(model_type="gpt2")
    prompts = [[1, 2, 3], list(range(60)) * 2 + [7]]    # 121 tokens of a 128-token context
    ref, st1 = generate_batch(m, prompts, Static(1), max_new_tokens=20)
    assert len(ref[1]) == 7 and st1["rows"][1]["context_full"]
    for rule in rules(MID["gpt2"]):
        outs, st = generate_batch(m, prompts, rule, max_new_tokens=20, verify=True)
        assert outs == ref and st["rows"][1]["context_full"] and not st["rows"][0]["context_full"]
        out, _ = generate(m, prompts[1], rule, max_new_tokens=20, verify=True)
        assert out == ref[1], rule


def test_cache_holds_committed_tokens_only():
    """Unverified decoding: after every pass the cache holds the prompt and every emitted token
    but this pass's chunk, which the next pass feeds (so the <MTP> slots were popped)."""
    m = mtp_model()
    prompt = [1, 2, 3, 4, 5]
    for batch, rule in itertools.product((False, True), rules(MID["llama"])):
        if batch:
            _, st = generate_batch(m, [prompt, [9, 8]], rule, max_new_tokens=30)
            st = st["rows"][0]
        else:
            _, st = generate(m, prompt, rule, max_new_tokens=30)
        emitted = 0
        for n, length in zip(st["accepted"], st["cache_lens"]):
            assert length == len(prompt) + emitted, rule     # before this pass's chunk
            emitted += n


def test_lean_reads_follow_acceptance():
    adapt = lambda state, take: Lean(ConfAdapt(0.5)).adapt(state, take, 8)
    assert adapt((4, 0, 0), 4) == (8, 0, 0) and adapt((8, 0, 0), 8) == (8, 0, 0)
    assert adapt((8, 0, 0), 2) == (3, 0, 0) and adapt((4, 2, 5), 3) == (4, 0, 0)
    assert adapt((4, 0, 0), 1) == (1, 1, 0)                  # nothing accepted: k=1
    assert adapt((1, 1, 0), 1) == (2, 1, 0)                  # probe after 1 pass,
    assert adapt((2, 1, 0), 1) == (1, 2, 0)                  # then after 3, 7, ...
    assert adapt((1, 2, 1), 1) == (1, 2, 2) and adapt((1, 2, 2), 1) == (2, 2, 0)
    assert adapt((2, 5, 0), 1) == (1, 5, 0)                  # at most 31 passes apart
    assert ConfAdapt(0.5).adapt((4, 0, 0), 1, 8) == (4, 0, 0)  # other rules always read k_max
    m = mtp_model()
    out, st = generate(m, [5, 8, 13, 21], Lean(ConfAdapt(0.5)), max_new_tokens=24)
    reads = [len(c) for c in st["confidences"]]                     # a random model accepts 1
    assert reads[:12] == [4, 1, 2, 1, 1, 1, 2, 1, 1, 1, 1, 1]
    assert out == generate(m, [5, 8, 13, 21], Static(1), max_new_tokens=24)[0]


def test_static_engine_equals_eager():
    """The CUDA-graph engine's static cache layout, run uncaptured on the CPU, decodes the same."""
    for model_type in ("llama", "gpt2"):
        m = mtp_model(model_type=model_type)
        for rule, verify in itertools.product(rules(MID[model_type]), (False, True)):
            a, _ = generate_batch(m, PROMPTS, rule, max_new_tokens=20, verify=verify)
            b, _ = generate_batch(m, PROMPTS, rule, max_new_tokens=20, verify=verify,
                                  engine="static")
            assert a == b, rule
            a, _ = generate(m, PROMPTS[1], rule, max_new_tokens=20, verify=verify)
            b, _ = generate(m, PROMPTS[1], rule, max_new_tokens=20, verify=verify, engine="static")
            assert a == b, rule
    with pytest.raises(DecodeError, match="needs a CUDA device"):
        generate(m, [1, 2], Static(1), engine="graphs")
    with pytest.raises(DecodeError, match="unknown engine 'fast'"):
        generate(m, [1, 2], Static(1), engine="fast")


def test_commit_row_by_hand():
    """The commit step on hand-made cases (its inputs: what one pass fed and read)."""
    from decode import commit_row
    # 7 confirmed, 8 contradicted (the model says 9): commit 7 and 9; 8 leaves the cache
    assert commit_row([5, 7, 8], 2, [7, 9], [1, 2, 3], 3, True, ()) == (1, [7, 9], [9], [], 2)
    # both confirmed: the rule's chunk follows, its first token committed, the rest proposed
    assert commit_row([5, 7, 8], 2, [7, 8], [1, 2, 3], 2, True, ()) == (2, [7, 8, 1], [1], [2], 3)
    # a proposed stop token is kept (and waits for its check); a committed one ends the output
    assert commit_row([5], 0, [], [1, 4, 2], 3, True, {4}) == (0, [1], [1], [4], 1)
    assert commit_row([5, 4], 1, [4], [1, 2], 2, True, {4}) == (1, [4], [1], [], 2)
    # a verify-only pass (no candidates read): nothing past the confirmed run
    assert commit_row([5, 7], 1, [7], [], 0, True, ()) == (1, [7], [], [], 2)
    # unverified: the chunk is committed at once
    assert commit_row([5], 0, [], [1, 2, 3], 2, False, ()) == (0, [1, 2], [1, 2], [], 1)


def test_verified_on_the_embedded_teacher():
    """The embedded teacher with <MTP> added (the student at step 0): a real model, whose next
    token depends on everything the cache holds, verified at every rule equals its own k=1."""
    from compat.tokenizers import load_tokenizer
    from data import plain_prompt
    from distill import DEFAULT_TEACHER
    from synthetic.problems import synthetic_problems
    m = from_pretrained(DEFAULT_TEACHER).eval()
    m.add_mtp_token()
    m.cfg.mtp_k_max = 4
    tok = load_tokenizer(DEFAULT_TEACHER)
    prompts = [tok.encode(plain_prompt(r["question"])) for r in synthetic_problems(3, seed=11)]
    ref, _ = generate_batch(m, prompts, Static(1), max_new_tokens=40, stop_ids=tok.stop_ids)
    rejected = confirmed = 0
    for rule in rules(0.5):
        outs, st = generate_batch(m, prompts, rule, max_new_tokens=40, verify=True,
                                  stop_ids=tok.stop_ids)
        assert outs == ref, rule
        one, st1 = generate(m, prompts[0], rule, max_new_tokens=40, verify=True,
                            stop_ids=tok.stop_ids)
        assert one == ref[0]
        assert_cache_holds_committed(len(prompts[0]), st1)
        rejected += sum(r["rejected"] for r in st["rows"])
        confirmed += sum(r["confirmed"] for r in st["rows"])
    assert rejected > 0 and confirmed > 0        # both paths of the commit step were taken


def test_cli_speedup_line(tmp_path, capsys):
    """decode.py: the speedup is a median over --repeats runs of each rule, and static k=1 is
    not compared with itself; --device defaults to auto (the CPU here)."""
    from conftest import save_tiny_mtp_checkpoint
    save_tiny_mtp_checkpoint(tmp_path)
    args = ["--ckpt", str(tmp_path), "--prompt", "Ava has 3 apples.", "--max-new", "6"]
    main(args + ["--static-k", "1"])
    out = capsys.readouterr().out
    assert "speedup" not in out and "on cpu" in out and "[static k=1]" in out
    main(args + ["--tau", "0.5", "--verify", "--lean", "--repeats", "3"])
    out = capsys.readouterr().out
    assert "[verified ConfAdapt tau=0.5, lean]" in out
    assert "median of 3 runs each" in out and "wall-clock speedup" in out
    assert "provisional tokens confirmed" in out


def test_the_command_line_runs_generate(tmp_path, capsys, monkeypatch):
    """python decode.py decodes with the generate a reader reads, with the rule its flags name,
    on the engine --engine names: every call goes through it."""
    import decode
    from conftest import save_tiny_mtp_checkpoint
    save_tiny_mtp_checkpoint(tmp_path)
    calls, real = [], decode.generate

    def spy(model, ids, rule, **kw):
        calls.append((rule, kw.get("verify", False), type(kw["engine"]).__name__))
        return real(model, ids, rule, **kw)
    monkeypatch.setattr(decode, "generate", spy)
    main(["--ckpt", str(tmp_path), "--prompt", "Ava has 3 apples.", "--max-new", "6",
          "--static-k", "2", "--verify", "--engine", "static", "--repeats", "1"])
    assert calls[1] == (Static(2), True, "CudaGraphs") and len(calls) == 4   # warm-up, run, 1 + 1
    assert calls[3] == (Static(1), False, "CudaGraphs")


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_generate_equals_generate_batch_of_one(model_type):
    """The one-prompt loop a reader starts with (generate) against generate_batch on a batch of
    one: the same tokens, and pass for pass the same committed counts, confidences, cache
    lengths and verification counts, for every rule, verified or not, with a stop token and
    with a context that fills up; greedy, and sampling at a fixed seed."""
    m = mtp_model(model_type=model_type)
    prompt = [3, 14, 15, 9, 2, 6]
    free, _ = generate(m, prompt, Static(1), max_new_tokens=30)
    keys = ("accepted", "confidences", "cache_lens", "confirmed", "rejected", "stopped",
            "context_full", "passes", "tokens", "effective_k")
    cases = [(prompt, 30, ()), (prompt, 30, (free[7],)), (list(range(1, 61)) * 2, 30, ())]
    sampled = {"temperature": 0.8, "top_k": 30, "top_p": 0.95, "seed": 3}
    rejected = 0
    for p, n, stops in cases:
        for rule in rules(MID[model_type]):
            for verify, sampling in itertools.product((False, True), ({}, sampled)):
                kw = dict(max_new_tokens=n, stop_ids=stops, verify=verify, **sampling)
                a, sa = generate(m, p, rule, **kw)
                (b,), sb = generate_batch(m, [p], rule, **kw)
                assert a == b, (rule, verify, stops, sampling)
                assert {k: sa[k] for k in keys} == {k: sb["rows"][0][k] for k in keys}, (rule, verify)
                rejected += sa["rejected"] if sampling else 0
    assert sa["context_full"] and len(a) < 30        # the last case really ran out of context
    assert rejected > 0                              # sampled drafts were really checked


class Product(Rule):
    """A rule as a fork would write it (the course exercise): accept the leading run while the
    product of the candidates' top-1 probabilities stays above tau."""
    family = "product"

    def __init__(self, tau, k_max=None):
        self.tau, self.k_max, self.name = tau, k_max, f"product tau={tau}"

    def reads(self, k_max):
        return self.k_max or k_max

    def accept(self, conf):
        return (conf.cumprod(-1) > self.tau).long().cumprod(-1).sum(-1).clamp(min=1)


def test_a_new_rule_is_one_class_and_one_flag(tmp_path, monkeypatch, capsys):
    """Product, written outside decode.py, plus one line in RULE_FLAGS: the shared test list
    holds it, both command lines take its flag, and it decodes: verified, k=1's output;
    unverified, exactly the counts its own rule gives on the confidences it saw."""
    import bench
    import decode
    from conftest import save_tiny_mtp_checkpoint
    monkeypatch.setitem(decode.RULE_FLAGS, "--product",
                        (float, lambda tau, a: Product(tau, a.k_max), "accept while the product ..."))
    assert any(isinstance(r, Product) for r in rules(0.5))
    m = mtp_model()
    ref, _ = generate(m, PROMPTS[1], Static(1), max_new_tokens=20)
    out, st = generate(m, PROMPTS[1], Product(1e-4), max_new_tokens=20, verify=True)
    assert out == ref and st["rejected"] > 0
    out, st = generate(m, PROMPTS[1], Product(1e-4), max_new_tokens=20)
    for n, conf in zip(st["accepted"], st["confidences"]):
        run = 1
        while run < len(conf) and torch.tensor(conf[:run + 1]).prod() > 1e-4:
            run += 1
        assert n == run
    save_tiny_mtp_checkpoint(tmp_path / "ckpt")
    main(["--ckpt", str(tmp_path / "ckpt"), "--prompt", "Ava has 3 apples.", "--max-new", "6",
          "--product", "0.3", "--no-baseline"])
    assert "[product tau=0.3]" in capsys.readouterr().out
    bench.main(["--ckpt", str(tmp_path / "ckpt"), "--limit", "2", "--max-new", "6", "--static-k",
                "1", "--tau", "", "--product", "0.3,0.1", "--out", str(tmp_path / "b")])
    rows = [r["strategy"] for r in json.load(open(tmp_path / "b.json"))["results"]]
    assert rows == ["static k=1", "product tau=0.3", "product tau=0.1", "verified static k=3",
                    "verified product tau=0.3", "verified product tau=0.1"]


def test_cli_checks_paths_devices_and_vocabularies_before_any_work(tmp_path, capsys, monkeypatch):
    """--viz-html to a path that cannot be written fails before the checkpoint is even loaded
    (not after generating); --device must name a device; a tokenizer must fit the model."""
    import decode
    from conftest import assert_exits, save_tiny_mtp_checkpoint, tiny_config
    from model import Transformer
    from synthetic.tokenizer import synthetic_tokenizer
    ckpt = tmp_path / "ckpt"
    save_tiny_mtp_checkpoint(ckpt)
    run = ["--ckpt", str(ckpt), "--prompt", "hi", "--static-k", "2", "--max-new", "4", "--repeats", "1"]

    def no_work(*a, **kw):
        raise AssertionError("the work started before the output path was checked")
    with monkeypatch.context() as m:
        m.setattr(decode, "load_for_decoding", no_work)
        assert_exits(main, run + ["--viz-html", str(tmp_path / "no" / "x.html")],
                     "the folder", capsys)
        assert_exits(main, run + ["--viz-html", str(tmp_path)], "is a folder", capsys)
    assert_exits(main, run + ["--device", "gpu"], "--device must be auto, cpu, cuda or cuda:N", capsys)
    small = tmp_path / "small"
    save_pretrained(Transformer(tiny_config(vocab=100)), small)
    synthetic_tokenizer().save(small)
    assert_exits(main, run[:1] + [str(small)] + run[2:4] + ["--static-k", "1"],
                 "its tokenizer has ids up to 511, but the model has 100 token rows", capsys)


def test_cli_warns_of_untrained_guesses_and_of_a_full_context(tmp_path, capsys):
    """Usable but surprising, one warning line each (exit 0): more candidates per pass than the
    checkpoint was trained for (their guesses are untrained), and an output that the context,
    not --max-new or a stop token, ended."""
    from conftest import save_tiny_mtp_checkpoint
    from decode import untrained
    from synthetic.tokenizer import synthetic_tokenizer
    ckpt = tmp_path / "ckpt"
    save_tiny_mtp_checkpoint(ckpt)                                # k_max 3, context 256
    run = ["--ckpt", str(ckpt), "--max-new", "20", "--no-baseline", "--repeats", "1"]
    for rule, beyond in ((["--static-k", "300"], 297), (["--tau", "0.5", "--k-max", "5"], 2),
                         (["--static-k", "3"], 0), (["--tau", "0.5"], 0)):
        main(run + ["--prompt", "Ava has 3 apples."] + rule)
        err = capsys.readouterr().err
        warning = f"{beyond} of them past the checkpoint's trained mtp_k_max 3: those guesses are untrained"
        assert (warning in err and err.count("\n") == 1) if beyond else err == "", err
    m = mtp_model()                                               # k_max 4
    assert [untrained(r, m.cfg) for r in (Static(4), Static(6), ConfAdapt(0.9), Lean(Static(5)))] == [0, 2, 0, 1]
    m.cfg.mtp_k_max = None                                        # a checkpoint that does not say
    assert untrained(Static(9), m.cfg) == 0
    tok = synthetic_tokenizer()
    prompt = tok.decode(tok.encode("1 2 3 " * 200)[:250])         # 6 tokens short of the context
    main(run + ["--prompt", prompt, "--format", "raw", "--static-k", "1"])
    out, err = capsys.readouterr()
    assert "warning: the output stops at the end of the model's context (256 tokens" in err, err
    assert err.count("\n") == 1 and "short of --max-new 20" in err
    main(run + ["--prompt", prompt[:100], "--format", "raw", "--static-k", "1"])
    assert capsys.readouterr().err == ""                          # --max-new ended it


def test_damaged_checkpoint_files_are_one_line(tmp_path, capsys):
    """Each file a checkpoint's loaders read, damaged or missing: one line that names it and what
    to do, exit 2, in decode.py and bench.py (the tools load through the same functions)."""
    import shutil
    import bench
    from conftest import assert_exits, save_tiny_mtp_checkpoint
    good = tmp_path / "good"
    save_tiny_mtp_checkpoint(good)

    def config(d, **change):
        c = json.loads((d / "config.json").read_text())
        c.update(change)
        (d / "config.json").write_text(json.dumps({k: v for k, v in c.items() if v is not None}))

    def index(d):
        (d / "model.safetensors").rename(d / "model-00001.safetensors")
        (d / "model.safetensors.index.json").write_text('{"weight_map": ')

    def hf_tokenizer(d):
        (d / "tokenizer_mtp.json").unlink()
        (d / "tokenizer.json").write_text("{not json")

    damage = [
        (lambda d: config(d, mtp_token_id=9999), "config.json: mtp_token_id = 9999 is beyond the "
         "vocabulary (vocab_size 513): correct it to the <MTP> row's id"),
        (lambda d: config(d, hidden_size=None), "config.json has no 'hidden_size' field"),
        (lambda d: (d / "config.json").write_text("{not json"), "config.json is not a usable config"),
        (lambda d: (d / "tokenizer.tiktoken").unlink(), "has tokenizer_mtp.json but no "
         "tokenizer.tiktoken, the token list it goes with: copy the tokenizer files again"),
        (hf_tokenizer, "tokenizer.json is not valid JSON"),
        (index, "model.safetensors.index.json is not a usable shard index"),
    ]
    for i, (change, message) in enumerate(damage):
        d = tmp_path / str(i)
        shutil.copytree(good, d)
        change(d)
        assert_exits(main, ["--ckpt", str(d), "--prompt", "hi", "--no-baseline"], message, capsys)
        assert_exits(bench.main, ["--ckpt", str(d), "--limit", "1", "--out", str(tmp_path / "b")],
                     message, capsys)


def test_a_read_only_file_system_is_named(tmp_path, capsys, read_only_dir):
    """An output on a read-only mount: said so, before any work (decode.py --viz-html, bench.py
    --out, tools/bench_decode.py --out all check the path with decode.check_output_path)."""
    import bench
    from conftest import assert_exits, save_tiny_mtp_checkpoint
    from tools import bench_decode
    ckpt = tmp_path / "ckpt"
    save_tiny_mtp_checkpoint(ckpt)
    message = "cannot be written (a read-only file system): pick another path"
    assert_exits(main, ["--ckpt", str(ckpt), "--prompt", "hi", "--viz-html",
                        str(read_only_dir / "x.html")], message, capsys)
    assert_exits(bench.main, ["--ckpt", str(ckpt), "--out", str(read_only_dir / "b")], message, capsys)
    assert_exits(bench_decode.main, ["--ckpt", str(ckpt), "--no-hf", "--engines", "eager",
                                     "--max-new", "4", "--repeats", "1", "--out",
                                     str(read_only_dir / "x.json")], message, capsys)


@pytest.mark.parametrize("option, message", [
    (["--ckpt", "/nonexistent"], "'/nonexistent' is neither a checkpoint directory nor a hub name"),
    (["--ckpt", "./runs/none"], "'./runs/none' is neither a checkpoint directory nor a hub name"),
    (["--engine", "graphs"], "engine 'graphs' needs a CUDA device"),
    (["--top-k", "5"], "set a temperature > 0"),
    (["--temperature", "inf"], "temperature must be >= 0"),
    (["--tau", "nan"], "tau must be in [0, 1], got nan"),
    (["--k-max", "0"], "k_max must be >= 1"),
    (["--dtype", "fp16"], "--dtype must be one of fp32, bf16"),
    (["--format", "chat"], "this tokenizer has no chat format"),
    (["--prompt", ""], "the prompt is empty"),
])
def test_every_bad_option_is_one_line(tmp_path, capsys, option, message):
    """Each option's bad value: one line and exit 2 (--engine's choices, static among them, are in
    --help)."""
    from conftest import assert_exits, save_tiny_mtp_checkpoint
    from decode import parse_args
    save_tiny_mtp_checkpoint(tmp_path / "ckpt")
    assert_exits(main, ["--ckpt", str(tmp_path / "ckpt"), "--prompt", "hi", "--max-new", "4",
                        "--no-baseline", *option], message, capsys)
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    assert "static (the graphs' cache layout, uncaptured)" in " ".join(capsys.readouterr().out.split())
