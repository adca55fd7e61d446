"""decode.py: acceptance rules, cache bookkeeping, equivalence with plain greedy decoding, and
batched decoding against one prompt at a time."""
import itertools

import pytest
import torch

from conftest import mtp_model, tiny_model
from compat.hf import from_pretrained, save_pretrained
from decode import DecodeError, accept_confadapt, accept_static, decode_one, generate, generate_batch, main



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
    assert accept_confadapt(conf, 0.9).tolist() == [2, 1, 4]
    assert accept_confadapt(conf, 1.0).tolist() == [1, 1, 1]
    assert accept_confadapt(conf, 0.0).tolist() == [4, 4, 4]
    assert accept_static(conf, 3).tolist() == [3, 3, 3]
    assert accept_static(conf, 9).tolist() == [4, 4, 4]


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_static_k1_equals_greedy(model_type):
    m = mtp_model(model_type=model_type)
    prompt = [3, 14, 15, 9, 2, 6]
    ref = greedy_reference(m, prompt, 25)
    out, st = generate(m, prompt, max_new_tokens=25, static_k=1)
    assert out == ref and st["passes"] == 25 and st["effective_k"] == 1.0
    # the same model before <MTP> existed: k=1 needs no mask token at all
    plain = tiny_model(model_type=model_type)
    assert generate(plain, prompt, max_new_tokens=25, static_k=1)[0] == greedy_reference(plain, prompt, 25)


def test_confadapt_tau1_is_greedy_and_tau0_emits_k_max():
    m = mtp_model()
    prompt = [5, 8, 13, 21]
    ref = greedy_reference(m, prompt, 24)
    out, st = generate(m, prompt, max_new_tokens=24, tau=1.0)
    assert out == ref and set(st["accepted"]) == {1}
    out, st = generate(m, prompt, max_new_tokens=24, tau=0.0)
    assert st["accepted"] == [4] * 6 and len(out) == 24
    out, st = generate(m, prompt, max_new_tokens=24, tau=0.0, k_max=3)
    assert st["accepted"] == [3] * 8


def test_cache_holds_real_tokens_only():
    m = mtp_model()
    prompt = [1, 2, 3, 4, 5]
    for rule in ({"tau": 0.0}, {"static_k": 3}, {"tau": 0.2}):
        out, st = generate(m, prompt, max_new_tokens=30, **rule)
        real = len(prompt)
        for n, length in zip(st["accepted"], st["cache_lens"]):
            assert length == real            # before this pass's accepted tokens go in
            real += n


def test_stop_token_trims_and_stops():
    m = mtp_model()
    prompt = [7, 7, 7]
    free, st = generate(m, prompt, max_new_tokens=30, tau=0.0)
    stop = free[5]                              # a token the model emits in its 2nd pass
    first = free.index(stop)
    out, st = generate(m, prompt, max_new_tokens=30, tau=0.0, stop_ids=[stop])
    assert out == free[:first + 1] and st["stopped"]
    ref = greedy_reference(m, prompt, 30, stop_ids=[stop])
    assert generate(m, prompt, max_new_tokens=30, static_k=1, stop_ids=[stop])[0] == ref


def test_static_k_tokens_come_from_one_pass():
    """Static k=2: the second token of each pass is the <MTP> slot's prediction (not greedy)."""
    m = mtp_model()
    prompt = [4, 4, 2]
    out, st = generate(m, prompt, max_new_tokens=6, static_k=2)
    x = torch.tensor([prompt + [m.cfg.mtp_token_id]])
    logits = m(x)[0, -2:]
    logits[:, m.cfg.mtp_token_id] = -torch.inf      # <MTP> is an input symbol, never emitted
    first = logits.argmax(-1).tolist()
    assert out[:2] == first and st["accepted"] == [2, 2, 2]


# prompts of different lengths, so the batch pads them (and later each row's accepted chunk)
PROMPTS = [[59, 15, 1], [58, 30, 41, 27, 18, 40, 33],
           [53, 18, 5, 40, 45, 51, 43, 10, 54, 17, 38, 45]]


def assert_rows_match_single(m, prompts, outs, st, **kw):
    """Each row of a batch is what generate gives for its prompt alone: tokens and per-row stats
    exactly, top-1 confidences up to their 4-digit rounding."""
    for p, out, row in zip(prompts, outs, st["rows"]):
        ref, one = generate(m, p, **kw)
        assert out == ref
        assert {k: v for k, v in row.items() if k != "confidences"} == \
            {k: one[k] for k in row if k != "confidences"}
        for c, d in zip(row["confidences"], one["confidences"]):
            assert c == pytest.approx(d, abs=2e-4)
    assert st["passes"] == max(r["passes"] for r in st["rows"])
    assert st["tokens"] == sum(len(o) for o in outs) and len(st["ms"]) == st["passes"]


