"""
tools/convert_gguf.py on the real SmolLM2-135M-Instruct GGUF ($MTP_CACHE, as tests/conftest.py says), CPU, ~20 s on 2 cores.

    python -m pytest -q tests/test_convert_gguf.py -s      # -s shows the model's greedy reply

The file is converted once per test run into a temporary directory. Skipped without the `gguf`
package or the GGUF file; the transformers / tokenizers comparisons skip without those packages.
"""
import json
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch

from tools import convert_gguf
from conftest import GSM8K_TEST, ROOT, SMOLLM2_GGUF, assert_exits
from data import read_jsonl
from compat.tokenizers import load_tokenizer
from model import KVCache, apply_rope
from compat.hf import from_pretrained

GGUF = SMOLLM2_GGUF


# -----------------------------------------------------------------------------
# The q/k permutation on its own: no GGUF file needed

def llama_cpp_permute(w, n_head):
    """llama.cpp's convert_hf_to_gguf.py, verbatim: HF rows -> GGML's interleaved rope rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def ggml_rope(x, pos, theta):
    """GGML's (non-neox) rope, written independently: pairs (2i, 2i+1) rotate by pos * theta^(-2i/hs).
    x (T, nh, hs), pos (T,)."""
    hs = x.size(-1)
    freq = theta ** (-torch.arange(0, hs, 2, dtype=torch.float64) / hs)      # (hs/2,)
    ang = pos[:, None, None].double() * freq                                  # (T, 1, hs/2)
    a, b = x[..., 0::2].double(), x[..., 1::2].double()
    out = torch.stack([a * ang.cos() - b * ang.sin(), a * ang.sin() + b * ang.cos()], -1)  # (T, nh, hs/2, 2)
    return out.flatten(-2).float()


def test_unpermute_inverts_llama_cpp():
    w = torch.randn(9 * 64, 40)
    for n_head in (9, 3):
        rows = n_head * 64
        assert torch.equal(convert_gguf.unpermute_qk(llama_cpp_permute(w[:rows], n_head), n_head), w[:rows])


def test_unpermuted_weights_give_ggml_attention_scores():
    """GGML scores (permuted weights + interleaved rope) == ours (unpermuted + HF rotate-half)."""
    torch.manual_seed(0)
    nh, hs, D, T, theta = 3, 16, 24, 7, 100000.0
    Wq, Wk, x = torch.randn(nh * hs, D), torch.randn(nh * hs, D), torch.randn(T, D)
    pos = torch.arange(T)
    Pq, Pk = llama_cpp_permute(Wq, nh), llama_cpp_permute(Wk, nh)             # what the GGUF holds
    qg = ggml_rope((x @ Pq.T).view(T, nh, hs), pos, theta)
    kg = ggml_rope((x @ Pk.T).view(T, nh, hs), pos, theta)
    ggml_scores = torch.einsum("thd,shd->hts", qg, kg)
    q = (x @ convert_gguf.unpermute_qk(Pq, nh).T).view(T, nh, hs).transpose(0, 1)[None]   # (1, nh, T, hs)
    k = (x @ convert_gguf.unpermute_qk(Pk, nh).T).view(T, nh, hs).transpose(0, 1)[None]
    inv = 1.0 / theta ** (torch.arange(0, hs, 2).double() / hs)
    emb = torch.cat([pos[:, None] * inv] * 2, -1)[None, None]                # (1, 1, T, hs)
    q, k = apply_rope(q, emb.cos().float(), emb.sin().float()), apply_rope(k, emb.cos().float(), emb.sin().float())
    ours = (q @ k.transpose(-1, -2))[0]                                       # (nh, T, T)
    torch.testing.assert_close(ours, ggml_scores, atol=1e-3, rtol=1e-4)


def test_missing_gguf_package_exits_2_without_traceback():
    code = ("import sys, runpy; sys.modules['gguf'] = None; "
            "sys.argv = ['convert_gguf', 'x.gguf', 'out']; "
            "runpy.run_module('tools.convert_gguf', run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert "pip install gguf" in r.stderr and "Traceback" not in r.stderr


# -----------------------------------------------------------------------------
# The output directory: checked before any work, never a run's, replaced only when asked; and
# exit 2 on bad input (no GGUF file needed: the conversion itself is replaced where it would run)

def no_work(*a, **kw):
    raise AssertionError("the conversion started before its output directory was checked")


def listing(folder):
    return sorted((str(p.relative_to(folder)), p.read_bytes() if p.is_file() else None)
                  for p in folder.rglob("*"))


def test_output_is_checked_before_any_work_and_a_run_is_never_replaced(tmp_path, capsys, monkeypatch):
    pytest.importorskip("gguf")
    monkeypatch.setattr(convert_gguf, "convert_into", no_work)
    src = tmp_path / "x.gguf"
    src.write_bytes(b"GGUF")
    run = tmp_path / "run"                   # a trained run: its student, train_state.pt, its log
    (run / "ckpt").mkdir(parents=True)
    (run / "ckpt" / "config.json").write_text("{}")
    (run / "ckpt" / "train_state.pt").write_bytes(b"state")
    (run / "log.jsonl").write_text('{"step": 1}\n')
    before = listing(tmp_path)
    for out, extra in [(run / "ckpt", []), (run / "ckpt", ["--replace"]), (run, ["--replace"]),
                       (run / "ckpt.old", [])]:         # a run's empty slot belongs to it too
        assert_exits(convert_gguf.main, [str(src), str(out), *extra], "belongs to a training run",
                     capsys)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert_exits(convert_gguf.main, [str(src), str(mine)], "is not empty: give a new directory, "
                 "or --replace", capsys)
    assert_exits(convert_gguf.main, [str(src), str(mine / "notes.txt")], "is a file", capsys)
    assert_exits(convert_gguf.main, [str(tmp_path / "none.gguf"), str(tmp_path / "new")],
                 "none.gguf is not a file", capsys)
    assert listing(tmp_path) == sorted(before + [("mine", None), ("mine/notes.txt", b"mine")])


def test_a_read_only_place_fails_first(tmp_path, capsys, monkeypatch, read_only_dir):
    pytest.importorskip("gguf")
    monkeypatch.setattr(convert_gguf, "convert_into", no_work)
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    assert_exits(convert_gguf.main, [str(tmp_path / "x.gguf"), str(read_only_dir / "out")],
                 "cannot be written (Read-only file system)", capsys)


def test_replace_takes_the_whole_directory_and_a_failure_changes_nothing(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    src, mine = tmp_path / "x.gguf", tmp_path / "mine"
    src.write_bytes(b"GGUF")
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    before = listing(mine)

    def full_disk(gguf_path, work, dtype):
        os.makedirs(os.path.join(work, "out"))
        open(os.path.join(work, "out", "config.json"), "w").write("{}")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(convert_gguf, "convert_into", full_disk)
    with pytest.raises(convert_gguf.ConversionError, match="No space left on device.*is as it was"):
        convert_gguf.convert(str(src), str(mine), replace=True)
    assert listing(mine) == before                                   # no temporary folder either

    def converted(gguf_path, work, dtype):
        os.makedirs(os.path.join(work, "out"))
        for name in ("config.json", "model.safetensors"):
            open(os.path.join(work, "out", name), "w").write(name)
        return None, None, types.SimpleNamespace(tensors=[]), {}
    monkeypatch.setattr(convert_gguf, "convert_into", converted)
    convert_gguf.convert(str(src), str(mine), replace=True)
    assert listing(mine) == [("config.json", b"config.json"), ("model.safetensors", b"model.safetensors")]
    assert not list(tmp_path.rglob(".gguf-convert-*"))


def test_a_gguf_cut_short_is_named(tmp_path, capsys):
    """A download cut short fails in gguf's reader with numpy's dtype, reshape or index errors:
    the message says what the file is, at every cut."""
    gguf = pytest.importorskip("gguf")
    import numpy as np
    whole = tmp_path / "small.gguf"
    w = gguf.GGUFWriter(str(whole), "llama")
    w.add_tensor("token_embd.weight", np.zeros((64, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data, cut = whole.read_bytes(), tmp_path / "cut.gguf"
    for n in (40, 100, 300, len(data) - 100):
        cut.write_bytes(data[:n])
        assert_exits(convert_gguf.main, [str(cut), str(tmp_path / "out")],
                     "cut.gguf is cut short or damaged, not a complete GGUF file", capsys)
    cut.write_bytes(b"PK\x03\x04" + data[4:])
    assert_exits(convert_gguf.main, [str(cut), str(tmp_path / "out")], "is not a GGUF file", capsys)
    assert sorted(os.listdir(tmp_path)) == ["cut.gguf", "small.gguf"]      # nothing written


# -----------------------------------------------------------------------------
# The real file, converted once (every test below skips without gguf or the file)

@pytest.fixture(scope="module")
def reader():
    gguf = pytest.importorskip("gguf")
    if not os.path.isfile(GGUF):
        pytest.skip(f"{GGUF} is not there")
    return gguf.GGUFReader(GGUF)


@pytest.fixture(scope="module")
def out_dir(reader, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("gguf") / "smollm2")
    convert_gguf.main([GGUF, out])                     # the CLI path; its summary shows with -s
    yield out
    shutil.rmtree(out)                                 # 513 MiB: pytest keeps old tmp dirs around


@pytest.fixture(scope="module")
def model(out_dir):
    return from_pretrained(out_dir).eval()


@pytest.fixture(scope="module")
def tok(out_dir):
    return load_tokenizer(out_dir)


@pytest.fixture(scope="module")
def gguf_tokens(reader):
    """The GGUF's own token strings, read independently of the converter."""
    return reader.fields["tokenizer.ggml.tokens"].contents()


