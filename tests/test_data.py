"""data.py: tokenizers, datasets, and the packer against one-region-at-a-time references."""
import base64
import json
import os
import random

import pytest
import torch

from conftest import GPT2_RANKS, GSM8K_TEST, tiny_model
from data import DataError, gsm8k, load_dataset, pack, read_jsonl, teacher_input
from compat.tokenizers import gpt2_tokenizer, load_tokenizer, Tokenizer, TokenizerError
from bench import extract_flexible, extract_strict, gold_answer, same_number
from compat.tokenizers import llama3_tokenizer
from synthetic.problems import synthetic_problems
from synthetic.tokenizer import synthetic_tokenizer, train_bpe

needs_files = pytest.mark.skipif(not (os.path.isfile(GPT2_RANKS) and os.path.isfile(GSM8K_TEST)),
                                 reason="needs gpt2.tiktoken and gsm8k/test.jsonl in $MTP_CACHE")

# --- tokenizers ---


@needs_files
def test_gpt2_tokenizer_from_the_ranks_file():
    tok = gpt2_tokenizer(GPT2_RANKS)
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.eos_id == 50256 and tok.n_vocab == 50257
    for row in read_jsonl(GSM8K_TEST)[:50]:
        text = row["question"] + "\n" + row["answer"]
        assert tok.decode(tok.encode(text)) == text


def test_tokenizer_save_load_round_trip(tmp_path):
    tok = synthetic_tokenizer()
    tok.save(tmp_path)
    tok2 = load_tokenizer(str(tmp_path))
    text = synthetic_problems(1, seed=5)[0]["answer"] + " ünïcode ✓"
    assert tok2.encode(text) == tok.encode(text)
    assert tok2.decode(tok.encode(text)) == text
    assert tok2.eos_id == tok.eos_id == 511 and tok.n_vocab == 512


def test_train_bpe_is_deterministic_and_splits_digits():
    texts = ["the cat sat on the mat 123", "the mat is 45 cm"] * 5
    a, b = train_bpe(texts, 270), train_bpe(texts, 270)
    assert a._mergeable_ranks == b._mergeable_ranks
    tok = Tokenizer(a, eos="<|endoftext|>")
    pieces = [tok.decode([i]) for i in tok.encode("the mat 123")]
    assert pieces[-3:] == ["1", "2", "3"] and "the" in pieces


def _ranks_file(path, tokens):
    with open(path, "w") as f:
        for i, t in enumerate(tokens):
            f.write(f"{base64.b64encode(t).decode()} {i}\n")


def test_llama3_tokenizer_model(tmp_path):
    # a small tiktoken-format ranks file: all bytes, then a few merges
    merges = [b"he", b"ll", b"hell", b"hello", b" w", b"or", b" wor", b"ld", b" world"]
    path = tmp_path / "tokenizer.model"
    _ranks_file(path, [bytes([b]) for b in range(256)] + merges)
    tok = llama3_tokenizer(str(path))
    n = 256 + len(merges)
    assert tok.encode("hello world") == [256 + merges.index(b"hello"), 256 + merges.index(b" world")]
    assert tok.bos_id == n and tok.eos_id == n + 9          # <|begin_of_text|>, <|eot_id|>
    assert n + 1 in tok.stop_ids                             # <|end_of_text|>
    ids = tok.prompt("hi")
    assert ids[0] == n and tok.decode(ids).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert load_tokenizer(str(path)).encode("hello") == tok.encode("hello")


