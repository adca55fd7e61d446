"""bench.py end to end on a tiny checkpoint: every strategy gets a row, the numbers add up."""
import json
import os

import pytest
import torch

from bench import fewshot_prefix, mean_se, main
from display.pareto import series
from conftest import GSM8K_TRAIN, save_tiny_mtp_checkpoint, tiny_config
from model import Transformer
from compat.hf import save_pretrained


def test_mean_se():
    m, se = mean_se([1.0, 0.0, 1.0, 1.0])
    assert m == 0.75 and abs(se - 0.25) < 1e-12      # sqrt(sample variance 0.25 / n 4)
    assert mean_se([1.0, 1.0]) == (1.0, 0.0)


@pytest.mark.skipif(not os.path.isfile(GSM8K_TRAIN),
                    reason=f"needs {GSM8K_TRAIN} (the exemplars come from GSM8K train)")
def test_fewshot_prompt_uses_train_exemplars_only():
    prefix = fewshot_prefix(2)
    assert prefix.count("Q: ") == 2 and "Let's think step by step." in prefix
    assert "<<" not in prefix and "The answer is 72." in prefix      # GSM8K train row 1


def tiny_bench(tmp_path, out, *extra):
    """bench.py on a tiny random MTP checkpoint (also its own baseline and teacher); its results."""
    ckpt = tmp_path / "ckpt"
    if not ckpt.exists():
        save_tiny_mtp_checkpoint(ckpt)
    main(["--ckpt", str(ckpt), "--baseline", str(ckpt), "--teacher", str(ckpt), "--limit", "3",
          "--static-k", "1,2", "--tau", "0.9,0.0", "--max-new", "12", "--out", str(out), *extra])
    return json.load(open(f"{out}.json"))


def test_bench_runs_every_strategy(tmp_path, capsys):
    out = tmp_path / "res"
    res = tiny_bench(tmp_path, out)["results"]
    names = [r["strategy"] for r in res]
    assert names == ["baseline k=1 (step 0)", "static k=1", "static k=2", "ConfAdapt tau=0.9",
                     "ConfAdapt tau=0.0", "verified static k=3", "verified ConfAdapt tau=0.9",
                     "verified ConfAdapt tau=0.0"]
    by = {r["strategy"]: r for r in res}
    assert by["static k=1"]["speedup"] == 1.0 and by["static k=1"]["eff_k"] == 1.0
    assert by["static k=2"]["eff_k"] == 2.0 and by["ConfAdapt tau=0.0"]["eff_k"] == 3.0
    assert all(r["teacher_nll"] > 0 and r["n"] == 3 for r in res)
    assert all(len(r["correct"]) == 3 and sum(r["correct"]) / 3 == r["acc"] for r in res)
    # fidelity: k=1 is itself; the random model's 3-token guesses are wrong; verified is exact
    assert by["static k=1"]["same_as_k1"] == 1.0 and by["static k=1"]["first_diff"] is None
    assert by["ConfAdapt tau=0.0"]["same_as_k1"] == 0.0 and by["ConfAdapt tau=0.0"]["first_diff"] >= 1
    for name in ("verified static k=3", "verified ConfAdapt tau=0.0"):
        assert by[name]["same_as_k1"] == 1.0 and by[name]["acc"] == by["static k=1"]["acc"]
        assert by[name]["rejected"] > 0 and by[name]["eff_k"] < 3.0
    assert "same_as_k1" not in by["baseline k=1 (step 0)"]    # another model: no fidelity
    # each row says what it is: its rule, verified or not, the baseline (nothing reads its name)
    assert [(r["rule"], r["family"], r["verify"], r["baseline"]) for r in res[:2]] == \
        [("static k=1", "static", False, True), ("static k=1", "static", False, False)]
    assert [series(r) for r in res] == ["baseline"] + ["static"] * 2 + ["ConfAdapt"] * 2 + \
        ["verified static"] + ["verified ConfAdapt"] * 2
    table = open(f"{out}.md").read()
    assert table.count("\n| ") == 10         # header, rule, 8 strategies
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["n"] == 3 and last["max_confadapt_eff_k"] == 3.0     # one machine-readable line


