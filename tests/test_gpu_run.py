"""tools/gpu_run.sh and its summary (tools/gpu_summary.py): each figure with its step and unit,
from JSON in the shape bench.py, bench_decode and bench_train write; the script's argument checks.

The whole script at toy sizes on the CPU (every step: about 70 s of CPU time, ten processes that
each import torch, so 1-2 minutes of wall clock) runs only with MTP_SLOW_TESTS=1:
    MTP_SLOW_TESTS=1 python -m pytest -q tests/test_gpu_run.py
"""
import json
import os
import subprocess

import pytest

from conftest import ROOT
from tools.gpu_summary import main, summary

SCRIPT = os.path.join(ROOT, "tools", "gpu_run.sh")


def row(strategy, eff_k, tokens_per_s, same=1.0, acc=0.1, nll=0.5):
    """A row of bench.py's OUT.json: its name, and its rule and verification apart."""
    verify = strategy.startswith("verified ")
    return {"strategy": strategy, "rule": strategy.removeprefix("verified "), "verify": verify,
            "eff_k": eff_k, "tokens_per_s": tokens_per_s, "acc": acc, "same_as_k1": same,
            "teacher_nll": nll}


def bench_json(rows, header="gsm8k, 500 problems"):
    """bench.py's OUT.json: speedup is tokens/s over static k=1's, as bench.write_results sets it."""
    k1 = next(r for r in rows if r["strategy"] == "static k=1")
    return {"header": header, "results": [{**r, "speedup": r["tokens_per_s"] / k1["tokens_per_s"]}
                                          for r in rows]}


def write(folder, name, obj):
    with open(os.path.join(folder, name), "w") as f:
        json.dump(obj, f)


def by_step(rows, start):
    return [r for r in rows if r[0].startswith(start)]


def test_summary_gives_each_figure_with_its_step_and_unit(tmp_path):
    write(tmp_path, "gsm8k.json", bench_json([
        row("static k=1", 1.0, 100.0), row("ConfAdapt tau=0.9", 2.6, 200.0, same=0.6),
        row("verified static k=4", 2.4, 180.0), row("verified ConfAdapt tau=0.9", 1.9, 150.0)]))
    write(tmp_path, "b1.json", bench_json([
        row("static k=1", 1.0, 300.0), row("ConfAdapt tau=0.9", 2.5, 600.0),
        row("ConfAdapt tau=0.95", 2.0, 600.0), row("verified static k=4", 3.0, 810.0),
        row("verified ConfAdapt tau=0.9", 2.0, 509.4)]))
    write(tmp_path, "b16.json", bench_json([
        row("static k=1", 1.0, 1000.0), row("ConfAdapt tau=0.9", 2.5, 1600.0),
        row("verified static k=4", 2.4, 1400.0)], header="x (partial: 3 of 4 strategies)"))
    write(tmp_path, "decode.json", {"rows": [
        {"run": "ours, eager", "tokens_per_s": 50.0}, {"run": "ours, graphs", "tokens_per_s": 300.0},
        {"run": "transformers generate", "tokens_per_s": 40.0}]})
    write(tmp_path, "train.json", {"mtp_ms": 150.0, "ntp_ms": 100.0, "ratio": 1.5, "flops_ratio": 1.75})
    (tmp_path / "steps.tsv").write_text("decode_compile\tstopped at its 240 s limit\n")
    rows = summary(str(tmp_path))

    assert all(len(r) == 4 for r in rows) and not any(">=" in cell for r in rows for cell in r)

    gsm = by_step(rows, "1.")                       # every strategy's tokens per pass
    assert {r[0] for r in gsm} == {"1. bench.py, GSM8K test in one batch"}
    assert [(r[2], r[3]) for r in gsm] == [("1.00", "tokens per pass"), ("2.60", "tokens per pass"),
                                           ("2.40", "tokens per pass"), ("1.90", "tokens per pass")]
    assert "same as k=1 60.0%" in gsm[1][1] and "teacher NLL 0.500" in gsm[1][1]

    b1 = by_step(rows, "2.")                        # tokens/s over static k=1's
    assert [r[2] for r in b1] == ["2.00", "2.70", "1.70"]
    assert all(r[3] == "x static k=1's tokens/s" for r in b1)
    assert b1[0][1] == "ConfAdapt tau=0.9, 2.50 tokens per pass, 600.0 tokens/s"
    assert not any("tau=0.95" in r[1] for r in b1)     # ConfAdapt 0.9 and the verified rules only
    b16 = by_step(rows, "3.")
    assert [r[2] for r in b16] == ["1.60", "1.40"]
    assert all("partial" in r[0] for r in b16)

    decode = by_step(rows, "4.")
    assert [(r[2], r[3]) for r in decode[:2]] == [("1.25", "x transformers generate's tokens/s"),
                                                  ("7.50", "x transformers generate's tokens/s")]
    assert decode[2][0].endswith("compiled") and decode[2][1:] == (
        "not measured (stopped at its 240 s limit)", "-", "-")
    train = by_step(rows, "5.")
    assert train[0][2:] == ("1.50", "x NTP step time") and "model-FLOPs ratio 1.75" in train[0][1]
    assert "not measured" in train[1][1]
    assert not by_step(rows, "6.")          # the optional step wrote nothing: no rows