def test_hf_tokenizer_json(tmp_path):
    # byte-level BPE in HF's format: bytes as printable chars, merges in id order
    from compat.tokenizers import bytes_to_unicode
    chars = bytes_to_unicode()
    vocab = {"<|im_start|>": 0, "<|im_end|>": 1}
    for b in range(256):
        vocab[chars[b]] = len(vocab)
    merges = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("Ġ", "w")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tj = {"model": {"type": "BPE", "vocab": vocab, "merges": [f"{a} {b}" for a, b in merges]},
          "added_tokens": [{"id": 0, "content": "<|im_start|>"}, {"id": 1, "content": "<|im_end|>"}],
          "pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}]}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    tok = load_tokenizer(str(tmp_path))
    assert tok.encode("hello") == [vocab["hello"]]
    assert tok.encode(" w12") == [vocab["Ġw"], vocab["1"], vocab["2"]]
    assert tok.eos_id == 1 and tok.chat == "chatml"
    assert tok.encode("<|im_start|>", special=True) == [0]
    assert tok.encode("<|im_start|>") != [0]            # plain text never becomes a special token
    # ids that disagree with the merge order cannot be expressed in tiktoken: a clear error
    tj["model"]["vocab"]["he"], tj["model"]["vocab"]["ll"] = vocab["ll"], vocab["he"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(TokenizerError, match="merge order"):
        load_tokenizer(str(tmp_path))


def test_tokenizer_errors(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer in"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(TokenizerError, match="not 'gpt2', a file, or a checkpoint directory"):
        load_tokenizer(str(tmp_path / "missing"))
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("this is not a ranks file at all\n")
    with pytest.raises(TokenizerError, match="bad.tiktoken:1 is not a tiktoken ranks line"):
        load_tokenizer(str(bad))
    with pytest.raises(TokenizerError, match="does not exist"):
        gpt2_tokenizer(str(tmp_path / "nope.tiktoken"))


# --- datasets ---


def test_synthetic_generator():
    rows = synthetic_problems(300, seed=3)
    assert rows == synthetic_problems(300, seed=3)
    assert rows != synthetic_problems(300, seed=4)
    for row in rows:
        lines = row["answer"].split("\n")
        assert 2 <= sum("=" in line for line in lines) <= 4   # 2-4 steps of arithmetic
        assert lines[-1].startswith("#### ")
        for line in lines[:-1]:
            if "=" in line:                               # every written step is exact arithmetic
                lhs, rhs = line.split("=")
                expr = lhs.split(" has ")[-1].split(" hold ")[-1].split(" cost ")[-1].split(" is ")[-1]
                expr = expr.split(" gets ")[-1].split(" saves ")[-1]
                expr = expr.split("Together they have ")[-1]
                assert eval(expr.replace("/", "//")) == int(rhs.split()[0]), line
        result = int(gold_answer(row["answer"]))
        assert result >= 0 and f"= {result} " in row["answer"]
    templates = {row["question"].split(".")[1].split()[-1] for row in rows}
    assert len(templates) >= 6
    # a longer stream starts with the shorter one: bench --limit 1000 extends the 200 test problems
    assert synthetic_problems(250, seed=3) == rows[:250]
    assert load_dataset("synthetic", "test", limit=300)[:200] == load_dataset("synthetic", "test")


@needs_files
def test_gsm8k_local_and_errors(tmp_path):
    rows = gsm8k("test")
    assert len(rows) == 1319 and gold_answer(rows[0]["answer"]) == "18"
    with pytest.raises(DataError, match="split must be"):
        gsm8k("validation")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(str(tmp_path / "x.jsonl"), "train")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n')
    with pytest.raises(DataError, match="needs the fields 'question' and 'answer'"):
        load_dataset(str(bad), "train")


def test_answer_extraction():
    assert extract_flexible("so 3 + 4 = 7 apples. The answer is 1,234.") == "1234"
    assert extract_strict("blah #### 42") == "42"
    assert extract_strict("The answer is $17.") == "17"
    assert extract_strict("it is 5") is None and extract_flexible("none") is None


@pytest.mark.parametrize("content,message", [
    (b'["a question", "an answer"]\n', "rows.jsonl:1 needs the fields 'question' and 'answer'"),
    (b'"question answer"\n', "rows.jsonl:1 needs the fields 'question' and 'answer'"),
    (b'{"question": "q", "answer": "#### 1"}\n{"question": 3, "answer": "#### 3"}\n',
     "rows.jsonl:2: 'question' must be a string, not int"),
    (b'{"question": "q", "answer": ["#### 1"]}\n', "rows.jsonl:1: 'answer' must be a string, not list"),
    (b'{"question": "q", "answer": "#### 1"}\n{"question": "caf\xe9", "answer": "#### 1"}\n',
     "rows.jsonl:2 is not UTF-8 text"),
])
def test_jsonl_rows_are_objects_of_strings_in_utf8(tmp_path, content, message):
    (tmp_path / "rows.jsonl").write_bytes(content)
    with pytest.raises(DataError, match=message):
        read_jsonl(str(tmp_path / "rows.jsonl"))
    with pytest.raises(DataError, match="does not exist"):
        read_jsonl(str(tmp_path / "missing.jsonl"))


@pytest.mark.parametrize("chat", [None, "chatml"])
def test_answer_in_window_agrees_with_answer_start(chat):
    """answer_in_window (bytes, no encoding) against answer_start (the prompt encoded again), at
    every cut of every sample, plain and in a chat format."""
    import tiktoken
    from data import answer_in_window, answer_start, sample_ids
    tok = synthetic_tokenizer()
    if chat:
        enc, n = tok.enc, tok.enc.n_vocab
        tok = Tokenizer(tiktoken.Encoding("chat", pat_str=enc._pat_str, mergeable_ranks=enc._mergeable_ranks,
                                          special_tokens={"<|im_start|>": n, "<|im_end|>": n + 1}),
                        "<|im_end|>", chat=chat)
    for row in synthetic_problems(50, seed=5) + [{"question": "café?", "answer": "naïve #### 1"}]:
        ids = sample_ids(tok, row)
        start = answer_start(tok, row, ids)
        assert [answer_in_window(tok, row, ids, n) for n in range(1, len(ids) + 1)] == \
            [start < n for n in range(1, len(ids) + 1)]


def test_jsonl_with_a_utf8_bom_reads_and_other_encodings_and_shapes_are_named(tmp_path):
    row = {"question": "q", "answer": "#### 1"}
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(row) + "\n").encode() * 2)
    assert read_jsonl(str(path)) == [row, row]
    for content, message in [
            ((json.dumps(row) + "\n").encode("utf-16"), "rows.jsonl:1 is not UTF-8 text (it starts "
                                                        "with a UTF-16 byte-order mark)"),
            (json.dumps([row], indent=1).encode(), "rows.jsonl:1 is not valid JSON (Expecting "
                                                   "value at column 2); a .jsonl holds one JSON "
                                                   "object per line"),
            (b'{"question": "q" "answer": "a"}\n', "not valid JSON (Expecting ',' delimiter at "
                                                   "column 18)"),
            (b'{"prompt": "q", "completion": "a"}\n', "needs the fields 'question' and 'answer' "
                                                      "(it has 'prompt', 'completion')"),
            (b'["q", "a"]\n', "(it is an array, not an object)")]:
        path.write_bytes(content)
        with pytest.raises(DataError) as e:
            read_jsonl(str(path))
        assert message in str(e.value), str(e.value)


def test_answers_signed_and_comma_grouped():
    """What the bench reads: a sign, thousands commas and a dollar sign, in every reader."""
    for written, number in (("-5", "-5"), ("1,234", "1234"), ("$1,234.50", "1234.50"),
                            ("-1,000", "-1000")):
        assert extract_flexible(f"In all 3 bags: {written}.") == number
        assert extract_strict(f"2 + 2 = 4 #### {written}") == number
        assert extract_strict(f"The answer is {written}.") == number
        assert gold_answer(f"<<1+1=2>> so\n#### {written.lstrip('$')}") == number
    assert same_number("-5", "-5") and not same_number("-5", "5")
    assert same_number("1234.50", "1234.5") and same_number("1000", "1000.0")
    assert not same_number(None, "5") and not same_number("1,2", "12")


# --- packing: ONE packed forward equals every region run on its own ---


def _reference_logits(model, row, p, span):
    """Plain causal forward on x_0..x_p + span (masks or teacher tokens); last k logits."""
    x = torch.tensor([row[:p + 1] + span])
    return model(x)[0, -len(span) - 1:]


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_packed_forward_equals_regions_run_separately(model_type):
    model = tiny_model(model_type=model_type, vocab=50)
    mtp, eos = model.add_mtp_token(), 1
    r = random.Random(0)
    for trial in range(4):
        k, M, N = r.randint(2, 6), r.randint(1, 4), r.choice([32, 48])
        offset = r.randrange(N // M - 0) if N // M >= k else 0
        seqs = [[r.randint(2, 49) for _ in range(r.randint(3, 60))] + [eos] for _ in range(3)]
        P = pack(seqs, k, offset, M, N, mtp, eos)
        logits = model(P.idx, pos=P.pos, mask=P.mask)                  # (B, L, V)
        rollout = torch.randint(2, 50, (3, M, k))                         # any tokens will do
        t_logits = model(teacher_input(P, rollout), pos=P.pos, mask=P.mask)
        checked = 0
        for b, s in enumerate(seqs):
            row = (s + [eos] * N)[:N]
            for reg in range(M):
                if not P.valid[b, reg]:
                    continue
                p = offset + reg * (N // M)
                ref = _reference_logits(model, row, p, [mtp] * (k - 1))
                torch.testing.assert_close(logits[b, P.sup[reg]], ref, atol=1e-5, rtol=0)
                ref_t = _reference_logits(model, row, p, rollout[b, reg, :-1].tolist())
                torch.testing.assert_close(t_logits[b, P.sup[reg]], ref_t, atol=1e-5, rtol=0)
                checked += 1
        assert checked > 0


def test_pack_targets_validity_and_eos_rules():
    eos, mtp = 1, 99
    seq = list(range(10, 30)) + [eos]          # 20 tokens then EOS at index 20
    P = pack([seq, list(range(40, 140))], k=4, offset=2, n_regions=4, seq_len=40, mtp_id=mtp, eos_id=eos)
    # regions end at 2, 12, 22, 32: in row 0, 22 and 32 are past the EOS
    assert P.valid[0].tolist() == [True, True, False, False]
    assert P.targets[0, 0].tolist() == [13, 14, 15, 16]                 # x_3..x_6
    # row 1 is cut at 40 tokens with no EOS: every region valid, targets past the cut unknown
    assert P.valid[1].all() and P.targets[1, 3].tolist() == [73, 74, 75, 76]
    # a region whose span reaches the EOS is the last one, targets past the EOS are EOS
    P = pack([seq], k=4, offset=7, n_regions=4, seq_len=40, mtp_id=mtp, eos_id=eos)
    assert P.valid[0].tolist() == [True, True, False, False]              # ends 7, 17
    assert P.targets[0, 1].tolist() == [28, 29, eos, eos]
    assert P.past_eos[0, 1].tolist() == [False, False, False, True]
    # layout: the student input has k-1 masks after each region's prefix end
    assert (P.idx[0] == mtp).sum() == 4 * 3 and P.idx.shape[1] == 40 + 4 * 3
    assert P.pos[P.sup[1]].tolist() == [17, 18, 19, 20]
    with pytest.raises(ValueError, match="too short"):
        pack([seq], k=8, offset=0, n_regions=8, seq_len=40, mtp_id=mtp, eos_id=eos)


def test_pack_uses_the_last_eos_when_the_prompt_contains_it_too():
    """Chat formats close the user turn with the same token that ends the answer."""
    eos, mtp = 1, 99
    seq = [5, 6, 7, eos, 8, 9] + list(range(10, 30)) + [eos]     # EOS in the prompt, then at 26
    P = pack([seq], k=3, offset=2, n_regions=4, seq_len=40, mtp_id=mtp, eos_id=eos)
    assert P.valid[0].tolist() == [True, True, True, False]          # ends 2, 12, 22 (32 > 26)
    assert P.length.tolist() == [27]
    assert P.targets[0, 0].tolist() == [eos, 8, 9]


def test_pre_tokenizer_patterns_from_tokenizer_json():
    from compat.tokenizers import LLAMA3_PATTERN, pre_tokenizer_pattern
    from compat.tokenizers import DIGITS_PATTERN, GPT2_PATTERN
    split = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated"},
        {"type": "ByteLevel", "use_regex": False}]}
    assert pre_tokenizer_pattern(split, "t.json") == LLAMA3_PATTERN       # Llama-3 / Qwen2
    digits = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, {"type": "ByteLevel", "use_regex": True}]}
    assert pre_tokenizer_pattern(digits, "t.json") == DIGITS_PATTERN      # SmolLM2
    assert pre_tokenizer_pattern({"type": "ByteLevel"}, "t.json") == GPT2_PATTERN
    with pytest.raises(TokenizerError, match="no regex"):
        pre_tokenizer_pattern({"type": "Whitespace"}, "t.json")