@pytest.fixture(scope="module")
def gsm8k_texts():
    if not os.path.isfile(GSM8K_TEST):
        pytest.skip(f"{GSM8K_TEST} is not there")
    rows = read_jsonl(GSM8K_TEST)[:50]
    return [s for r in rows for s in (r["question"], r["answer"])]


def test_config_matches_the_model_card(out_dir):
    with open(os.path.join(out_dir, "config.json")) as f:
        cfg = json.load(f)
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["vocab_size"]) == (30, 576, 9, 3, 49152)
    assert cfg["tie_word_embeddings"] and cfg["rope_theta"] == 1e5 and cfg["rms_norm_eps"] == 1e-5
    with open(os.path.join(out_dir, "tokenizer_config.json")) as f:
        hf_tok = json.load(f)
    assert "<|im_start|>" in hf_tok["chat_template"] and hf_tok["eos_token"] == "<|im_end|>"


def test_tokenizer_round_trips_gsm8k(tok, gsm8k_texts):
    for s in gsm8k_texts:
        assert tok.decode(tok.encode(s)) == s


def test_known_words_get_the_gguf_ids(tok, gguf_tokens):
    ids = {t: i for i, t in enumerate(gguf_tokens)}
    # text -> the GGUF token strings that spell it (GPT-2 byte-level: " " is "Ġ", "\n" is "Ċ")
    cases = {" the": ["Ġthe"], "Hello": ["Hello"], " world": ["Ġworld"], "Hello world": ["Hello", "Ġworld"],
             " Paris": ["ĠParis"], "\n": ["Ċ"], "2024": ["2", "0", "2", "4"],    # digits one per token
             "It's": ["It", "'s"]}
    for text, pieces in cases.items():
        assert tok.encode(text) == [ids[p] for p in pieces], text
    assert tok.encode("<|im_start|>", special=True) == [ids["<|im_start|>"]] == [1]
    assert tok.encode("<|im_start|>") != [1]                    # ordinary text unless allowed
    assert tok.eos_id == ids["<|im_end|>"] and ids["<|endoftext|>"] in tok.stop_ids


