"""model.py: checkpoint round trips, strict loading, the KV cache, the <MTP> token."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_model
from model import CheckpointError, KVCache, rope_inv_freq
from compat.hf import from_pretrained, save_pretrained

ARCHS = [("gpt2", True, False), ("gpt2", False, False), ("llama", True, True),
         ("llama", False, True), ("llama", True, False), ("qwen2", True, True)]


@pytest.mark.parametrize("model_type,tie,gqa", ARCHS)
def test_save_load_round_trip_is_bit_exact(tmp_path, model_type, tie, gqa):
    m = tiny_model(model_type=model_type, tie=tie, gqa=gqa)
    save_pretrained(m, tmp_path)
    m2 = from_pretrained(str(tmp_path))
    a, b = m.state_dict(), m2.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert (m2.lm_head.weight is m2.embed.weight) == tie
    idx = torch.randint(0, 61, (2, 17))
    assert torch.equal(m(idx), m2(idx))


@pytest.mark.parametrize("model_type,tie,gqa", ARCHS)
def test_kv_cache_matches_full_forward(model_type, tie, gqa):
    m = tiny_model(model_type=model_type, tie=tie, gqa=gqa)
    idx = torch.randint(0, 61, (2, 30))
    full = m(idx)
    cache = KVCache()
    steps = torch.cat([m(idx[:, t:t + 1], cache=cache) for t in range(30)], 1)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=0)
    # chunks, with a truncate in between: feed 0..11, 12..19, drop back to 15, then 15..29
    cache = KVCache()
    a = m(idx[:, :12], cache=cache)
    b = m(idx[:, 12:20], cache=cache)
    cache.truncate(15)
    assert len(cache) == 15
    c = m(idx[:, 15:], cache=cache)
    torch.testing.assert_close(torch.cat([a, b[:, :3], c], 1), full, atol=1e-5, rtol=0)
    assert len(cache) == 30


def test_cache_grows_past_its_first_capacity():
    m = tiny_model(max_seq_len=600)
    idx = torch.randint(0, 61, (1, 520))
    cache = KVCache()
    out = torch.cat([m(idx[:, i:i + 130], cache=cache) for i in range(0, 520, 130)], 1)
    torch.testing.assert_close(out, m(idx), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="truncate"):
        cache.truncate(521)


def test_explicit_positions_and_mask_equal_the_default():
    m = tiny_model()
    idx = torch.randint(0, 61, (2, 9))
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    torch.testing.assert_close(m(idx, pos=torch.arange(9), mask=causal), m(idx), atol=1e-6, rtol=0)
    # out_idx computes the same logits at just the chosen positions
    sel = torch.tensor([[0, 4, 8], [1, 2, 3]])
    torch.testing.assert_close(m(idx, out_idx=sel), m(idx).gather(1, sel[..., None].expand(-1, -1, 61)))


@pytest.mark.parametrize("tie", [True, False])
def test_add_mtp_token(tmp_path, tie):
    m = tiny_model(tie=tie)
    old = m.embed.weight.detach().clone()
    mtp = m.add_mtp_token()
    assert mtp == 61 and m.cfg.vocab_size == 62 and m.cfg.mtp_token_id == 61
    assert torch.equal(m.embed.weight[:61], old)
    assert (m.lm_head.weight is m.embed.weight) == tie
    assert m(torch.tensor([[1, mtp]])).shape == (1, 2, 62)
    # the new row follows the existing rows' statistics, not zeros
    row = m.embed.weight[mtp]
    assert 0.5 < row.std() / old.std() < 2.0
    save_pretrained(m, tmp_path)
    assert json.load(open(tmp_path / "config.json"))["mtp_token_id"] == 61
    m2 = from_pretrained(str(tmp_path))
    assert m2.cfg.mtp_token_id == 61 and m2.cfg.vocab_size == 62
    with pytest.raises(CheckpointError, match="already has an <MTP> token"):
        m2.add_mtp_token()


def test_bf16_forward_runs():
    m = tiny_model().to(torch.bfloat16)
    out = m(torch.randint(0, 61, (1, 5)))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    # the RoPE frequencies stay the fp32 ones through every dtype move (a forward that rebuilt
    # them on the CPU broke CUDA-graph capture of bf16 decoding on the GPU)
    ref = rope_inv_freq(m.cfg)
    for moved in (m, m.float().to(torch.bfloat16), m.half()):
        assert moved.inv_freq.dtype == torch.float32 and torch.equal(moved.inv_freq, ref)


def test_hf_transformers_loads_our_checkpoint(tmp_path):
    transformers = pytest.importorskip("transformers")
    for model_type in ("gpt2", "llama"):
        m = tiny_model(model_type=model_type, tie=False)
        m.add_mtp_token()
        save_pretrained(m, tmp_path / model_type)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / model_type)
        idx = torch.randint(0, 62, (1, 12))
        torch.testing.assert_close(hf(idx).logits, m(idx), atol=1e-5, rtol=0)


# --- loader errors: each names the problem ---

def test_loader_errors(tmp_path):
    m = tiny_model()
    good = tmp_path / "good"
    save_pretrained(m, good)
    with pytest.raises(CheckpointError, match="no config.json"):
        from_pretrained(str(tmp_path))
    with pytest.raises(CheckpointError, match="neither a checkpoint directory nor a hub name"):
        from_pretrained(str(tmp_path / "nope"))

    def variant(name, edit_cfg=None, edit_tensors=None):
        d = tmp_path / name
        d.mkdir()
        cfg = json.load(open(good / "config.json"))
        tensors = load_file(good / "model.safetensors")
        if edit_cfg:
            edit_cfg(cfg)
        if edit_tensors:
            edit_tensors(tensors)
        json.dump(cfg, open(d / "config.json", "w"))
        save_file(tensors, d / "model.safetensors")
        return str(d)

    with pytest.raises(CheckpointError, match="unknown model_type 'mamba'"):
        from_pretrained(variant("arch", lambda c: c.update(model_type="mamba")))
    with pytest.raises(CheckpointError, match="'model.norm.weight' is missing"):
        from_pretrained(variant("missing", edit_tensors=lambda t: t.pop("model.norm.weight")))
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.extra.weight'"):
        from_pretrained(variant("extra", edit_tensors=lambda t: t.update(
            {"model.extra.weight": torch.zeros(2)})))
    with pytest.raises(CheckpointError, match="embed_tokens.weight has shape"):
        from_pretrained(variant("shape", lambda c: c.update(vocab_size=70)))

    def move_rows(t):   # q_proj loses half its rows to k_proj: the fused qkv keeps its total size
        q, k = t["model.layers.0.self_attn.q_proj.weight"], t["model.layers.0.self_attn.k_proj.weight"]
        t["model.layers.0.self_attn.q_proj.weight"] = q[:q.size(0) // 2].clone()
        t["model.layers.0.self_attn.k_proj.weight"] = torch.cat([k, q[q.size(0) // 2:]])
    with pytest.raises(CheckpointError, match=r"q_proj.weight has shape \(16, 32\), the config "
                                              r"implies \(32, 32\)"):
        from_pretrained(variant("fused", edit_tensors=move_rows))
    with pytest.raises(CheckpointError, match="rope type 'yarn' is not supported"):
        from_pretrained(variant("rope", lambda c: c.update(
            rope_scaling={"rope_type": "yarn", "factor": 4.0}, rope_parameters=None)))
    for field, value, want in (("num_hidden_layers", "2", "a whole number >= 1"),
                               ("vocab_size", True, "a whole number >= 1"),
                               ("tie_word_embeddings", "false", "true or false"),
                               ("rms_norm_eps", "1e-5", "a finite number > 0"),
                               ("head_dim", 8.0, "a whole number >= 1")):
        with pytest.raises(CheckpointError, match=f"{field} = {value!r} is not {want}"):
            from_pretrained(variant(f"type-{field}", lambda c: c.update({field: value})))
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text((good / "config.json").read_text())
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read"):
        from_pretrained(str(corrupt))
    (corrupt / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a usable config"):
        from_pretrained(str(corrupt))
    (corrupt / "config.json").write_bytes(b'{"model_type": "llama\xe9"}')      # not UTF-8
    with pytest.raises(CheckpointError, match="not a usable config"):
        from_pretrained(str(corrupt))
    (corrupt / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="not a JSON object"):
        from_pretrained(str(corrupt))


def test_sharded_checkpoint_loads(tmp_path):
    m = tiny_model(tie=False)
    save_pretrained(m, tmp_path / "one")
    tensors = load_file(tmp_path / "one" / "model.safetensors")
    names = sorted(tensors)
    d = tmp_path / "sharded"
    d.mkdir()
    (d / "config.json").write_text((tmp_path / "one" / "config.json").read_text())
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        fn = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, d / fn)
        weight_map.update({n: fn for n in part})
    json.dump({"weight_map": weight_map}, open(d / "model.safetensors.index.json", "w"))
    m2 = from_pretrained(str(d))
    idx = torch.randint(0, 61, (1, 7))
    assert torch.equal(m(idx), m2(idx))
    os.remove(d / "model-00002-of-00002.safetensors")
    with pytest.raises(CheckpointError, match="shard .* is missing"):
        from_pretrained(str(d))


def test_flex_block_mask_equals_the_boolean_mask():
    """The FlexAttention path (distill.py --attention flex) gives the SDPA path's logits."""
    from data import pack
    from fast.flex import FlexMask
    m = tiny_model()
    mtp = m.add_mtp_token()
    P = pack([list(range(2, 40)) + [1], list(range(5, 70))], k=3, offset=1, n_regions=4,
             seq_len=40, mtp_id=mtp, eos_id=1)
    with torch.no_grad():        # FlexAttention has no backward on the CPU (training uses CUDA)
        torch.testing.assert_close(m(P.idx, pos=P.pos, mask=FlexMask(P.mask)),
                                   m(P.idx, pos=P.pos, mask=P.mask), atol=1e-5, rtol=0)