def test_bench_takes_every_rule_flag_and_lean(tmp_path):
    """The rule flags come from decode.RULE_FLAGS (--taus: the older spelling of --tau); --lean
    adds a lean row after each rule but static k, verified too."""
    res = tiny_bench(tmp_path, tmp_path / "res", "--lean", "--static-k", "1", "--taus", "0.5",
                     "--no-verified")["results"]
    assert [r["strategy"] for r in res] == ["baseline k=1 (step 0)", "static k=1",
                                            "ConfAdapt tau=0.5", "ConfAdapt tau=0.5, lean"]
    assert series(res[3]) == "ConfAdapt, lean"


def test_a_killed_bench_keeps_the_strategies_done(tmp_path, monkeypatch):
    """OUT.json and OUT.md are rewritten after every strategy from static k=1 on: a run killed
    in its fourth strategy leaves the first three, marked partial, with their speedups."""
    import bench
    real, calls = bench.run_strategy, []

    def dies_on_the_fourth(strategy, *args):
        calls.append(strategy.name)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(strategy, *args)
    monkeypatch.setattr(bench, "run_strategy", dies_on_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        tiny_bench(tmp_path, tmp_path / "res")
    got = json.load(open(tmp_path / "res.json"))
    assert [r["strategy"] for r in got["results"]] == calls[:3]
    assert got["header"].endswith("(partial: 3 of 8 strategies)")
    assert got["results"][1]["strategy"] == "static k=1" and got["results"][1]["speedup"] == 1.0
    assert open(tmp_path / "res.md").read().count("\n| ") == 5      # header, rule, 3 rows


def test_bench_batch_decodes_the_same(tmp_path):
    """--batch 2 (batches of 2 and 1 here) changes the throughput, not what is decoded."""
    one = tiny_bench(tmp_path, tmp_path / "b1")
    two = tiny_bench(tmp_path, tmp_path / "b2", "--batch", "2")
    assert "batch 2" in two["header"] and "batch 1" in one["header"]
    # the CUDA-graph engine's static cache layout, uncaptured: sized for what a batch's passes add
    static = tiny_bench(tmp_path, tmp_path / "b2s", "--batch", "2", "--engine", "static")
    for r1, r2 in zip(one["results"] * 2, two["results"] + static["results"], strict=True):
        for key in ("strategy", "acc", "strict", "eff_k", "eff_k_std", "tokens", "samples", "correct",
                    "same_as_k1", "first_diff", "confirmed", "rejected"):
            assert r1.get(key) == r2.get(key), key
        assert r1["teacher_nll"] == pytest.approx(r2["teacher_nll"], rel=1e-5)


@pytest.mark.parametrize("budget", [1, 2**30])     # one row per forward; all rows in one
def test_teacher_nlls_equal_one_pair_at_a_time(budget):
    """Batched, padded, memoized scoring == a forward of each prompt + output alone, summing
    -log softmax at every output position by hand."""
    from bench import teacher_nlls
    torch.manual_seed(0)
    teacher = Transformer(tiny_config(vocab=50)).eval()
    rand = lambda n: torch.randint(0, 50, (n,)).tolist()
    pairs = [(rand(5), rand(7)), (rand(2), rand(1)), (rand(9), []), (rand(3), rand(12))]
    pairs.append(pairs[0])                                   # a repeat is scored once
    naive = []
    for p, o in pairs:
        logp = torch.log_softmax(teacher(torch.tensor([p + o]))[0], -1)
        naive.append((sum(-logp[len(p) - 1 + j, t].item() for j, t in enumerate(o)), len(o)))
    forwards = []
    teacher.register_forward_hook(lambda *_: forwards.append(1))
    scored = {}
    got = teacher_nlls(teacher, pairs, scored, budget=budget)
    for (s, n), (s_ref, n_ref) in zip(got, naive, strict=True):
        assert n == n_ref and s == pytest.approx(s_ref, rel=1e-5, abs=1e-5)
    assert len(forwards) == (3 if budget == 1 else 1) and len(scored) == 3
    n_before = len(forwards)
    assert teacher_nlls(teacher, pairs[:2], scored) == got[:2] and len(forwards) == n_before


def test_first_difference():
    from bench import first_difference, fidelity
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1 and first_difference([1, 2], [1, 2, 3]) == 2
    f = fidelity([[1, 2], [3, 4], [5]], [[1, 2], [3, 9], [6]])
    assert f["same_as_k1"] == pytest.approx(1 / 3) and f["first_diff"] == 0.5


def test_bench_fails_when_verified_differs(tmp_path, capsys, monkeypatch):
    """A verified output that is not static k=1's is a bug: bench says so and exits 2."""
    import bench
    real = bench.generate_batch

    def broken(model, prompts, rule, **kw):         # verification that lets a guess through
        outs, st = real(model, prompts, rule, **kw)
        if kw.get("verify"):
            outs = [o[:-1] + [(o[-1] + 1) % 10] for o in outs]
        return outs, st
    monkeypatch.setattr(bench, "generate_batch", broken)
    with pytest.raises(SystemExit) as e:
        tiny_bench(tmp_path, tmp_path / "res")
    assert e.value.code == 2 and "outputs differ from static k=1" in capsys.readouterr().err


def test_bench_sampled(tmp_path, capsys):
    """--temperature: every strategy samples, --samples outputs per problem (accuracy their
    mean), the same outputs whatever --batch is; a paired difference from k=1 instead of the
    fidelity columns, and no exit when verified outputs differ from k=1's (they should)."""
    args = ("--temperature", "0.8", "--top-p", "0.9", "--samples", "2", "--seed", "3")
    one = tiny_bench(tmp_path, tmp_path / "s1", *args)
    two = tiny_bench(tmp_path, tmp_path / "s2", *args, "--batch", "3")
    assert "temperature 0.8, top-k 0, top-p 0.9, seed 3, 2 samples per problem" in one["header"]
    for r1, r2 in zip(one["results"], two["results"], strict=True):
        for key in ("strategy", "acc", "acc_se", "eff_k", "tokens", "correct", "confirmed",
                    "rejected", "acc_diff", "acc_diff_se"):
            assert r1.get(key) == r2.get(key), key
    by = {r["strategy"]: r for r in one["results"]}
    assert all(len(r["correct"]) == 6 and r["n"] == 3 for r in one["results"])
    assert by["static k=1"]["eff_k"] == 1.0 and "acc_diff" not in by["static k=1"]
    assert "same_as_k1" not in by["verified static k=3"]
    assert by["verified static k=3"]["rejected"] > 0
    assert "acc_diff" in by["verified ConfAdapt tau=0.0"] and "acc_diff" not in by["baseline k=1 (step 0)"]
    table = open(tmp_path / "s1.md").read().splitlines()
    assert table[2].endswith("accuracy - k=1 (paired) |") and table[4].endswith("| - | - | - |")
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["sampling"] == {"temperature": 0.8, "top_k": 0, "top_p": 0.9, "seed": 3,
                                "samples": 2}
    again = tiny_bench(tmp_path, tmp_path / "s3", "--temperature", "0.8", "--top-p", "0.9",
                       "--samples", "2", "--seed", "4")
    assert [r["correct"] for r in again["results"]] != [r["correct"] for r in one["results"]] \
        or [r["tokens"] for r in again["results"]] != [r["tokens"] for r in one["results"]]


def test_bench_samples_need_a_temperature(tmp_path, capsys):
    from conftest import assert_exits
    save_tiny_mtp_checkpoint(tmp_path / "ckpt")
    assert_exits(main, ["--ckpt", str(tmp_path / "ckpt"), "--limit", "2", "--samples", "3"],
                 "only with --temperature > 0", capsys)


def test_output_path_tokenizers_and_lists_are_checked_before_any_work(tmp_path, capsys, monkeypatch):
    """--out that cannot be written fails before the first strategy (not after it); a --teacher
    or --baseline of another tokenizer would score or decode other text than the ids say."""
    import bench
    from conftest import assert_exits
    from synthetic.tokenizer import synthetic_tokenizer
    ckpt, other = tmp_path / "ckpt", tmp_path / "other"
    save_tiny_mtp_checkpoint(ckpt)
    save_pretrained(Transformer(tiny_config(vocab=512, max_seq_len=256)), other)
    synthetic_tokenizer(400).save(other)              # fits the vocabulary, but other ids
    run = ["--ckpt", str(ckpt), "--limit", "2", "--static-k", "1", "--tau", "", "--max-new", "4"]

    def no_work(*a, **kw):
        raise AssertionError("a strategy ran before the output path was checked")
    monkeypatch.setattr(bench, "run_strategy", no_work)
    assert_exits(main, run + ["--out", str(tmp_path / "no" / "res")], "the folder", capsys)
    for flag in ("--teacher", "--baseline"):
        assert_exits(main, run + [flag, str(other), "--out", str(tmp_path / "res")],
                     f"{flag} {other} has another tokenizer", capsys)
    assert_exits(main, run[:4] + ["--static-k", "1,a", "--out", str(tmp_path / "res")],
                 "--static-k takes comma-separated int values", capsys)


def test_answers_without_a_number_are_counted_in_one_warning(tmp_path, capsys):
    """The gold number is the one after '####' (or an answer that is a number alone); answers
    with neither cannot score any output right: one warning line says how many there are."""
    from bench import gold_answer, same_number
    assert gold_answer("12 + 5 = 17\n#### 1,017") == "1017" and gold_answer(" 17 ") == "17"
    assert gold_answer("The answer: 17") is None and gold_answer("#### seventeen") is None
    assert not same_number("17", None) and same_number("17.0", "17")
    save_tiny_mtp_checkpoint(tmp_path / "ckpt")
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps({"question": "Ava has 12 apples and buys 5. How many?",
                                        "answer": a}) + "\n"
                            for a in ("12 + 5 = 17\n#### 17", "17", "The answer: 17", "17 apples")))
    run = ["--ckpt", str(tmp_path / "ckpt"), "--data", str(data), "--static-k", "1", "--tau", "",
           "--max-new", "4", "--no-verified", "--out", str(tmp_path / "b")]
    main(run)
    err = capsys.readouterr().err
    assert f"warning: 2 of 4 answers in {data} do not end in '#### N'" in err, err
    main(run[:3] + ["synthetic", "--limit", "2"] + run[4:])      # every answer has its number
    assert "warning" not in capsys.readouterr().err