# mid_tau sits among this random model's confidences (~0.02), so rows accept different counts;
# no confidence of these runs is within 3e-6 of it, far above the batch-vs-single float noise
@pytest.mark.parametrize("model_type,mid_tau", [("llama", 0.0212), ("gpt2", 0.022)])
def test_batch_equals_one_prompt_at_a_time(model_type, mid_tau):
    m = mtp_model(model_type=model_type)
    for rule in ({"static_k": 1}, {"static_k": 3}, {"tau": 0.9}, {"tau": 0.0}, {"tau": mid_tau}):
        outs, st = generate_batch(m, PROMPTS, max_new_tokens=24, **rule)
        assert_rows_match_single(m, PROMPTS, outs, st, max_new_tokens=24, **rule)
    per_pass = zip(*(r["accepted"] for r in st["rows"]))
    assert any(len(set(counts)) > 1 for counts in per_pass)    # rows really diverged


def test_batch_stop_tokens_per_row():
    m = mtp_model(model_type="gpt2")
    free, _ = generate_batch(m, PROMPTS, max_new_tokens=24, tau=0.0)
    stop = free[0][6]                        # row 0 emits it inside its 2nd pass's chunk of 4
    outs, st = generate_batch(m, PROMPTS, max_new_tokens=24, tau=0.0, stop_ids=[stop])
    assert outs[0] == free[0][:free[0].index(stop) + 1] and st["rows"][0]["stopped"]
    assert any(len(o) == 24 and not r["stopped"] for o, r in zip(outs, st["rows"]))
    assert_rows_match_single(m, PROMPTS, outs, st, max_new_tokens=24, tau=0.0, stop_ids=[stop])


def test_batch_context_full_per_row():
    """A row near the end of the context stops there; the others go on (gpt2: learned positions,
    which fail loudly past the context)."""
    m = mtp_model(model_type="gpt2")
    prompts = [[1, 2, 3], list(range(60)) * 2 + [7]]    # 121 tokens of a 128-token context
    outs, st = generate_batch(m, prompts, max_new_tokens=20, tau=0.0)
    # row 1 reads 4 candidates, then only the 3 the context has room for while row 0 reads 4
    assert st["rows"][1]["accepted"] == [4, 3] and st["rows"][1]["context_full"]
    assert st["rows"][0]["accepted"] == [4] * 5 and not st["rows"][0]["context_full"]
    assert_rows_match_single(m, prompts, outs, st, max_new_tokens=20, tau=0.0)


def test_bad_input_messages():
    m = mtp_model()
    with pytest.raises(DecodeError, match="prompt is empty"):
        generate(m, [], tau=0.9)
    with pytest.raises(DecodeError, match="context"):
        generate(m, list(range(10)) * 13, tau=0.9)
    with pytest.raises(DecodeError, match=r"tau must be in \[0, 1\]"):
        generate(m, [1], tau=1.5)
    with pytest.raises(DecodeError, match="k must be >= 1"):
        generate(m, [1], static_k=0)
    with pytest.raises(DecodeError, match="no <MTP> token"):
        generate(tiny_model(), [1], static_k=3)
    with pytest.raises(DecodeError, match="no prompts"):
        generate_batch(m, [], tau=0.9)
    with pytest.raises(DecodeError, match="prompt is empty"):
        generate_batch(m, [[1, 2], []], tau=0.9)


def test_cli_errors_are_messages(tmp_path, capsys):
    m = tiny_model()
    save_pretrained(m, tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["--ckpt", str(tmp_path), "--prompt", "x", "--tau", "0.5"])
    assert e.value.code == 2
    assert "no tokenizer" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# Verified decoding: the output is the model's own greedy k=1 output, whatever the rule