def test_summary_without_a_transformers_row_gives_tokens_per_s(tmp_path):
    write(tmp_path, "decode.json", {"rows": [{"run": "ours, eager", "tokens_per_s": 50.0}]})
    assert by_step(summary(str(tmp_path)), "4.")[0][1:] == (
        "ours, eager, 50.0 tokens/s", "50.0", "tokens/s (no transformers row)")


def test_summary_writes_markdown(tmp_path, capsys):
    main([str(tmp_path)])                   # nothing measured: one row per step, none guessed
    md = (tmp_path / "summary.md").read_text()
    assert md == capsys.readouterr().out
    assert md.count("not measured") == 7 and md.startswith("| step | figure | value | unit |")


@pytest.mark.parametrize("args,message", [
    ([], "give the model"),
    (["--ckpt", "checkpoints/synth-teacher"], "give GSM8K"),
    (["--ckpt", "checkpoints/synth-teacher", "--gsm8k", "tests"], "no train.jsonl"),
    (["--gguf", "nowhere.gguf", "--gsm8k", "tests"], "no such file"),
    (["--bogus"], "unknown argument --bogus"),
    (["--tiny", "--answers", "mine"], "--answers must be reference or own")])
def test_gpu_run_checks_its_arguments(tmp_path, args, message):
    r = subprocess.run(["bash", SCRIPT, *args, "--out", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and message in r.stdout, r.stdout + r.stderr


@pytest.mark.skipif(not os.environ.get("MTP_SLOW_TESTS"),
                    reason="1-2 minutes on the CPU: set MTP_SLOW_TESTS=1 to run it")
def test_gpu_run_tiny_runs_every_step(tmp_path):
    r = subprocess.run(["bash", SCRIPT, "--tiny", "--out", str(tmp_path)], capture_output=True,
                       text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    ended = dict(line.split("\t") for line in (tmp_path / "steps.tsv").read_text().splitlines())
    assert all(ended[s].startswith("done") for s in ("distill", "gsm8k", "b1", "b16", "decode", "train"))
    for name in ("gsm8k", "b1", "b16"):
        assert len(json.load(open(tmp_path / f"{name}.json"))["results"]) >= 4
    md = (tmp_path / "summary.md").read_text()
    assert r.stdout.rstrip().endswith(f"tables and logs: {tmp_path}") and md in r.stdout
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    figures = lambda step, unit, has="": sum(line.startswith(f"| {step}") and f"| {unit} |" in line
                                             and has in line for line in rows)
    speedup = "x static k=1's tokens/s"         # ConfAdapt 0.9 and the two verified rules
    assert figures("1. ", "tokens per pass", "verified") == figures("2. ", speedup) == \
        figures("3. ", speedup) == 3
    assert figures("6. bench.py, batch 1,", speedup) == figures("6. bench.py, batch 16,", speedup) == 3


@pytest.mark.skipif(not os.environ.get("MTP_SLOW_TESTS"),
                    reason="1-2 minutes on the CPU: set MTP_SLOW_TESTS=1 to run it")
def test_gpu_run_tiny_on_the_teachers_own_answers(tmp_path):
    """--answers own writes the teacher's answers first and distills on them."""
    r = subprocess.run(["bash", SCRIPT, "--tiny", "--answers", "own", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    ended = dict(line.split("\t") for line in (tmp_path / "steps.tsv").read_text().splitlines())
    assert ended["own_answers"].startswith("done") and ended["distill"].startswith("done")
    assert len((tmp_path / "own_answers.jsonl").read_text().splitlines()) == 64
    assert "own_answers.jsonl" in (tmp_path / "distill.log").read_text() or \
        "64 samples" in (tmp_path / "distill.log").read_text()
