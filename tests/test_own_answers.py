"""tools/own_answers.py: the file it writes is what generate_batch decodes for those questions,
a killed run continues to the file an uninterrupted one writes, and distill.py trains on it."""
import json

import pytest

from compat.tokenizers import load_tokenizer
from conftest import assert_exits
from decode import Static, load_for_decoding
from fast.batch import generate_batch
from synthetic.problems import synthetic_problems
from tools import own_answers
from data import prompt_ids
from tools.own_answers import answer_text, main


@pytest.fixture(scope="module")
def ckpt(tiny_init):
    """The teacher: a tiny random Llama with the synthetic tokenizer (conftest.tiny_init)."""
    return tiny_init


def write(ckpt, out, *extra):
    main(["--ckpt", ckpt, "--data", "synthetic", "--limit", "7", "--batch", "3", "--max-new", "12",
          "--out", str(out), *extra])
    return open(out, encoding="utf-8").read()


def test_the_answers_are_what_the_model_decodes(ckpt, tmp_path):
    rows = [json.loads(line) for line in write(ckpt, tmp_path / "a.jsonl").splitlines()]
    questions = [r["question"] for r in synthetic_problems(7)]
    assert [r["question"] for r in rows] == questions
    model, tok = load_for_decoding(ckpt, "cpu"), load_tokenizer(ckpt)
    outs, _ = generate_batch(model, [prompt_ids(tok, q) for q in questions], Static(1),
                             max_new_tokens=12, stop_ids=tok.stop_ids)    # all at once, one batch
    assert [r["answer"] for r in rows] == [answer_text(tok, o) for o in outs]
    assert any(r["answer"] for r in rows)
    # the answer stops at the model's stop token and at the next question
    stop = tok.stop_ids[0]
    assert answer_text(tok, tok.encode(" 12 apples.") + [stop]) == "12 apples."
    assert answer_text(tok, tok.encode(" 5.\nQ: next")) == "5."


@pytest.mark.parametrize("sampled", [False, True])
def test_a_killed_run_continues_to_the_same_file(ckpt, tmp_path, monkeypatch, sampled):
    extra = ["--temperature", "0.9", "--seed", "3"] if sampled else []
    whole = write(ckpt, tmp_path / "whole.jsonl", *extra)
    real, calls = own_answers.generate_batch, []

    def dies_in_the_second_batch(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kw)
    monkeypatch.setattr(own_answers, "generate_batch", dies_in_the_second_batch)
    with pytest.raises(SystemExit) as stop:                  # Ctrl-C: one line, exit 130
        write(ckpt, tmp_path / "cut.jsonl", *extra)
    assert stop.value.code == 130
    monkeypatch.setattr(own_answers, "generate_batch", real)
    with open(tmp_path / "cut.jsonl", "a") as f:
        f.write('{"question": "half a ro')                  # a row cut short by a kill -9
    assert write(ckpt, tmp_path / "cut.jsonl", *extra) == whole
    # a kill between a whole row and its newline: the row is written again, once
    with open(tmp_path / "cut.jsonl", "w") as f:
        f.write(whole.split("\n", 1)[0])
    assert write(ckpt, tmp_path / "cut.jsonl", *extra) == whole
    # question i draws from row_seed(seed, i), so the batches it is decoded in change nothing
    assert write(ckpt, tmp_path / "batch2.jsonl", *extra, "--batch", "2") == whole
    assert (whole != write(ckpt, tmp_path / "other.jsonl", "--temperature", "0.9", "--seed", "4")) \
        or not sampled


def test_bad_inputs_are_one_line(ckpt, tmp_path, capsys):
    write(ckpt, tmp_path / "a.jsonl")
    assert_exits(main, ["--ckpt", ckpt, "--out", str(tmp_path / "a.jsonl"), "--limit", "7",
                        "--max-new", "20"], "was started with other settings (--max-new 12 -> 20)",
                 capsys)
    (tmp_path / "b.jsonl").write_text(json.dumps({"question": "other", "answer": "x"}) + "\n")
    assert_exits(main, ["--ckpt", ckpt, "--out", str(tmp_path / "b.jsonl"), "--limit", "3"],
                 "b.jsonl:1 is not the answer to question 1 of --data", capsys)
    (tmp_path / "c.jsonl").write_text("[1, 2]\n")           # JSON, but no row
    assert_exits(main, ["--ckpt", ckpt, "--out", str(tmp_path / "c.jsonl"), "--limit", "3"],
                 "c.jsonl:1 is not the answer to question 1", capsys)
    (tmp_path / "a.json").write_text("{not json")            # the settings beside a.jsonl
    assert_exits(main, ["--ckpt", ckpt, "--out", str(tmp_path / "a.jsonl"), "--limit", "7",
                        "--max-new", "12"], "a.json (the settings of", capsys)
    assert_exits(main, ["--ckpt", ckpt, "--out", str(tmp_path / "c.txt")], "must end in .jsonl",
                 capsys)
    assert_exits(main, ["--ckpt", str(tmp_path), "--out", str(tmp_path / "d.jsonl")],
                 "no config.json", capsys)


def test_distill_trains_on_the_file(ckpt, tmp_path, capsys):
    from distill import parse_args, train
    data = tmp_path / "own.jsonl"
    main(["--ckpt", ckpt, "--limit", "8", "--batch", "4", "--max-new", "10", "--out", str(data)])
    student = train(parse_args(["--init", ckpt, "--data", str(data), "--out", str(tmp_path / "run"),
                                "--steps", "2", "--seq-len", "64", "--micro-batch", "2",
                                "--step-tokens", "128", "--threads", "1"]))
    assert student.cfg.mtp_token_id is not None and "8 samples" in capsys.readouterr().out