def test_a_prompt_longer_than_the_context_names_the_format(tmp_path, capsys, monkeypatch):
    """The prompt alone fills the context: the fix is a shorter prompt, not a lower --max-new."""
    import bench
    from conftest import assert_exits
    save_tiny_mtp_checkpoint(tmp_path / "ckpt")                     # context 256
    run = ["--ckpt", str(tmp_path / "ckpt"), "--limit", "1", "--static-k", "1", "--tau", "",
           "--out", str(tmp_path / "b")]
    monkeypatch.setattr(bench, "fewshot_prefix", lambda: "Q: 1 + 1?\nA: 2.\n\n" * 40)
    assert_exits(main, run + ["--format", "fewshot"], "use a shorter --format (qa or chat instead "
                 "of the 8-shot fewshot)", capsys)
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"question": "1 + " * 200 + "1?", "answer": "#### 201"}) + "\n")
    assert_exits(main, run + ["--data", str(data)], "leaves no room for an answer in the model's "
                 "context (256): use shorter questions", capsys)


def test_rows_past_the_trained_k_max_say_so(tmp_path):
    """More candidates than the checkpoint was trained for: the row's name says so."""
    res = tiny_bench(tmp_path, tmp_path / "res", "--no-verified", "--static-k", "1,4", "--tau", "")
    assert [r["strategy"] for r in res["results"]][1:] == ["static k=1", "static k=4 (beyond trained k_max)"]


