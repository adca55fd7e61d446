"""model.py against plain formulas written out by hand (no transformers needed), and the
ConfAdapt rule at its boundary.

The reference forward reads the model's own weights in float64 and loops over layers, heads and
query positions: RMSNorm / LayerNorm, RoPE (HF's rotate-half pairs (i, i + hs/2), with Llama-3.1's
frequency rescaling), softmax attention over the allowed keys, SwiGLU / GELU-tanh MLP.
"""
import math
import random

import pytest
import torch

from conftest import tiny_model
from data import pack
from decode import ConfAdapt
from model import RMSNorm

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def rms_norm(x, w, eps):
    """y_i = w_i x_i / sqrt(mean_j x_j^2 + eps), one row at a time."""
    out = torch.empty_like(x)
    for r in range(x.size(0)):
        ms = sum(float(v) ** 2 for v in x[r]) / x.size(1)
        out[r] = w * x[r] / math.sqrt(ms + eps)
    return out


def layer_norm(x, w, b, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)           # biased, as LayerNorm
    return (x - mean) / torch.sqrt(var + eps) * w + b


def inv_freq(cfg):
    """theta^(-2i/hs) per rotated pair; Llama-3.1 keeps high frequencies, divides low ones by
    `factor`, and blends the two in between (wavelength = 2 pi / frequency)."""
    out = []
    for i in range(cfg.head_dim // 2):
        f = cfg.rope_theta ** (-2 * i / cfg.head_dim)
        s = cfg.rope_scaling
        if s:
            wavelen, old = 2 * math.pi / f, s["original_max_position_embeddings"]
            if wavelen > old / s["low_freq_factor"]:
                f = f / s["factor"]
            elif wavelen >= old / s["high_freq_factor"]:
                smooth = (old / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
                f = (1 - smooth) * f / s["factor"] + smooth * f
        out.append(f)
    return out


def rope(x, pos, freqs):
    """Rotate each pair (x_i, x_{i+hs/2}) of row t by the angle pos[t] * freqs[i]."""
    half, out = x.size(1) // 2, x.clone()
    for t in range(x.size(0)):
        for i, f in enumerate(freqs):
            c, s = math.cos(pos[t] * f), math.sin(pos[t] * f)
            a, b = float(x[t, i]), float(x[t, i + half])
            out[t, i], out[t, i + half] = a * c - b * s, b * c + a * s
    return out


def linear(x, W, name):
    y = x @ W[name + ".weight"].T
    return y + W[name + ".bias"] if name + ".bias" in W else y


def naive_forward(model, idx, pos=None, allowed=None):
    """Logits (T, V) of one row in float64. allowed[i][j]: query i may attend key j (default
    causal); pos: position ids (default 0..T-1)."""
    cfg = model.cfg
    W = {n: p.detach().double() for n, p in model.state_dict().items()}
    T = len(idx)
    pos = list(range(T)) if pos is None else [int(p) for p in pos]
    allowed = [[j <= i for j in range(T)] if allowed is None else [bool(a) for a in allowed[i]]
               for i in range(T)]
    gpt2 = cfg.model_type == "gpt2"
    nh, nkv, hs = cfg.n_head, cfg.n_kv_head, cfg.head_dim

    def norm(x, name):
        if gpt2:
            return layer_norm(x, W[name + ".weight"], W[name + ".bias"], cfg.norm_eps)
        return rms_norm(x, W[name + ".weight"], cfg.norm_eps)

    x = W["embed.weight"][torch.as_tensor(idx)]                       # (T, D)
    if gpt2:
        x = x + W["pos_embed.weight"][torch.tensor(pos)]
    for layer in range(cfg.n_layer):
        b = f"blocks.{layer}"
        qkv = linear(norm(x, b + ".norm1"), W, b + ".attn.qkv")
        q, k, v = qkv.split([nh * hs, nkv * hs, nkv * hs], -1)
        heads = []
        for h in range(nh):
            g = h // (nh // nkv)                                      # its key/value head
            qh, kh, vh = q[:, h * hs:(h + 1) * hs], k[:, g * hs:(g + 1) * hs], v[:, g * hs:(g + 1) * hs]
            if not gpt2:
                qh, kh = rope(qh, pos, inv_freq(cfg)), rope(kh, pos, inv_freq(cfg))
            out = torch.zeros(T, hs, dtype=torch.float64)
            for i in range(T):
                keys = [j for j in range(T) if allowed[i][j]]
                scores = torch.stack([qh[i] @ kh[j] for j in keys]) / math.sqrt(hs)
                p = torch.exp(scores - scores.max())
                out[i] = sum(w * vh[j] for w, j in zip(p / p.sum(), keys))
            heads.append(out)
        x = x + linear(torch.cat(heads, -1), W, b + ".attn.proj")
        hidden = linear(norm(x, b + ".norm2"), W, b + ".mlp.fc")
        if gpt2:
            act = 0.5 * hidden * (1 + torch.tanh(math.sqrt(2 / math.pi) * (hidden + 0.044715 * hidden ** 3)))
        else:
            gate, up = hidden.chunk(2, -1)
            act = gate * torch.sigmoid(gate) * up
        x = x + linear(act, W, b + ".mlp.proj")
    return norm(x, "norm") @ W["lm_head.weight"].T


def test_rms_norm_equals_its_formula():
    """eps inside the square root (with a large eps, so putting it outside shows)."""
    norm = RMSNorm(16, eps=0.5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16))
    x = 0.5 * torch.randn(5, 16)
    torch.testing.assert_close(norm(x), rms_norm(x, norm.weight.detach(), 0.5), atol=1e-6, rtol=1e-5)


ARCHS = {"llama-gqa": dict(model_type="llama"), "qwen2-bias": dict(model_type="qwen2"),
         "llama3-rope": dict(model_type="llama", rope_scaling=LLAMA3_SCALING),
         "gpt2-untied": dict(model_type="gpt2", tie=False)}


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_equals_a_naive_per_head_loop(arch):
    """The plain causal forward (SDPA's own mask), and the packed MTP layout (explicit position
    ids and blocked attention mask), against the reference on the same weights."""
    model = tiny_model(**ARCHS[arch])
    # bigger norm weights and biases than the init's ones and zeros, so that each term matters
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.3 * torch.randn(p.shape))
    r = random.Random(0)
    idx = torch.tensor([[r.randrange(61) for _ in range(20)]])
    torch.testing.assert_close(model(idx)[0].double(), naive_forward(model, idx[0]), atol=1e-5, rtol=0)
    P = pack([[r.randrange(2, 61) for _ in range(40)], [r.randrange(2, 61) for _ in range(9)] + [1]],
             k=3, offset=2, n_regions=4, seq_len=32, mtp_id=60, eos_id=1)
    logits = model(P.idx, pos=P.pos, mask=P.mask)
    for b in range(2):
        torch.testing.assert_close(logits[b].double(), naive_forward(model, P.idx[b], P.pos, P.mask),
                                   atol=1e-5, rtol=0)


def test_confadapt_rejects_a_confidence_equal_to_tau():
    """Accept the longest leading run with confidence STRICTLY above tau, and at least one."""
    tau = 0.75                       # exact in binary: conf == tau is exact, not a rounding accident
    conf = torch.tensor([[0.75, 0.9, 0.9], [0.9, 0.75, 0.9], [0.9, 0.9, 0.75], [0.9, 0.9, 0.9],
                         [0.5, 0.9, 0.9]])
    assert ConfAdapt(tau).accept(conf).tolist() == [1, 1, 2, 3, 1]
    levels = torch.tensor([0.5, 0.75, 0.875, 1.0])
    conf = levels[torch.randint(0, 4, (300, 5), generator=torch.Generator().manual_seed(0))]
    for row, n in zip(conf.tolist(), ConfAdapt(tau).accept(conf).tolist()):
        run = 0
        while run < len(row) and row[run] > tau:
            run += 1
        assert n == max(run, 1), row
