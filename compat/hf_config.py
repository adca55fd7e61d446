"""
config.json compatibility: which fields of a Hugging Face config this code reads, which it
accepts only at the value it computes, which it knows not to change the logits, and RoPE in
both generations' spellings. compat/hf.py (config_from_hf) calls check_fields and read_rope.

A field we do not understand may change the computation: it is an error that names it, never
silently ignored (transformers 5's `rope_parameters` once loaded silently wrong elsewhere).
"""
from model import CheckpointError

# Every field of a config.json is either read by config_from_hf (READ), allowed only at the value
# this code computes (FIXED), or known not to change the logits (HARMLESS). Any other field is an
# error: a field we do not understand may change the computation, and ignoring it would load the
# checkpoint silently wrong (as transformers 5's `rope_parameters` once did).
HARMLESS = {
    # bookkeeping
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "_name_or_path",
    "transformers.js_config", "is_llama_config",
    # token ids (the tokenizer's business) and what the HF library returns, not what it computes
    "bos_token_id", "eos_token_id", "pad_token_id", "use_cache", "output_attentions",
    "output_hidden_states", "return_dict", "id2label", "label2id", "problem_type",
    "chunk_size_feed_forward",          # runs the MLP in chunks: the same function
    # training only: weight init, dropout (this code never applies dropout), memory saving
    "initializer_range", "attention_dropout", "gradient_checkpointing",
}
HARMLESS_GPT2 = {
    "n_ctx",                            # an old alias of n_positions that transformers ignores
    "attn_pdrop", "embd_pdrop", "resid_pdrop", "output_past", "n_special", "predict_special_tokens",
    "task_specific_params",             # generation defaults for pipelines
    # the classification head of GPT2DoubleHeadsModel, not part of the LM
    "summary_activation", "summary_first_dropout", "summary_proj_to_labels", "summary_type",
    "summary_use_proj",
    "reorder_and_upcast_attn",          # precision only: the attention product in fp32
}
LLAMA_FAMILY_READ = {"vocab_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "hidden_size", "head_dim", "intermediate_size",
                     "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
                     "rope_theta", "rope_scaling", "rope_parameters"}
# use_sliding_window is FIXED to off, which makes sliding_window and max_window_layers inert
QWEN_READ = LLAMA_FAMILY_READ | {"sliding_window", "max_window_layers"}
READ = {
    "gpt2": {"vocab_size", "n_layer", "n_head", "n_embd", "n_inner", "n_positions",
             "layer_norm_epsilon", "tie_word_embeddings"},
    "llama": LLAMA_FAMILY_READ | {"attention_bias", "mlp_bias"},
    "qwen2": QWEN_READ,                 # q/k/v biases always, o_proj and MLP never
    "qwen3": QWEN_READ | {"attention_bias"},
}
OURS = {"mtp_token_id", "mtp_k_max"}   # the <MTP> token (add_mtp_token) and distill.py's --k


def full_attention_only(layer_types):
    return layer_types is None or all(t == "full_attention" for t in layer_types)


# {field: (accepts(value), what is supported)}: fields whose other values change the computation
FIXED_ANY = {
    "final_logit_softcapping": (lambda v: v is None, "none (no logit soft-capping)"),
    "attn_logit_softcapping": (lambda v: v is None, "none (no attention soft-capping)"),
    "partial_rotary_factor": (lambda v: v in (None, 1, 1.0), "1.0 (RoPE on the whole head)"),
    "is_encoder_decoder": (lambda v: not v, "false (decoder-only models)"),
    "add_cross_attention": (lambda v: not v, "false (no cross-attention)"),
    "pruned_heads": (lambda v: not v, "none (no pruned heads)"),
    "quantization_config": (lambda v: False, "none: unquantized safetensors weights only"),
}
FIXED_LLAMA_FAMILY = {
    "hidden_act": (lambda v: v == "silu", "silu (SwiGLU)"),
    "pretraining_tp": (lambda v: v in (None, 1), "1 (no tensor-parallel slicing of the matmuls)"),
    "rope_interleaved": (lambda v: not v, "false (HF's rotate-half RoPE)"),
}
FIXED_QWEN = {
    "use_sliding_window": (lambda v: not v, "false (full attention in every layer)"),
    "layer_types": (full_attention_only, "every layer 'full_attention'"),
    # our own configs before qwen3 wrote mlp_bias: false for qwen2; transformers' Qwen2 has no
    # MLP bias whatever the field says, so only false is the same model
    "mlp_bias": (lambda v: not v, "false (Qwen's MLP has no bias)"),
}
FIXED = {
    "gpt2": {**FIXED_ANY,
             "activation_function": (lambda v: v in ("gelu_new", "gelu_pytorch_tanh"),
                                     "gelu_new (GELU, tanh approximation)"),
             "scale_attn_weights": (lambda v: v is True, "true (scores divided by sqrt(head_dim))"),
             "scale_attn_by_inverse_layer_idx": (lambda v: not v, "false")},
    "llama": {**FIXED_ANY, **FIXED_LLAMA_FAMILY},
    "qwen2": {**FIXED_ANY, **FIXED_LLAMA_FAMILY, **FIXED_QWEN},
    "qwen3": {**FIXED_ANY, **FIXED_LLAMA_FAMILY, **FIXED_QWEN},
}


