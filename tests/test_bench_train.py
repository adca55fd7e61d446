"""tools/bench_train.py on a tiny model: the report adds up, its MTP step is distill.py's, bad input."""
import argparse
import json

import pytest
import torch

from tools.bench_train import (load_samples, main, make_batches, mtp_train_step, ntp_inputs, parse_args,
                         peak_tflops)
from conftest import assert_exits, tiny_config
from compat.tokenizers import load_tokenizer
from distill import fit_schedule, load_models, lr_at, sample_stream, supervised_weight, train
from synthetic.problems import synthetic_problems
from synthetic.tokenizer import synthetic_tokenizer
from distill import parse_args as distill_args
from model import Transformer
from compat.hf import from_pretrained, save_pretrained


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(init dir, data .jsonl): a tiny random Llama with the synthetic tokenizer, 40 problems."""
    d = tmp_path_factory.mktemp("bench_train")
    torch.manual_seed(0)
    tok = synthetic_tokenizer()
    save_pretrained(Transformer(tiny_config(vocab=tok.n_vocab, max_seq_len=256)), d / "init")
    tok.save(d / "init")
    with open(d / "rows.jsonl", "w") as f:
        for row in synthetic_problems(40, seed=5):
            f.write(json.dumps(row) + "\n")
    return str(d / "init"), str(d / "rows.jsonl")


def bench_args(tiny, *extra):
    init, rows = tiny
    return ["--init", init, "--data", rows, "--seq-len", "48", "--k", "4", "--batch", "3",
            "--steps", "3", "--warmup-steps", "1", "--device", "cpu", "--threads", "1", *extra]


def test_report_adds_up(tiny, capsys):
    main(bench_args(tiny))
    out = capsys.readouterr().out.strip().splitlines()
    assert "| step | ms/step | tokens/s | TFLOP/s | MFU | peak GiB |" in out
    rows = [line for line in out if line.startswith(("| MTP", "| NTP"))]
    assert len(rows) == 2 and all("n/a (give --peak-tflops)" in r for r in rows)   # CPU: no MFU
    res = json.loads(out[-1])                                      # one JSON line, last
    assert res["mtp_ms"] > 0 and res["ntp_ms"] > 0 and res["steps"] == 3
    assert res["ratio"] == pytest.approx(res["mtp_ms"] / res["ntp_ms"], rel=1e-12)
    assert res["mtp_mfu"] is None and res["mtp_tflops"] > 0
    # the supervised positions, counted independently: k per region that data.pack marks valid
    cfg, _ = parse_args(bench_args(tiny))
    tok = load_tokenizer(tiny[0])
    seqs = load_samples(cfg, tok)
    batches = make_batches(cfg, seqs, 3, tok.n_vocab, tok.eos_id)
    seqs = seqs[0]
    count = sum(int(P.valid.sum()) * P.sup.size(1) for P in batches)
    assert count > 0 and res["mtp_sup_tokens"] == count
    assert res["mtp_sup_tok_per_s"] == pytest.approx(count / (3 * res["mtp_ms"] / 1000))
    assert res["mean_packed_len"] == sum(P.idx.size(1) for P in batches) / 3
    # the NTP step trains on the same rows' ground truth: the first N tokens, EOS-padded
    x, w = ntp_inputs(batches[0])
    first = [seqs[i][:48] for i in sample_stream(cfg, seqs, 1).take(3)]    # distill's first rows
    assert x.tolist() == [s + [tok.eos_id] * (48 - len(s)) for s in first]
    assert res["ntp_tokens"] == sum(float(ntp_inputs(P)[1].sum()) for P in batches)


def test_peak_lookup():
    assert peak_tflops(argparse.Namespace(peak_tflops=0.0), cuda=False) == \
        (None, "n/a (give --peak-tflops)")
    assert peak_tflops(argparse.Namespace(peak_tflops=2.5), cuda=False)[0] == 2.5


def test_mtp_step_is_distills_first_step(tiny, tmp_path):
    """bench_train's MTP step on its first batch == one step of distill.train, bit for bit."""
    init, rows = tiny
    run = distill_args(["--init", init, "--data", rows, "--out", str(tmp_path), "--k", "4",
                        "--seq-len", "48", "--micro-batch", "3", "--step-tokens", "144",
                        "--steps", "1", "--device", "cpu", "--threads", "1"])
    train(run)
    cfg, _ = parse_args(bench_args(tiny))
    student, teacher, tok = load_models(cfg, torch.device("cpu"))
    P = make_batches(cfg, load_samples(cfg, tok), 1, student.cfg.mtp_token_id, tok.eos_id)[0]
    lr = lr_at(0, run.lr, *fit_schedule(run.warmup, run.cooldown, run.steps), run.steps)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    denom = supervised_weight(P, cfg).sum().clamp(min=1)
    mtp_train_step(student, teacher, opt, P, denom, cfg, student.cfg.mtp_token_id, tok.eos_id,
                   torch.autocast("cpu", enabled=False))
    ours, theirs = student.state_dict(), from_pretrained(str(tmp_path / "ckpt")).state_dict()
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name
    assert not torch.equal(ours["blocks.0.mlp.fc.weight"], teacher.state_dict()["blocks.0.mlp.fc.weight"])


def test_bad_input_messages(tiny, tmp_path, capsys):
    def fails(args, message):
        assert_exits(main, args, message, capsys)

    fails(bench_args((str(tmp_path / "nowhere"), tiny[1])), "neither a checkpoint directory")
    fails(bench_args(tiny, "--batch", "0"), "--batch must be >= 1")
    fails(bench_args(tiny, "--steps", "0"), "--steps must be >= 1")
    fails(bench_args(tiny, "--seq-len", "12", "--k", "8"), "too short")
    fails(bench_args(tiny, "--seq-len", "254"), "exceeds the model's context")
    fails(bench_args(tiny, "--attention", "flex"), "needs CUDA")
