"""bench.py end to end on a tiny checkpoint: every strategy gets a row, the numbers add up."""
import json

import torch

from bench import fewshot_prefix, mean_se, main
from conftest import tiny_config
from data import synthetic_tokenizer
from model import Transformer


def test_mean_se():
    m, se = mean_se([1.0, 0.0, 1.0, 1.0])
    assert m == 0.75 and abs(se - 0.25) < 1e-12      # sqrt(sample variance 0.25 / n 4)
    assert mean_se([1.0, 1.0]) == (1.0, 0.0)


def test_fewshot_prompt_uses_train_exemplars_only():
    prefix = fewshot_prefix(2)
    assert prefix.count("Q: ") == 2 and "Let's think step by step." in prefix
    assert "<<" not in prefix and "The answer is 72." in prefix      # GSM8K train row 1


def test_bench_runs_every_strategy(tmp_path, capsys):
    torch.manual_seed(0)
    tok = synthetic_tokenizer()
    m = Transformer(tiny_config(vocab=tok.n_vocab, max_seq_len=256))
    m.add_mtp_token()
    m.cfg.mtp_k_max = 3
    m.save_pretrained(tmp_path / "ckpt")
    tok.save(tmp_path / "ckpt")
    out = tmp_path / "res"
    main(["--ckpt", str(tmp_path / "ckpt"), "--baseline", str(tmp_path / "ckpt"), "--teacher",
          str(tmp_path / "ckpt"), "--limit", "3", "--static", "1,2", "--taus", "0.9,0.0",
          "--max-new", "12", "--out", str(out)])
    res = json.load(open(f"{out}.json"))["results"]
    names = [r["strategy"] for r in res]
    assert names == ["baseline k=1 (step 0)", "static k=1", "static k=2", "ConfAdapt tau=0.9",
                     "ConfAdapt tau=0.0"]
    by = {r["strategy"]: r for r in res}
    assert by["static k=1"]["speedup"] == 1.0 and by["static k=1"]["eff_k"] == 1.0
    assert by["static k=2"]["eff_k"] == 2.0 and by["ConfAdapt tau=0.0"]["eff_k"] == 3.0
    assert all(r["teacher_nll"] > 0 and r["n"] == 3 for r in res)
    table = open(f"{out}.md").read()
    assert table.count("\n| ") == 7          # header, rule, 5 strategies
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last)["n"] == 3        # one machine-readable line last
