"""
Hugging Face checkpoints in and out: config.json <-> model.Config, safetensors <-> our tensors.

    from compat.hf import from_pretrained, save_pretrained
    model = from_pretrained("path/to/hf_dir")          # config.json + *.safetensors, or a hub name
    save_pretrained(model, "out_dir")                  # still an ordinary HF checkpoint

`hf_layout` is the explicit map between our parameter names and the checkpoint's, used for both
loading and saving. Loading is strict: every expected tensor present, each one's shape checked
against the config (fused ones part by part), every unknown key an error that names it. The
field tables of config.json are in compat/hf_config.py, hub downloads in compat/hub.py.
"""
import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from compat.hf_config import check_fields, read_rope
from compat.hub import resolve_checkpoint
from model import CheckpointError, Config, Transformer, rope_inv_freq

ARCHS = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
         "qwen3": "Qwen3ForCausalLM"}

# -----------------------------------------------------------------------------
# config.json <-> Config


def config_from_hf(d):
    """A Config from a config.json dict (every field checked by compat/hf_config.py first)."""
    mt = d.get("model_type")
    if mt not in ARCHS:
        raise CheckpointError(f"unknown model_type {mt!r} in config.json "
                              f"(supported: {', '.join(ARCHS)})")
    check_fields(d, mt)             # every field read, fixed at our value, or harmless
    ours = dict(model_type=mt, vocab_size=d["vocab_size"], mtp_token_id=d.get("mtp_token_id"),
                mtp_k_max=d.get("mtp_k_max"), hf=d)
    if mt == "gpt2":
        n_embd = d["n_embd"]
        return Config(**ours, n_layer=d["n_layer"], n_head=d["n_head"], n_kv_head=d["n_head"],
                      d_model=n_embd, head_dim=n_embd // d["n_head"],
                      d_ff=d.get("n_inner") or 4 * n_embd, max_seq_len=d["n_positions"],
                      norm_eps=d.get("layer_norm_epsilon", 1e-5),
                      tie_embeddings=d.get("tie_word_embeddings", True), qkv_bias=True,
                      o_bias=True, mlp_bias=True)
    n_head = d["num_attention_heads"]
    theta, scaling = read_rope(d)
    # llama and qwen3: attention_bias puts a bias on q, k, v and o; qwen2: on q, k, v only
    bias = d.get("attention_bias", False)
    return Config(**ours, n_layer=d["num_hidden_layers"], n_head=n_head,
                  n_kv_head=d.get("num_key_value_heads") or n_head, d_model=d["hidden_size"],
                  head_dim=d.get("head_dim") or d["hidden_size"] // n_head,
                  d_ff=d["intermediate_size"], max_seq_len=d.get("max_position_embeddings", 2048),
                  norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
                  tie_embeddings=d.get("tie_word_embeddings", False),
                  qkv_bias=True if mt == "qwen2" else bias, o_bias=False if mt == "qwen2" else bias,
                  mlp_bias=d.get("mlp_bias", False) if mt == "llama" else False)


def config_to_hf(cfg):
    """The config.json dict: the original fields kept, ours updated."""
    d = dict(cfg.hf)
    if cfg.model_type == "gpt2":
        d.update(model_type="gpt2", n_embd=cfg.d_model, n_layer=cfg.n_layer,
                 n_head=cfg.n_head, n_positions=cfg.max_seq_len, n_inner=cfg.d_ff,
                 layer_norm_epsilon=cfg.norm_eps, activation_function="gelu_new")
    else:
        # RoPE in both spellings, from the same values: transformers 4 reads only rope_theta
        # and rope_scaling, transformers 5 reads rope_scaling if set, else rope_parameters
        rope = cfg.rope_scaling or {"rope_type": "default"}
        d.update(model_type=cfg.model_type, hidden_size=cfg.d_model,
                 num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                 num_key_value_heads=cfg.n_kv_head, head_dim=cfg.head_dim,
                 intermediate_size=cfg.d_ff, max_position_embeddings=cfg.max_seq_len,
                 rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
                 rope_scaling=cfg.rope_scaling,
                 rope_parameters={**rope, "rope_theta": cfg.rope_theta}, hidden_act="silu")
        if cfg.model_type == "llama":
            d.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
        if cfg.model_type == "qwen3":
            d.update(attention_bias=cfg.qkv_bias)
    d.update(architectures=[ARCHS[cfg.model_type]], vocab_size=cfg.vocab_size,
             tie_word_embeddings=cfg.tie_embeddings)
    for name in ("mtp_token_id", "mtp_k_max"):
        if getattr(cfg, name) is not None:
            d[name] = getattr(cfg, name)
    return d