@pytest.mark.parametrize("option, message", [
    (["--engine", "graphs"], "engine 'graphs' needs a CUDA device"),
    (["--top-p", "0.5"], "top_k and top_p cut a sampled distribution: set a temperature > 0"),
    (["--temperature", "0.7", "--top-p", "0"], "top_p in (0, 1]"),
    (["--tau", "nan"], "tau must be in [0, 1], got nan"),
    (["--k-max", "0"], "k_max must be >= 1"),
    (["--limit", "0"], "--limit, --batch and --max-new must be >= 1"),
    (["--data", "nosuch"], "unknown dataset 'nosuch'"),
    (["--baseline", "/nonexistent"], "--baseline: tokenizer '/nonexistent': not 'gpt2'"),
    (["--ckpt", "/nonexistent"], "'/nonexistent' is neither a checkpoint directory nor a hub name"),
])
def test_every_bad_option_is_one_line(tmp_path, capsys, option, message):
    """Each option's bad value: one line and exit 2, before any problem is decoded."""
    import bench
    from conftest import assert_exits
    save_tiny_mtp_checkpoint(tmp_path / "ckpt")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(bench, "generate_batch", lambda *a, **kw: pytest.fail("decoding started"))
        assert_exits(main, ["--ckpt", str(tmp_path / "ckpt"), "--limit", "2", "--static-k", "1",
                            "--tau", "0.9", "--out", str(tmp_path / "b"), *option], message, capsys)
