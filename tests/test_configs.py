"""Checkpoints as the hub serves them: config.json exactly as each transformers generation writes
it (4.x: rope_theta + rope_scaling; 5.x: one rope_parameters dict), tiny random safetensors
weights, and our logits against a naive per-position, per-head forward written from the HF
tensors. Where transformers is installed, the same checkpoints against stock transformers in both
directions. Every config field that would change the computation is an error, never ignored."""
import json
import math

import pytest
import torch
from safetensors.torch import save_file

from conftest import tiny_config
from model import CheckpointError, Transformer
from compat.hf import config_from_hf, config_to_hf, from_pretrained, save_pretrained

# -----------------------------------------------------------------------------
# config.json files, written literally. V4: as transformers 4.46 (4.51 for qwen3, the first with
# it) save_pretrained writes them; V5: as transformers 5.24 does (printed by it, keys sorted).
# Sizes: vocab 61, d_model 32, 2 layers, 4 heads.

V4 = {
    "gpt2": {
        "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
        "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_embd": 32, "n_head": 4,
        "n_inner": None, "n_layer": 2, "n_positions": 128, "reorder_and_upcast_attn": False,
        "resid_pdrop": 0.1, "scale_attn_by_inverse_layer_idx": False, "scale_attn_weights": True,
        "summary_activation": None, "summary_first_dropout": 0.1, "summary_proj_to_labels": True,
        "summary_type": "cls_index", "summary_use_proj": True, "torch_dtype": "float32",
        "transformers_version": "4.46.3", "use_cache": True, "vocab_size": 61},
    # GQA, untied, Llama-3.1's rope scaling (original length 512: head_dim 8 then has one
    # frequency kept, one interpolated, two divided by the factor)
    "llama-gqa-llama3": {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 1, "eos_token_id": 2, "head_dim": 8, "hidden_act": "silu",
        "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 48,
        "max_position_embeddings": 128, "mlp_bias": False, "model_type": "llama",
        "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2,
        "pretraining_tp": 1, "rms_norm_eps": 1e-06,
        "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 512, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "float32",
        "transformers_version": "4.46.3", "use_cache": True, "vocab_size": 61},
    # tied, plain multi-head attention, biases on q/k/v/o and the MLP
    "llama-tied-bias": {
        "architectures": ["LlamaForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
        "bos_token_id": 1, "eos_token_id": 2, "head_dim": 8, "hidden_act": "silu",
        "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 48,
        "max_position_embeddings": 128, "mlp_bias": True, "model_type": "llama",
        "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 4,
        "pretraining_tp": 1, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 10000.0,
        "tie_word_embeddings": True, "torch_dtype": "float32", "transformers_version": "4.46.3",
        "use_cache": True, "vocab_size": 61},
    "qwen2": {
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "hidden_act": "silu",
        "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 48,
        "max_position_embeddings": 128, "max_window_layers": 28, "model_type": "qwen2",
        "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0,
        "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "float32",
        "transformers_version": "4.46.3", "use_cache": True, "use_sliding_window": False,
        "vocab_size": 61},
    # head_dim 16 is not hidden_size / heads = 8, as in Qwen3-4B (128 vs 80)
    "qwen3": {
        "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "head_dim": 16, "hidden_act": "silu", "hidden_size": 32, "initializer_range": 0.02,
        "intermediate_size": 48, "max_position_embeddings": 128, "max_window_layers": 28,
        "model_type": "qwen3", "num_attention_heads": 4, "num_hidden_layers": 2,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_scaling": None,
        "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": True,
        "torch_dtype": "float32", "transformers_version": "4.51.0", "use_cache": True,
        "use_sliding_window": False, "vocab_size": 61},
}
V5 = {
    "gpt2": {
        "activation_function": "gelu_new", "add_cross_attention": False,
        "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1, "bos_token_id": 50256,
        "dtype": "float32", "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_embd": 32, "n_head": 4,
        "n_inner": None, "n_layer": 2, "n_positions": 128, "pad_token_id": None,
        "reorder_and_upcast_attn": False, "resid_pdrop": 0.1,
        "scale_attn_by_inverse_layer_idx": False, "scale_attn_weights": True,
        "summary_activation": None, "summary_first_dropout": 0.1, "summary_proj_to_labels": True,
        "summary_type": "cls_index", "summary_use_proj": True, "tie_word_embeddings": True,
        "transformers_version": "5.24.0", "use_cache": True, "vocab_size": 61},
    "llama-gqa-llama3": {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 1, "dtype": "float32", "eos_token_id": 2, "head_dim": 8,
        "hidden_act": "silu", "hidden_size": 32, "initializer_range": 0.02,
        "intermediate_size": 48, "max_position_embeddings": 128, "mlp_bias": False,
        "model_type": "llama", "num_attention_heads": 4, "num_hidden_layers": 2,
        "num_key_value_heads": 2, "pad_token_id": None, "pretraining_tp": 1, "rms_norm_eps": 1e-06,
        "rope_parameters": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                            "original_max_position_embeddings": 512, "rope_theta": 500000.0,
                            "rope_type": "llama3"},
        "tie_word_embeddings": False, "transformers_version": "5.24.0", "use_cache": True,
        "vocab_size": 61},
    "llama-tied-bias": {
        "architectures": ["LlamaForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
        "bos_token_id": 1, "dtype": "float32", "eos_token_id": 2, "head_dim": 8,
        "hidden_act": "silu", "hidden_size": 32, "initializer_range": 0.02,
        "intermediate_size": 48, "max_position_embeddings": 128, "mlp_bias": True,
        "model_type": "llama", "num_attention_heads": 4, "num_hidden_layers": 2,
        "num_key_value_heads": 4, "pad_token_id": None, "pretraining_tp": 1, "rms_norm_eps": 1e-06,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "tie_word_embeddings": True, "transformers_version": "5.24.0", "use_cache": True,
        "vocab_size": 61},
    "qwen2": {
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": None,
        "dtype": "float32", "eos_token_id": None, "hidden_act": "silu", "hidden_size": 32,
        "initializer_range": 0.02, "intermediate_size": 48,
        "layer_types": ["full_attention", "full_attention"], "max_position_embeddings": 128,
        "max_window_layers": 28, "model_type": "qwen2", "num_attention_heads": 4,
        "num_hidden_layers": 2, "num_key_value_heads": 2, "pad_token_id": None,
        "rms_norm_eps": 1e-06, "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
        "sliding_window": None, "tie_word_embeddings": False, "transformers_version": "5.24.0",
        "use_cache": True, "use_sliding_window": False, "vocab_size": 61},
    "qwen3": {
        "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": None, "dtype": "float32", "eos_token_id": None, "head_dim": 16,
        "hidden_act": "silu", "hidden_size": 32, "initializer_range": 0.02,
        "intermediate_size": 48, "layer_types": ["full_attention", "full_attention"],
        "max_position_embeddings": 128, "max_window_layers": 28, "model_type": "qwen3",
        "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2,
        "pad_token_id": None, "rms_norm_eps": 1e-06,
        "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
        "sliding_window": None, "tie_word_embeddings": True, "transformers_version": "5.24.0",
        "use_cache": True, "use_sliding_window": False, "vocab_size": 61},
}



def shrunk(d, **sizes):
    """A published config.json with every field kept and only the sizes made tiny."""
    small = {} if d["model_type"] == "gpt2" else \
        dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, vocab_size=61)
    return {**d, **small, **sizes}


