"""bench.py end to end on a tiny checkpoint: every strategy gets a row, the numbers add up."""
import json
import os

import pytest
import torch

from bench import fewshot_prefix, mean_se, main
from conftest import SHARED, tiny_config
from data import synthetic_tokenizer
from model import Transformer


def test_mean_se():
    m, se = mean_se([1.0, 0.0, 1.0, 1.0])
    assert m == 0.75 and abs(se - 0.25) < 1e-12      # sqrt(sample variance 0.25 / n 4)
    assert mean_se([1.0, 1.0]) == (1.0, 0.0)


@pytest.mark.skipif(not os.path.isfile(os.path.join(SHARED, "data", "gsm8k", "train.jsonl")),
                    reason="needs ../shared/data/gsm8k/train.jsonl (the exemplars come from GSM8K train)")
def test_fewshot_prompt_uses_train_exemplars_only():
    prefix = fewshot_prefix(2)
    assert prefix.count("Q: ") == 2 and "Let's think step by step." in prefix
    assert "<<" not in prefix and "The answer is 72." in prefix      # GSM8K train row 1


def tiny_bench(tmp_path, out, *extra):
    """bench.py on a tiny random MTP checkpoint (also its own baseline and teacher); its results."""
    ckpt = tmp_path / "ckpt"
    if not ckpt.exists():
        torch.manual_seed(0)
        tok = synthetic_tokenizer()
        m = Transformer(tiny_config(vocab=tok.n_vocab, max_seq_len=256))
        m.add_mtp_token()
        m.cfg.mtp_k_max = 3
        m.save_pretrained(ckpt)
        tok.save(ckpt)
    main(["--ckpt", str(ckpt), "--baseline", str(ckpt), "--teacher", str(ckpt), "--limit", "3",
          "--static", "1,2", "--taus", "0.9,0.0", "--max-new", "12", "--out", str(out), *extra])
    return json.load(open(f"{out}.json"))


def test_bench_runs_every_strategy(tmp_path, capsys):
    out = tmp_path / "res"
    res = tiny_bench(tmp_path, out)["results"]
    names = [r["strategy"] for r in res]
    assert names == ["baseline k=1 (step 0)", "static k=1", "static k=2", "ConfAdapt tau=0.9",
                     "ConfAdapt tau=0.0"]
    by = {r["strategy"]: r for r in res}
    assert by["static k=1"]["speedup"] == 1.0 and by["static k=1"]["eff_k"] == 1.0
    assert by["static k=2"]["eff_k"] == 2.0 and by["ConfAdapt tau=0.0"]["eff_k"] == 3.0
    assert all(r["teacher_nll"] > 0 and r["n"] == 3 for r in res)
    assert all(len(r["correct"]) == 3 and sum(r["correct"]) / 3 == r["acc"] for r in res)
    table = open(f"{out}.md").read()
    assert table.count("\n| ") == 7          # header, rule, 5 strategies
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last)["n"] == 3        # one machine-readable line last


def test_bench_batch_decodes_the_same(tmp_path):
    """--batch 2 (batches of 2 and 1 here) changes the throughput, not what is decoded."""
    one = tiny_bench(tmp_path, tmp_path / "b1")
    two = tiny_bench(tmp_path, tmp_path / "b2", "--batch", "2")
    assert "batch 2" in two["header"] and "batch 1" in one["header"]
    for r1, r2 in zip(one["results"], two["results"], strict=True):
        for key in ("strategy", "acc", "strict", "eff_k", "eff_k_std", "tokens", "samples", "correct"):
            assert r1[key] == r2[key], key
        assert r1["teacher_nll"] == pytest.approx(r2["teacher_nll"], rel=1e-5)