RULES = [{"static_k": 2}, {"static_k": 3}, {"static_k": 4}, {"tau": 0.0}, {"tau": 0.0212},
         {"tau": 0.9}, {"tau": 1.0}]


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
    ref, _ = generate(m, prompt, max_new_tokens=30, static_k=1)
    rejected = 0
    for rule in RULES:
        for lean in (False, True):
            out, st = decode_one(m, prompt, max_new_tokens=30, verify=True, lean=lean, **rule)
            assert out == ref, (rule, lean)
            assert sum(st["accepted"]) == 30 and st["passes"] == len(st["accepted"])
            assert st["effective_k"] == 30 / st["passes"]
            assert_cache_holds_committed(len(prompt), st)
            rejected += st["rejected"]
    assert rejected > 0                         # the random model's guesses were really checked


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_verified_batch_equals_static_k1(model_type):
    m = mtp_model(model_type=model_type)
    ref, _ = generate_batch(m, PROMPTS, max_new_tokens=24, static_k=1)
    for rule in RULES:
        outs, st = generate_batch(m, PROMPTS, max_new_tokens=24, verify=True, **rule)
        assert outs == ref, rule
        for p, row in zip(PROMPTS, st["rows"]):
            assert_cache_holds_committed(len(p), row)
        assert_rows_match_single(m, PROMPTS, outs, st, max_new_tokens=24, verify=True, **rule)


def test_verified_stop_token_inside_a_provisional_run():
    """A stop token the model proposes from an <MTP> slot ends the output only once the next
    pass confirms it; if rejected, decoding goes on exactly as k=1 does."""
    m = mtp_model()
    prompt = [7, 7, 7]
    free, st = generate(m, prompt, max_new_tokens=30, tau=0.0)   # unverified: k_max a pass
    ref_free, _ = generate(m, prompt, max_new_tokens=30, static_k=1)
    for stop in {free[5], free[6], ref_free[4], ref_free[9]}:
        ref, _ = generate(m, prompt, max_new_tokens=30, static_k=1, stop_ids=[stop])
        for rule in ({"tau": 0.0}, {"static_k": 3}):
            out, st = generate(m, prompt, max_new_tokens=30, verify=True, stop_ids=[stop], **rule)
            assert out == ref and st["stopped"] == (stop in ref_free), (stop, rule)
            outs, _ = generate_batch(m, PROMPTS + [prompt], max_new_tokens=30, verify=True,
                                     stop_ids=[stop], **rule)
            refs, _ = generate_batch(m, PROMPTS + [prompt], max_new_tokens=30, static_k=1,
                                     stop_ids=[stop])
            assert outs == refs


def test_verified_context_filling_up():
    m = mtp_model(model_type="gpt2")
    prompts = [[1, 2, 3], list(range(60)) * 2 + [7]]    # 121 tokens of a 128-token context
    ref, st1 = generate_batch(m, prompts, max_new_tokens=20, static_k=1)
    assert len(ref[1]) == 7 and st1["rows"][1]["context_full"]
    for rule in ({"tau": 0.0}, {"static_k": 4}, {"tau": 0.0212}):
        outs, st = generate_batch(m, prompts, max_new_tokens=20, verify=True, **rule)
        assert outs == ref and st["rows"][1]["context_full"] and not st["rows"][0]["context_full"]
        out, _ = generate(m, prompts[1], max_new_tokens=20, verify=True, **rule)
        assert out == ref[1]


def test_cache_holds_committed_tokens_only():
    """Unverified decoding: after every pass the cache holds the prompt and every emitted token
    but this pass's chunk, which the next pass feeds (so the <MTP> slots were popped)."""
    m = mtp_model()
    prompt = [1, 2, 3, 4, 5]
    for batch in (False, True):
        for rule in ({"tau": 0.0}, {"static_k": 3}, {"tau": 0.0212}):
            if batch:
                _, st = generate_batch(m, [prompt, [9, 8]], max_new_tokens=30, **rule)
                st = st["rows"][0]
            else:
                _, st = generate(m, prompt, max_new_tokens=30, **rule)
            emitted = 0
            for n, length in zip(st["accepted"], st["cache_lens"]):
                assert length == len(prompt) + emitted     # before this pass's chunk
                emitted += n


def test_lean_reads_follow_acceptance():
    from decode import next_slots
    assert next_slots((4, 0, 0), 4, 8) == (8, 0, 0) and next_slots((8, 0, 0), 8, 8) == (8, 0, 0)
    assert next_slots((8, 0, 0), 2, 8) == (3, 0, 0) and next_slots((4, 2, 5), 3, 8) == (4, 0, 0)
    assert next_slots((4, 0, 0), 1, 8) == (1, 1, 0)                  # nothing accepted: k=1
    assert next_slots((1, 1, 0), 1, 8) == (2, 1, 0)                  # probe after 1 pass,
    assert next_slots((2, 1, 0), 1, 8) == (1, 2, 0)                  # then after 3, 7, ...
    assert next_slots((1, 2, 1), 1, 8) == (1, 2, 2) and next_slots((1, 2, 2), 1, 8) == (2, 2, 0)
    assert next_slots((2, 5, 0), 1, 8) == (1, 5, 0)                  # at most 31 passes apart
    m = mtp_model()
    out, st = decode_one(m, [5, 8, 13, 21], max_new_tokens=24, tau=0.5, lean=True)
    reads = [len(c) for c in st["confidences"]]                     # a random model accepts 1
    assert reads[:12] == [4, 1, 2, 1, 1, 1, 2, 1, 1, 1, 1, 1]
    assert out == generate(m, [5, 8, 13, 21], max_new_tokens=24, static_k=1)[0]