def read_config(path):
    """The Config of the checkpoint directory `path`."""
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise CheckpointError(f"no config.json in {path}: a checkpoint directory needs "
                              "config.json and model.safetensors (or a sharded index)")
    try:
        with open(cfg_file, encoding="utf-8") as f:
            d = json.load(f)
        if not isinstance(d, dict):
            raise CheckpointError(f"{cfg_file} is not a JSON object of config fields")
        return config_from_hf(d)
    except CheckpointError:
        raise
    except KeyError as e:
        raise CheckpointError(f"{cfg_file} has no {e.args[0]!r} field: restore the checkpoint's "
                              "own config.json") from None
    except ValueError as e:                 # not JSON, not UTF-8
        raise CheckpointError(f"{cfg_file} is not a usable config ({e}): restore the checkpoint's "
                              "own config.json") from None


# -----------------------------------------------------------------------------
# The explicit name map between our parameters and the HF checkpoint's tensors


def hf_layout(cfg):
    """{our name: ([HF names, concatenated along dim 0 in this order], transpose?)}.

    GPT-2 stores Conv1D weights as (in, out): transposed on load and on save. Llama's separate
    q/k/v and gate/up projections are fused here into one matrix each.
    """
    L = {}
    if cfg.model_type == "gpt2":
        L["embed.weight"] = (["transformer.wte.weight"], False)
        L["pos_embed.weight"] = (["transformer.wpe.weight"], False)
        for i in range(cfg.n_layer):
            h, b = f"transformer.h.{i}", f"blocks.{i}"
            for ours, theirs in [("norm1", "ln_1"), ("norm2", "ln_2")]:
                L[f"{b}.{ours}.weight"] = ([f"{h}.{theirs}.weight"], False)
                L[f"{b}.{ours}.bias"] = ([f"{h}.{theirs}.bias"], False)
            for ours, theirs in [("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                                 ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")]:
                L[f"{b}.{ours}.weight"] = ([f"{h}.{theirs}.weight"], True)
                L[f"{b}.{ours}.bias"] = ([f"{h}.{theirs}.bias"], False)
        L["norm.weight"] = (["transformer.ln_f.weight"], False)
        L["norm.bias"] = (["transformer.ln_f.bias"], False)
    else:
        L["embed.weight"] = (["model.embed_tokens.weight"], False)
        for i in range(cfg.n_layer):
            h, b = f"model.layers.{i}", f"blocks.{i}"
            L[f"{b}.norm1.weight"] = ([f"{h}.input_layernorm.weight"], False)
            L[f"{b}.norm2.weight"] = ([f"{h}.post_attention_layernorm.weight"], False)
            qkv = [f"{h}.self_attn.{p}_proj" for p in "qkv"]
            L[f"{b}.attn.qkv.weight"] = ([n + ".weight" for n in qkv], False)
            if cfg.qkv_bias:
                L[f"{b}.attn.qkv.bias"] = ([n + ".bias" for n in qkv], False)
            L[f"{b}.attn.proj.weight"] = ([f"{h}.self_attn.o_proj.weight"], False)
            if cfg.qk_norm:
                L[f"{b}.attn.q_norm.weight"] = ([f"{h}.self_attn.q_norm.weight"], False)
                L[f"{b}.attn.k_norm.weight"] = ([f"{h}.self_attn.k_norm.weight"], False)
            if cfg.o_bias:
                L[f"{b}.attn.proj.bias"] = ([f"{h}.self_attn.o_proj.bias"], False)
            fc = [f"{h}.mlp.gate_proj", f"{h}.mlp.up_proj"]
            L[f"{b}.mlp.fc.weight"] = ([n + ".weight" for n in fc], False)
            L[f"{b}.mlp.proj.weight"] = ([f"{h}.mlp.down_proj.weight"], False)
            if cfg.mlp_bias:
                L[f"{b}.mlp.fc.bias"] = ([n + ".bias" for n in fc], False)
                L[f"{b}.mlp.proj.bias"] = ([f"{h}.mlp.down_proj.bias"], False)
        L["norm.weight"] = (["model.norm.weight"], False)
    if not cfg.tie_embeddings:
        L["lm_head.weight"] = (["lm_head.weight"], False)
    return L


def hf_split_sizes(cfg, ours):
    """Row counts of the HF tensors fused into our tensor `ours` (None if not fused)."""
    if ours.endswith("attn.qkv.weight") or ours.endswith("attn.qkv.bias"):
        if cfg.model_type != "gpt2":
            return [cfg.n_head * cfg.head_dim] + 2 * [cfg.n_kv_head * cfg.head_dim]
    if ours.endswith("mlp.fc.weight") or ours.endswith("mlp.fc.bias"):
        if cfg.model_type != "gpt2":
            return [cfg.d_ff, cfg.d_ff]
    return None