PUBLISHED = {
    "Llama-3.1-8B": shrunk({
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu",
        "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
        "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 128256},
        num_attention_heads=4, num_key_value_heads=1),
    "Llama-3.2-1B": shrunk({
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu",
        "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
        "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
        "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "transformers_version": "4.45.0.dev0", "use_cache": True, "vocab_size": 128256},
        head_dim=8, num_attention_heads=4, num_key_value_heads=1),
    "Qwen3-4B-Instruct-2507": shrunk({
        "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
        "hidden_size": 2560, "initializer_range": 0.02, "intermediate_size": 9728,
        "max_position_embeddings": 262144, "max_window_layers": 36, "model_type": "qwen3",
        "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 5000000,
        "sliding_window": None, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False,
        "vocab_size": 151936},
        head_dim=16, num_attention_heads=4, num_key_value_heads=1),
    "Qwen2.5-7B-Instruct": shrunk({
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
        "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 3584,
        "initializer_range": 0.02, "intermediate_size": 18944, "max_position_embeddings": 32768,
        "max_window_layers": 28, "model_type": "qwen2", "num_attention_heads": 28,
        "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "transformers_version": "4.43.1", "use_cache": True,
        "use_sliding_window": False, "vocab_size": 152064},
        num_attention_heads=4, num_key_value_heads=2),
    "SmolLM2-135M": shrunk({
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "silu", "hidden_size": 576,
        "initializer_range": 0.041666666666666664, "intermediate_size": 1536,
        "is_llama_config": True, "max_position_embeddings": 8192, "model_type": "llama",
        "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_interleaved": False,
        "rope_scaling": None, "rope_theta": 100000, "tie_word_embeddings": True,
        "torch_dtype": "bfloat16", "transformers_version": "4.40.1", "use_cache": True,
        "vocab_size": 49152},
        num_attention_heads=4, num_key_value_heads=2),
    "gpt2": shrunk({
        "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
        "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256,
        "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "model_type": "gpt2",
        "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12, "n_positions": 1024,
        "resid_pdrop": 0.1, "summary_activation": None, "summary_first_dropout": 0.1,
        "summary_proj_to_labels": True, "summary_type": "cls_index", "summary_use_proj": True,
        "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}},
        "vocab_size": 50257},
        n_embd=32, n_head=4, n_layer=2, n_ctx=64, n_positions=64, vocab_size=61),
}

# the RoPE each case means, spelled out here (not parsed): (theta, llama3 settings or None)
LLAMA31_ROPE = dict(factor=8.0, low=1.0, high=4.0, old_len=8192)
ROPE = {"llama-gqa-llama3": (500000.0, dict(factor=8.0, low=1.0, high=4.0, old_len=512)),
        "llama-tied-bias": (10000.0, None), "qwen2": (1e6, None), "qwen3": (1e6, None),
        "Llama-3.1-8B": (500000.0, LLAMA31_ROPE),
        "Llama-3.2-1B": (500000.0, {**LLAMA31_ROPE, "factor": 32.0}),
        "Qwen3-4B-Instruct-2507": (5e6, None), "Qwen2.5-7B-Instruct": (1e6, None),
        "SmolLM2-135M": (100000.0, None), "gpt2": None}

CASES = [(name, gen, d) for gen, table in (("4.x", V4), ("5.x", V5)) for name, d in table.items()]
CASES += [(name, "published", d) for name, d in PUBLISHED.items()]
IDS = [f"{name}-{gen}" for name, gen, _ in CASES]


# -----------------------------------------------------------------------------
# Tiny random weights under the HF tensor names, listed here from the config (not via hf_layout)

def hf_tensors(d, seed=0):
    g = torch.Generator().manual_seed(seed)

    def w(*shape):      # scaled so activations stay O(1): differences show in the logits
        return torch.randn(*shape, generator=g) / math.sqrt(shape[-1])

    def norm(n):
        return 1 + 0.2 * torch.randn(n, generator=g)

    V = d["vocab_size"]
    if d["model_type"] == "gpt2":
        D, P = d["n_embd"], d["n_positions"]
        t = {"transformer.wte.weight": torch.randn(V, D, generator=g),
             "transformer.wpe.weight": 0.5 * torch.randn(P, D, generator=g),
             "transformer.ln_f.weight": norm(D), "transformer.ln_f.bias": w(D)}
        for i in range(d["n_layer"]):
            h = f"transformer.h.{i}"
            for ln in ("ln_1", "ln_2"):
                t[f"{h}.{ln}.weight"], t[f"{h}.{ln}.bias"] = norm(D), w(D)
            # Conv1D stores (in, out)
            for name, n_in, n_out in [("attn.c_attn", D, 3 * D), ("attn.c_proj", D, D),
                                      ("mlp.c_fc", D, 4 * D), ("mlp.c_proj", 4 * D, D)]:
                t[f"{h}.{name}.weight"] = w(n_out, n_in).t().contiguous()
                t[f"{h}.{name}.bias"] = 0.1 * torch.randn(n_out, generator=g)
        return t
    mt, D, F = d["model_type"], d["hidden_size"], d["intermediate_size"]
    nh = d["num_attention_heads"]
    nkv, hs = d.get("num_key_value_heads", nh), d.get("head_dim") or D // nh
    qkv_bias = mt == "qwen2" or d.get("attention_bias", False)
    o_bias = mt != "qwen2" and d.get("attention_bias", False)
    t = {"model.embed_tokens.weight": torch.randn(V, D, generator=g), "model.norm.weight": norm(D)}
    if not d.get("tie_word_embeddings", False):
        t["lm_head.weight"] = w(V, D)
    for i in range(d["num_hidden_layers"]):
        h = f"model.layers.{i}"
        t[f"{h}.input_layernorm.weight"] = norm(D)
        t[f"{h}.post_attention_layernorm.weight"] = norm(D)
        for p, n in (("q", nh), ("k", nkv), ("v", nkv)):
            t[f"{h}.self_attn.{p}_proj.weight"] = w(n * hs, D)
            if qkv_bias:
                t[f"{h}.self_attn.{p}_proj.bias"] = 0.1 * torch.randn(n * hs, generator=g)
        t[f"{h}.self_attn.o_proj.weight"] = w(D, nh * hs)
        if o_bias:
            t[f"{h}.self_attn.o_proj.bias"] = 0.1 * torch.randn(D, generator=g)
        if mt == "qwen3":
            t[f"{h}.self_attn.q_norm.weight"] = norm(hs)
            t[f"{h}.self_attn.k_norm.weight"] = norm(hs)
        for p, shape in (("gate", (F, D)), ("up", (F, D)), ("down", (D, F))):
            t[f"{h}.mlp.{p}_proj.weight"] = w(*shape)
            if d.get("mlp_bias", False):
                t[f"{h}.mlp.{p}_proj.bias"] = 0.1 * torch.randn(shape[0], generator=g)
    return t


def write_checkpoint(path, d, tensors):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(d, indent=2))
    save_file(tensors, path / "model.safetensors")
    return str(path)


# -----------------------------------------------------------------------------
# The naive reference: one position, one head at a time, in float64, from the HF tensors

def rope_frequencies(theta, hs, llama3):
    """Inverse frequencies, one at a time; llama3: Meta's rule for Llama 3.1's long context."""
    freqs = []
    for i in range(0, hs, 2):
        f = 1.0 / theta ** (i / hs)
        if llama3:
            wavelen = 2 * math.pi / f
            if wavelen > llama3["old_len"] / llama3["low"]:        # long waves: slowed down
                f = f / llama3["factor"]
            elif wavelen >= llama3["old_len"] / llama3["high"]:    # the band between: blended
                smooth = (llama3["old_len"] / wavelen - llama3["low"]) / (llama3["high"] - llama3["low"])
                f = (1 - smooth) * f / llama3["factor"] + smooth * f
        freqs.append(f)
    return freqs


def rotate(x, pos, freqs):
    """HF's rotate-half RoPE on one head vector: element i pairs with i + hs/2."""
    half, out = len(x) // 2, x.clone()
    for i in range(half):
        c, s = math.cos(pos * freqs[i]), math.sin(pos * freqs[i])
        out[i] = x[i] * c - x[i + half] * s
        out[i + half] = x[i + half] * c + x[i] * s
    return out


def attend(qs, ks, vs, n_kv):
    """Causal softmax attention, per query position and head. qs: [T][nh] vectors; ks, vs: [T][nkv]."""
    out = []
    for t, q_t in enumerate(qs):
        heads = []
        for h, q in enumerate(q_t):
            kv = h // (len(q_t) // n_kv)                    # grouped-query: heads share a kv head
            scores = torch.stack([q @ ks[s][kv] for s in range(t + 1)]) / math.sqrt(len(q))
            p = torch.softmax(scores, 0)
            heads.append(sum(p[s] * vs[s][kv] for s in range(t + 1)))
        out.append(torch.cat(heads))
    return out


def naive_logits(d, rope, tensors, ids):
    t = {k: v.double() for k, v in tensors.items()}
    if d["model_type"] == "gpt2":
        return naive_gpt2(d, t, ids)
    D, nh = d["hidden_size"], d["num_attention_heads"]
    nkv, hs = d.get("num_key_value_heads", nh), d.get("head_dim") or D // nh
    eps = d["rms_norm_eps"]

    def rms(x, weight):
        return weight * x / torch.sqrt((x * x).mean() + eps)

    def lin(x, name):
        return t[name + ".weight"] @ x + (t[name + ".bias"] if name + ".bias" in t else 0)

    freqs = rope_frequencies(rope[0], hs, rope[1])
    xs = [t["model.embed_tokens.weight"][i] for i in ids]
    for layer in range(d["num_hidden_layers"]):
        a = f"model.layers.{layer}.self_attn"
        qs, ks, vs = [], [], []
        for pos, x in enumerate(xs):
            x = rms(x, t[f"model.layers.{layer}.input_layernorm.weight"])
            q, k, v = lin(x, a + ".q_proj").split(hs), lin(x, a + ".k_proj").split(hs), lin(x, a + ".v_proj").split(hs)
            if d["model_type"] == "qwen3":
                q = [rms(h, t[a + ".q_norm.weight"]) for h in q]
                k = [rms(h, t[a + ".k_norm.weight"]) for h in k]
            qs.append([rotate(h, pos, freqs) for h in q])
            ks.append([rotate(h, pos, freqs) for h in k])
            vs.append(list(v))
        ys = attend(qs, ks, vs, nkv)
        for pos in range(len(xs)):
            x = xs[pos] + lin(ys[pos], a + ".o_proj")
            m = f"model.layers.{layer}.mlp"
            hx = rms(x, t[f"model.layers.{layer}.post_attention_layernorm.weight"])
            gate = lin(hx, m + ".gate_proj")
            xs[pos] = x + lin(gate * torch.sigmoid(gate) * lin(hx, m + ".up_proj"), m + ".down_proj")
    head = t.get("lm_head.weight", t["model.embed_tokens.weight"])
    return torch.stack([head @ rms(x, t["model.norm.weight"]) for x in xs])


def naive_gpt2(d, t, ids):
    D, nh, eps = d["n_embd"], d["n_head"], d["layer_norm_epsilon"]
    hs = D // nh

    def ln(x, name):
        return (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + eps) * t[name + ".weight"] + t[name + ".bias"]

    def conv1d(x, name):                       # Conv1D: weight stored (in, out)
        return x @ t[name + ".weight"] + t[name + ".bias"]

    def gelu_tanh(x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

    xs = [t["transformer.wte.weight"][i] + t["transformer.wpe.weight"][p] for p, i in enumerate(ids)]
    for layer in range(d["n_layer"]):
        h = f"transformer.h.{layer}"
        qkv = [conv1d(ln(x, h + ".ln_1"), h + ".attn.c_attn").split(D) for x in xs]
        ys = attend([list(q.split(hs)) for q, _, _ in qkv], [list(k.split(hs)) for _, k, _ in qkv],
                    [list(v.split(hs)) for _, _, v in qkv], nh)
        for pos in range(len(xs)):
            x = xs[pos] + conv1d(ys[pos], h + ".attn.c_proj")
            xs[pos] = x + conv1d(gelu_tanh(conv1d(ln(x, h + ".ln_2"), h + ".mlp.c_fc")), h + ".mlp.c_proj")
    return torch.stack([t["transformer.wte.weight"] @ ln(x, "transformer.ln_f") for x in xs])


IDX = torch.tensor([[3, 17, 42, 5, 60, 0, 11, 29, 8, 33, 50, 2, 19, 7]])


def max_diff(a, b):
    return (a.double() - b.double()).abs().max().item()


# -----------------------------------------------------------------------------
# Without transformers: every literal config loads, to the naive reference's logits

@pytest.mark.parametrize("name,gen,d", CASES, ids=IDS)
def test_checkpoint_matches_the_naive_forward(tmp_path, name, gen, d):
    tensors = hf_tensors(d)
    model = from_pretrained(write_checkpoint(tmp_path, d, tensors))
    with torch.no_grad():
        ours = model(IDX)[0]
    ref = naive_logits(d, ROPE[name], tensors, IDX[0].tolist())
    diff = max_diff(ours, ref)
    print(f"\n{name} ({gen}): ours vs naive max|diff| {diff:.2e} (logits' scale {ref.abs().max():.1f})")
    assert diff < 1e-4


@pytest.mark.parametrize("name", list(V4))
def test_both_generations_read_to_the_same_model_and_we_write_both_spellings(tmp_path, name):
    a, b = config_from_hf(V4[name]), config_from_hf(V5[name])
    assert a.summary() == b.summary()
    out = config_to_hf(config_from_hf(V5[name]))
    if name != "gpt2":
        # the transformers-4 spelling exactly as 4.x writes it, the transformers-5 one as 5.x does
        assert (out["rope_theta"], out["rope_scaling"]) == (V4[name]["rope_theta"], V4[name]["rope_scaling"])
        assert out["rope_parameters"] == V5[name]["rope_parameters"]
        for drop in (("rope_parameters",), ("rope_theta", "rope_scaling")):   # each one alone
            alone = {k: v for k, v in out.items() if k not in drop}
            assert config_from_hf(alone).summary() == a.summary()
    assert config_from_hf(out).summary() == a.summary()


def test_qwen3_round_trip_and_kv_cache(tmp_path):
    """qwen3 through hf_layout both ways (q_norm/k_norm included), and its KV cache path."""
    from model import KVCache
    torch.manual_seed(0)
    m = Transformer(tiny_config("qwen3", head_dim=16, tie=False)).eval()
    save_pretrained(m, tmp_path)
    saved = json.load(open(tmp_path / "config.json"))
    assert saved["model_type"] == "qwen3" and saved["head_dim"] == 16
    from safetensors import safe_open
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert "model.layers.1.self_attn.k_norm.weight" in f.keys()
    m2 = from_pretrained(str(tmp_path))
    assert torch.equal(m(IDX), m2(IDX))
    cache = KVCache()
    steps = torch.cat([m(IDX[:, i:i + 1], cache=cache) for i in range(IDX.size(1))], 1)
    torch.testing.assert_close(steps, m(IDX), atol=1e-5, rtol=0)


# --- every field that would change the computation is an error naming it ---

LLAMA3_V5 = V5["llama-gqa-llama3"]
REJECTED = [
    # rope types we do not implement, in either spelling
    *[(V4["qwen2"], dict(rope_scaling={"rope_type": t, "factor": 4.0}), f"rope type '{t}'")
      for t in ("yarn", "dynamic", "linear", "longrope")],
    (V4["qwen2"], dict(rope_scaling={"type": "yarn", "factor": 4.0}), "rope type 'yarn'"),
    (V4["qwen2"], dict(rope_scaling="yarn"), "not null or a dict"),
    (LLAMA3_V5, dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                                      "original_max_position_embeddings": 64}), "rope type 'yarn'"),
    (LLAMA3_V5, dict(rope_parameters={k: v for k, v in LLAMA3_V5["rope_parameters"].items()
                                      if k != "low_freq_factor"}), "lacks 'low_freq_factor'"),
    (LLAMA3_V5, dict(rope_parameters={**LLAMA3_V5["rope_parameters"], "attention_factor": 1.5}),
     "setting 'attention_factor'"),
    (V5["qwen3"], dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                        "partial_rotary_factor": 0.5}), "partial_rotary_factor"),
    (V4["qwen3"], dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
    # both spellings present but different
    (V4["llama-tied-bias"], dict(rope_parameters={"rope_type": "default", "rope_theta": 5e5}),
     "describe different RoPE"),
    # sliding windows, soft-capping, activations
    (V4["qwen2"], dict(use_sliding_window=True, sliding_window=4), "use_sliding_window"),
    (V5["qwen3"], dict(layer_types=["full_attention", "sliding_attention"]), "layer_types"),
    (V4["llama-tied-bias"], dict(sliding_window=4), "unknown field 'sliding_window'"),
    (V4["llama-tied-bias"], dict(final_logit_softcapping=30.0), "final_logit_softcapping"),
    (V5["qwen3"], dict(attn_logit_softcapping=50.0), "attn_logit_softcapping"),
    (V4["llama-tied-bias"], dict(hidden_act="gelu"), "hidden_act = 'gelu'"),
    (V5["gpt2"], dict(activation_function="relu"), "activation_function = 'relu'"),
    (V5["gpt2"], dict(scale_attn_weights=False), "scale_attn_weights"),
    (V5["gpt2"], dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
    (V5["gpt2"], dict(add_cross_attention=True), "add_cross_attention"),
    (V4["llama-gqa-llama3"], dict(pretraining_tp=2), "pretraining_tp = 2"),
    (V4["qwen2"], dict(mlp_bias=True), "mlp_bias"),
    (V4["qwen2"], dict(quantization_config={"quant_method": "gptq"}), "quantization_config"),
    (V4["qwen3"], dict(rope_interleaved=True), "rope_interleaved"),
    # a field nobody taught the loader
    (V5["llama-tied-bias"], dict(residual_multiplier=0.22), "unknown field 'residual_multiplier'"),
    (V5["gpt2"], dict(rope_theta=1e4), "unknown field 'rope_theta'"),
]


@pytest.mark.parametrize("d,changes,message", REJECTED, ids=[r[2] for r in REJECTED])
def test_fields_that_change_the_computation_are_errors(tmp_path, d, changes, message):
    d = {**d, **changes}
    path = write_checkpoint(tmp_path, d, {})
    with pytest.raises(CheckpointError, match=message):
        from_pretrained(path)


def test_saved_dtype_is_the_weights_dtype_in_both_spellings(tmp_path):
    """transformers 5 reads "dtype" before "torch_dtype": a bf16 config saved in fp32 must say so
    in both, or transformers 5 would load the fp32 save as bf16."""
    d = {**V5["qwen3"], "dtype": "bfloat16"}
    save_pretrained(from_pretrained(write_checkpoint(tmp_path / "in", d, hf_tensors(d))), tmp_path / "out")
    written = json.load(open(tmp_path / "out" / "config.json"))
    assert written["dtype"] == written["torch_dtype"] == "float32"


def test_harmless_fields_are_accepted():
    """Dropout (off at eval), token ids, dtype and bookkeeping do not change the logits."""
    d = {**V5["qwen3"], "attention_dropout": 0.1, "eos_token_id": [1, 2], "dtype": "bfloat16",
         "_name_or_path": "x", "output_hidden_states": False}
    assert config_from_hf(d).summary() == config_from_hf(V5["qwen3"]).summary()


# -----------------------------------------------------------------------------
# With transformers: the same checkpoints against stock transformers, both directions

def hf_logits(path, **kw):
    """Stock transformers' model and logits; a tensor it would have to invent (it initialises
    missing ones quietly) or leave unused fails the test."""
    transformers = pytest.importorskip("transformers")
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kw)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    hf.eval()
    with torch.no_grad():
        return hf, hf(IDX).logits[0]