@pytest.fixture(scope="module")
def hf_tok(reader, gguf_tokens):
    """SmolLM2's tokenizer.json pipeline (Digits, then ByteLevel BPE) rebuilt with HF `tokenizers`
    from the GGUF's vocabulary and merges: an independent reference for our tiktoken version."""
    tokenizers = pytest.importorskip("tokenizers")
    merges = reader.fields["tokenizer.ggml.merges"].contents()
    hf = tokenizers.Tokenizer(tokenizers.models.BPE({t: i for i, t in enumerate(gguf_tokens)},
                                                    [tuple(m.split(" ", 1)) for m in merges]))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
        tokenizers.pre_tokenizers.Digits(individual_digits=True),
        tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return hf




def test_matches_hf_tokenizers_on_gsm8k(tok, hf_tok, gsm8k_texts):
    for s in gsm8k_texts:
        assert tok.encode(s) == hf_tok.encode(s).ids, s


def test_whitespace_before_digit_matches_hf(tok, hf_tok):
    for s in ["a  5 b", "x   12", "on Monday and  2/5"]:
        assert tok.encode(s) == hf_tok.encode(s).ids, s


# -----------------------------------------------------------------------------
# The converted model

@torch.inference_mode()
def greedy(model, tok, ids, n):
    """Up to n greedy tokens after ids, with a KV cache; stops at the tokenizer's stop tokens."""
    cache, x, out = KVCache(), torch.tensor([ids]), []
    for _ in range(n):
        logits = model(x, cache=cache)                 # (1, T, V); T = len(ids), then 1
        nxt = int(logits[0, -1].argmax())
        if nxt in tok.stop_ids:
            break
        out.append(nxt)
        x = torch.tensor([[nxt]])
    return out


def test_greedy_reply_knows_paris(model, tok):
    """Wrong q/k un-permutation or dequantization turns the reply into noise; this catches both."""
    reply = tok.decode(greedy(model, tok, tok.prompt("What is the capital of France?"), 20))
    print(f"\ngreedy reply: {reply!r}")
    assert "Paris" in reply


def test_logits_finite_and_equal_to_transformers(model, tok, out_dir):
    ids = torch.tensor([tok.prompt("What is the capital of France?")])
    with torch.inference_mode():
        ours = model(ids)                              # (1, T, V)
    assert torch.isfinite(ours).all()
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out_dir).float().eval()
    with torch.inference_mode():
        theirs = hf(ids).logits
    err = (ours - theirs).abs().max().item()
    print(f"\nmax |ours - transformers| = {err:.2e}")
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