def test_static_engine_equals_eager():
    """The CUDA-graph engine's static cache layout, run uncaptured on the CPU, decodes the same."""
    for model_type in ("llama", "gpt2"):
        m = mtp_model(model_type=model_type)
        for rule in ({"static_k": 1}, {"tau": 0.0212}, {"static_k": 3}):
            for verify in (False, True):
                a, _ = generate_batch(m, PROMPTS, max_new_tokens=20, verify=verify, **rule)
                b, _ = generate_batch(m, PROMPTS, max_new_tokens=20, verify=verify,
                                      engine="static", **rule)
                assert a == b
                a, _ = generate(m, PROMPTS[1], max_new_tokens=20, verify=verify, **rule)
                b, _ = decode_one(m, PROMPTS[1], max_new_tokens=20, verify=verify, engine="static",
                                **rule)
                assert a == b
    with pytest.raises(DecodeError, match="needs a CUDA device"):
        decode_one(m, [1, 2], static_k=1, engine="graphs")


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
    from data import plain_prompt
    from compat.tokenizers import load_tokenizer
    from synthetic.problems import synthetic_problems
    from distill import DEFAULT_TEACHER
    m = from_pretrained(DEFAULT_TEACHER).eval()
    m.add_mtp_token()
    m.cfg.mtp_k_max = 4
    tok = load_tokenizer(DEFAULT_TEACHER)
    prompts = [tok.encode(plain_prompt(r["question"])) for r in synthetic_problems(3, seed=11)]
    ref, _ = generate_batch(m, prompts, max_new_tokens=40, static_k=1, stop_ids=tok.stop_ids)
    rejected = confirmed = 0
    for rule in ({"static_k": 4}, {"tau": 0.0}, {"tau": 0.5}):
        outs, st = generate_batch(m, prompts, max_new_tokens=40, verify=True,
                                  stop_ids=tok.stop_ids, **rule)
        assert outs == ref, rule
        one, st1 = generate(m, prompts[0], max_new_tokens=40, verify=True, stop_ids=tok.stop_ids,
                            **rule)
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
    assert "speedup" not in out and "on cpu" in out
    main(args + ["--tau", "0.5", "--verify", "--repeats", "3"])
    out = capsys.readouterr().out
    assert "median of 3 runs each" in out and "wall-clock speedup" in out
    assert "provisional tokens confirmed" in out


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_generate_equals_generate_batch_of_one(model_type):
    """The one-prompt loop a reader starts with (generate) against generate_batch on a batch of
    one: the same tokens, and pass for pass the same committed counts, confidences, cache
    lengths and verification counts, for every rule, verified or not, with a stop token and
    with a context that fills up; greedy, and sampling at a fixed seed."""
    m = mtp_model(model_type=model_type)
    prompt = [3, 14, 15, 9, 2, 6]
    free, _ = generate(m, prompt, max_new_tokens=30, static_k=1)
    keys = ("accepted", "confidences", "cache_lens", "confirmed", "rejected", "stopped",
            "context_full", "passes", "tokens", "effective_k")
    cases = [(prompt, 30, ()), (prompt, 30, (free[7],)), (list(range(1, 61)) * 2, 30, ())]
    sampled = {"temperature": 0.8, "top_k": 30, "top_p": 0.95, "seed": 3}
    rejected = 0
    for p, n, stops in cases:
        for rule in RULES + [{"static_k": 1}]:
            for verify, sampling in itertools.product((False, True), ({}, sampled)):
                kw = dict(max_new_tokens=n, stop_ids=stops, verify=verify, **rule, **sampling)
                a, sa = generate(m, p, **kw)
                b, sb = decode_one(m, p, **kw)
                assert a == b, (rule, verify, stops, sampling)
                assert {k: sa[k] for k in keys} == {k: sb[k] for k in keys}, (rule, verify)
                rejected += sa["rejected"] if sampling else 0
    assert sa["context_full"] and len(a) < 30        # the last case really ran out of context
    assert rejected > 0                              # sampled drafts were really checked


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