@pytest.mark.parametrize("name,gen,d", CASES, ids=IDS)
def test_against_transformers_both_ways(tmp_path, name, gen, d):
    pytest.importorskip("transformers")
    literal = write_checkpoint(tmp_path / "literal", d, hf_tensors(d))
    hf, theirs = hf_logits(literal, dtype=torch.float32)   # published configs say bfloat16
    ours_model = from_pretrained(literal)
    with torch.no_grad():
        ours = ours_model(IDX)[0]
    diffs = {"same files": max_diff(ours, theirs)}
    # HF -> ours: what the installed transformers writes (its own spelling), read by us
    hf.save_pretrained(tmp_path / "by_hf")
    with torch.no_grad():
        diffs["saved by HF -> ours"] = max_diff(from_pretrained(str(tmp_path / "by_hf"))(IDX)[0], theirs)
    # ours -> HF: what we write, read by transformers with its defaults (dtype "auto": our fp32
    # save must say float32); and each rope spelling alone, as a reader of only that spelling
    # (transformers 4: rope_theta/rope_scaling) would see it
    save_pretrained(ours_model, tmp_path / "by_us")
    diffs["saved by us -> HF"] = max_diff(hf_logits(str(tmp_path / "by_us"))[1], ours)
    written = json.load(open(tmp_path / "by_us" / "config.json"))
    if name != "gpt2":
        for drop in (("rope_parameters",), ("rope_theta", "rope_scaling")):
            alone = {k: v for k, v in written.items() if k not in drop}
            (tmp_path / "by_us" / "config.json").write_text(json.dumps(alone))
            diffs[f"ours without {'/'.join(drop)} -> HF"] = max_diff(hf_logits(str(tmp_path / "by_us"))[1], ours)
    print(f"\n{name} ({gen}): " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    assert max(diffs.values()) < 1e-4, diffs


@pytest.mark.parametrize("kw", [dict(model_type="qwen3", head_dim=16, tie=False),
                                dict(model_type="llama", rope_theta=5e5, rope_scaling={
                                    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 512}),
                                dict(model_type="qwen2"), dict(model_type="gpt2")],
                         ids=["qwen3", "llama3-rope", "qwen2", "gpt2"])
def test_transformers_loads_a_model_we_built(tmp_path, kw):
    """A model made here (no original config.json to copy fields from), with <MTP> added."""
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    m = Transformer(tiny_config(**kw)).eval()
    m.add_mtp_token()
    save_pretrained(m, tmp_path)
    with torch.no_grad():
        diff = max_diff(hf_logits(str(tmp_path))[1], m(IDX)[0])
    print(f"\nbuilt here, {kw['model_type']}: ours -> HF max|diff| {diff:.2e}")
    assert diff < 1e-4


# -----------------------------------------------------------------------------
# distill.py and decode.py end to end on a tiny qwen3

def test_distill_and_decode_a_qwen3_checkpoint(tmp_path, capsys):
    import decode
    from synthetic.tokenizer import synthetic_tokenizer
    from distill import parse_args, train
    init = tmp_path / "init"
    tok = synthetic_tokenizer()
    torch.manual_seed(0)
    save_pretrained(Transformer(tiny_config("qwen3", vocab=tok.n_vocab, head_dim=16, max_seq_len=256)), init)
    tok.save(init)
    student = train(parse_args(["--init", str(init), "--out", str(tmp_path / "run"), "--k", "3",
                                "--steps", "3", "--seq-len", "64", "--micro-batch", "2",
                                "--step-tokens", "128", "--threads", "1"]))
    assert student.cfg.model_type == "qwen3" and student.cfg.mtp_token_id == tok.n_vocab
    ckpt = tmp_path / "run" / "ckpt"
    m = from_pretrained(str(ckpt))
    assert m.cfg.model_type == "qwen3" and m.blocks[0].attn.q_norm is not None
    assert not torch.equal(m.blocks[0].attn.q_norm.weight,               # q_norm is trained too
                           from_pretrained(str(init)).blocks[0].attn.q_norm.weight)
    decode.main(["--ckpt", str(ckpt), "--prompt", "Ava has 3 apples. She buys 4 more. How many?",
                 "--max-new", "12", "--tau", "0.5"])
    out = capsys.readouterr().out
    assert "[ConfAdapt tau=0.5]" in out and "[static k=1]" in out