# The type of each field that holds a size, a number or a switch: a string where a number belongs
# would fail far from here, and "false" for a switch would read as true.
SIZES = {"vocab_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
         "hidden_size", "head_dim", "intermediate_size", "max_position_embeddings", "n_layer",
         "n_head", "n_embd", "n_inner", "n_positions", "mtp_k_max"}
OPTIONAL = {"num_key_value_heads", "head_dim", "n_inner"}          # null: computed from the rest
NUMBERS = {"rms_norm_eps", "layer_norm_epsilon", "rope_theta"}
SWITCHES = {"tie_word_embeddings", "attention_bias", "mlp_bias"}


def check_types(d):
    for name, value in d.items():
        whole = isinstance(value, int) and not isinstance(value, bool)
        if name in SIZES and not (value is None and name in OPTIONAL):
            ok, want = whole and value >= 1, "a whole number >= 1"
        elif name == "mtp_token_id":
            ok, want = whole and value >= 0, "a token id (a whole number >= 0)"
        elif name in NUMBERS:
            ok, want = isinstance(value, (int, float)) and not isinstance(value, bool) and \
                0 < value < float("inf"), "a finite number > 0"
        elif name in SWITCHES:
            ok, want = isinstance(value, bool), "true or false"
        else:
            continue
        if not ok:
            raise CheckpointError(f"config.json: {name} = {value!r} is not {want}: correct the field")
    mtp, vocab = d.get("mtp_token_id"), d.get("vocab_size")
    if mtp is not None and vocab is not None and mtp >= vocab:   # <MTP> is a row of the vocabulary
        raise CheckpointError(f"config.json: mtp_token_id = {mtp} is beyond the vocabulary "
                              f"(vocab_size {vocab}): correct it to the <MTP> row's id (a checkpoint "
                              f"distill.py saved has it last, {vocab - 1})")


def check_fields(d, mt):
    """Raise CheckpointError for a config.json field that would change the computation, or that
    does not have its type."""
    check_types(d)
    for name, value in d.items():
        if name in FIXED[mt]:
            accepts, supported = FIXED[mt][name]
            if not accepts(value):
                raise CheckpointError(f"config.json: {name} = {value!r} is not supported "
                                      f"(supported: {supported})")
        elif name not in READ[mt] | OURS | HARMLESS | (HARMLESS_GPT2 if mt == "gpt2" else set()):
            raise CheckpointError(
                f"config.json: unknown field {name!r} for model_type {mt!r}; it may change the "
                "computation, so it is not ignored. If it does not, delete it from config.json")


LLAMA3_ROPE = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def rope_spec(params, theta):
    """(rope_type, rope_theta, the other settings) of one spelling of the rope config."""
    if not isinstance(params, (dict, type(None))):
        raise CheckpointError(f"config.json: a rope setting is {params!r}, not null or a dict")
    p = dict(params or {})
    legacy = p.pop("type", None)                       # the spelling before transformers 4.43
    rope_type = p.pop("rope_type", legacy or "default")
    if legacy not in (None, rope_type):
        raise CheckpointError(f"config.json: rope 'type' and 'rope_type' disagree in {params}")
    return rope_type, float(p.pop("rope_theta", theta)), p


def read_rope(d):
    """(rope_theta, None or the llama3 scaling dict) from either spelling of the rope config.

    transformers 4 writes `rope_theta` and `rope_scaling` (null or {"rope_type": ..., ...});
    transformers 5 writes one `rope_parameters` dict that holds rope_theta and rope_type too.
    A file may hold both (ours do, so that both generations read it): then they must agree.
    """
    spellings = {}
    if d.get("rope_scaling") is not None or "rope_theta" in d:
        spellings["rope_theta/rope_scaling"] = rope_spec(d.get("rope_scaling"),
                                                         d.get("rope_theta", 10000.0))
    if d.get("rope_parameters") is not None:
        spellings["rope_parameters"] = rope_spec(d["rope_parameters"], d.get("rope_theta", 10000.0))
    if len(spellings) == 2 and spellings["rope_theta/rope_scaling"] != spellings["rope_parameters"]:
        raise CheckpointError(f"config.json: rope_theta/rope_scaling and rope_parameters describe "
                              f"different RoPE ({spellings}); keep the one the model was trained with")
    where, (rope_type, theta, p) = next(iter(spellings.items()), ("", ("default", 10000.0, {})))
    if p.get("partial_rotary_factor", 1.0) != 1.0:
        raise CheckpointError(f"config.json: {where} partial_rotary_factor = "
                              f"{p['partial_rotary_factor']} is not supported (supported: 1.0)")
    p.pop("partial_rotary_factor", None)
    if rope_type not in ("default", "llama3"):
        raise CheckpointError(f"config.json: {where} rope type {rope_type!r} is not supported "
                              "(supported: default and llama3)")
    known = LLAMA3_ROPE if rope_type == "llama3" else ()
    for name in p:
        if name not in known:
            raise CheckpointError(f"config.json: {where} setting {name!r} is not understood for "
                                  f"rope type {rope_type!r} (understood: {', '.join(known) or 'none'})")
    missing = [name for name in known if name not in p]
    if missing:
        raise CheckpointError(f"config.json: {where} of rope type llama3 lacks {missing[0]!r}")
    return theta, ({"rope_type": "llama3", **{k: p[k] for k in LLAMA3_ROPE}} if known else None)
