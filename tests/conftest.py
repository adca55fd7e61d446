import argparse
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from compat.hub import cache_dir  # noqa: E402
from model import Config, Transformer  # noqa: E402

# Real files, for the tests that need them (each skips without its file): where the code looks
# for them offline, $MTP_CACHE (.ci/run points it at a folder that holds them)
CACHE = cache_dir()
GPT2_RANKS = os.path.join(CACHE, "gpt2.tiktoken")
GSM8K_TRAIN = os.path.join(CACHE, "gsm8k", "train.jsonl")
GSM8K_TEST = os.path.join(CACHE, "gsm8k", "test.jsonl")
SMOLLM2_GGUF = os.path.join(CACHE, "SmolLM2-135M-Instruct.Q4_1.gguf")
from compat.hf import save_pretrained


def rules(mid):
    """Every decoding rule the tests hold to every invariant (decode, verified decoding, batch
    against one prompt, engines, the exact sampling test), from this one list: each rule of the
    command lines (decode.RULE_FLAGS) at a spread of values, at --k-max 3, and read lean. `mid`
    is a threshold among the test model's confidences, so that passes accept different counts.
    A rule added to RULE_FLAGS joins every one of these tests with no test changed."""
    from decode import RULE_FLAGS
    from fast.lean import Lean
    values = {int: [1, 2, 3, 4], float: [0.0, mid, 0.9, 1.0]}
    out = []
    for kind, make, _ in RULE_FLAGS.values():
        out += [make(kind(v), argparse.Namespace(k_max=None)) for v in values[kind]]
        out.append(make(kind(values[kind][0]), argparse.Namespace(k_max=3)))      # --k-max 3
        out.append(Lean(make(kind(values[kind][2] if kind is int else mid),
                             argparse.Namespace(k_max=None))))
    return list(dict.fromkeys(out))            # each once, in order


def tiny_config(model_type="llama", tie=True, gqa=True, vocab=61, **kw):
    """A few-thousand-parameter model of either architecture."""
    base = dict(model_type=model_type, vocab_size=vocab, n_layer=2, n_head=4,
                n_kv_head=2 if (gqa and model_type != "gpt2") else 4, d_model=32, head_dim=8,
                d_ff=48, max_seq_len=128, tie_embeddings=tie,
                qkv_bias=model_type in ("gpt2", "qwen2"), o_bias=model_type == "gpt2",
                mlp_bias=model_type == "gpt2")
    base.update(kw)
    return Config(**base)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return Transformer(tiny_config(**kw)).eval()


def mtp_model(**kw):
    """tiny_model with an <MTP> token, decoding up to 4 tokens per pass."""
    m = tiny_model(**kw)
    m.add_mtp_token()
    m.cfg.mtp_k_max = 4
    return m


def save_tiny_mtp_checkpoint(path, k_max=3):
    """A tiny random Llama with <MTP> (decoding up to k_max tokens per pass) and the synthetic
    tokenizer, saved as a checkpoint directory the CLIs can load."""
    from synthetic.tokenizer import synthetic_tokenizer
    torch.manual_seed(0)
    tok = synthetic_tokenizer()
    m = Transformer(tiny_config(vocab=tok.n_vocab, max_seq_len=256))
    m.add_mtp_token()
    m.cfg.mtp_k_max = k_max
    save_pretrained(m, path)
    tok.save(path)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def tiny_init(tmp_path_factory):
    """A tiny random Llama with the synthetic tokenizer: a teacher that trains in seconds."""
    from synthetic.tokenizer import synthetic_tokenizer
    d = tmp_path_factory.mktemp("init")
    torch.manual_seed(0)
    tok = synthetic_tokenizer()
    save_pretrained(Transformer(tiny_config(vocab=tok.n_vocab, max_seq_len=256)), d)
    tok.save(d)
    return str(d)


def assert_exits(main, args, message, capsys):
    """main(args) stops with exit code 2 and a message on stderr containing `message`, no traceback."""
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder on a real read-only file system (a 1 MB tmpfs mounted read-only); skipped where
    mounting is not permitted (not root, or a container without the capability)."""
    import subprocess
    ro = tmp_path / "ro"
    ro.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(ro)],
                       capture_output=True)
    if r.returncode != 0:
        pytest.skip("mounting a read-only tmpfs is not permitted here")
    try:
        yield ro
    finally:
        subprocess.run(["umount", str(ro)], check=True)