def read_safetensors(path):
    """All tensors of model.safetensors, or of every shard listed in model.safetensors.index.json."""
    single, index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            files = [os.path.join(path, s) for s in shards]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index} is not a usable shard index ({e!r}): restore the "
                                  "checkpoint's own") from None
    else:
        raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {path}")
    tensors = {}
    for fn in files:
        if not os.path.isfile(fn):
            raise CheckpointError(f"shard {fn} listed in the index is missing")
        try:
            with safe_open(fn, framework="pt") as f:
                for k in f.keys():
                    tensors[k] = f.get_tensor(k)
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise CheckpointError(f"cannot read {fn}: {e}") from None
    if any(k.startswith("h.") or k in ("wte.weight", "wpe.weight") for k in tensors):
        tensors = {"transformer." + k if not k.startswith("lm_head") else k: v
                   for k, v in tensors.items()}     # the canonical gpt2 file has no prefix
    return tensors


# -----------------------------------------------------------------------------
# Loading and saving a whole checkpoint


def take_tensors(path, cfg, hf, expected):
    """Our state dict from the checkpoint's tensors `hf` (popped from it as they are used), each
    HF tensor's shape checked against what the config implies, a fused one part by part."""
    state = {}
    for ours, (names, transpose) in hf_layout(cfg).items():
        missing = [n for n in names if n not in hf]
        if missing:
            raise CheckpointError(f"{path}: tensor {missing[0]!r} is missing from the checkpoint")
        parts = [hf.pop(n) for n in names]
        parts = [p.t() if transpose else p for p in parts]
        shape = tuple(expected[ours])
        sizes = hf_split_sizes(cfg, ours) or [shape[0]]
        for n, p, rows in zip(names, parts, sizes):
            want = (rows,) + shape[1:]
            if tuple(p.shape) != want:
                got = tuple(p.shape)[::-1] if transpose else tuple(p.shape)
                raise CheckpointError(f"{path}: {n} has shape {got}, the config implies "
                                      f"{want[::-1] if transpose else want}")
        state[ours] = torch.cat(parts, 0) if len(parts) > 1 else parts[0]
    return state


def from_pretrained(path, dtype=torch.float32, device="cpu"):
    """A Transformer from a local HF directory, or from a hub name (e.g. "gpt2") downloaded to
    $MTP_CACHE first (compat/hub.py)."""
    if not os.path.isdir(path):                     # a hub name such as "gpt2"
        path = resolve_checkpoint(path)
    cfg = read_config(path)
    with torch.device("meta"):
        model = Transformer(cfg)
    hf = read_safetensors(path)
    state = take_tensors(path, cfg, hf, {n: p.shape for n, p in model.named_parameters()})
    if cfg.tie_embeddings and "lm_head.weight" in hf:   # some tied checkpoints store it too
        if not torch.equal(hf.pop("lm_head.weight"), state["embed.weight"]):
            raise CheckpointError(f"{path}: config says tie_word_embeddings but lm_head.weight "
                                  "differs from the input embedding")
    for name in list(hf):                               # known non-parameter buffers
        if name.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")):
            hf.pop(name)
    if hf:
        raise CheckpointError(f"{path}: unexpected tensor {sorted(hf)[0]!r} "
                              f"({len(hf)} unknown keys); not a {cfg.model_type} checkpoint "
                              "of this configuration?")
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight   # assign=True replaced both: tie again
    if cfg.model_type != "gpt2":
        model.inv_freq = rope_inv_freq(cfg)
    return model.to(device=device, dtype=dtype)


def save_pretrained(model, out_dir, extra_files=None):
    """Write config.json + model.safetensors (each atomically); extra_files: {name: text}."""
    os.makedirs(out_dir, exist_ok=True)
    own = {n: p.detach() for n, p in model.named_parameters()}  # tied lm_head appears once
    tensors = {}
    for ours, (names, transpose) in hf_layout(model.cfg).items():
        w = own[ours]
        sizes = hf_split_sizes(model.cfg, ours)
        parts = w.split(sizes, 0) if sizes else [w]
        for n, p in zip(names, parts):
            tensors[n] = (p.t() if transpose else p).contiguous().cpu()
    tmp = os.path.join(out_dir, "model.safetensors.tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.chmod(tmp, 0o644)          # safetensors creates it owner-only; others may read a checkpoint
    os.replace(tmp, os.path.join(out_dir, "model.safetensors"))
    cfg = config_to_hf(model.cfg)
    # transformers 5 reads "dtype" before "torch_dtype" (4 reads only the latter): write both,
    # or a stale "dtype" kept from the original config would load an fp32 save as bf16
    cfg["torch_dtype"] = cfg["dtype"] = str(model.embed.weight.dtype).removeprefix("torch.")
    files = {"config.json": json.dumps(cfg, indent=2) + "\n", **(extra_files or {})}
    for name, text in files.items():
        atomic_write(os.path.join(out_dir, name), text)


def atomic_write(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
