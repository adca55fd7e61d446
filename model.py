"""
One decoder for GPT-2 and Llama-family (Llama, Qwen2, Qwen3) models: the forward pass with
explicit positions and attention masks, a KV cache that can drop its newest entries, and the
<MTP> token.

    from model import Config, Transformer, KVCache
    model = Transformer(Config(...))                           # or compat.hf.from_pretrained(dir)
    logits = model(idx)                                        # plain causal LM, (B, T, V)
    logits = model(idx, pos=pos, mask=mask)                    # packed MTP training layout
    cache = KVCache(); logits = model(idx, cache=cache); cache.truncate(n)   # decoding
    model.add_mtp_token()                                      # one more vocabulary row

Both architectures share one set of module names. Reading and writing Hugging Face checkpoints
(config.json, safetensors, the name map between their tensors and ours) is compat/hf.py; the
static cache of CUDA-graph decoding and FlexAttention masks are in fast/.
"""
import math
from dataclasses import dataclass, field, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Config: one dataclass (compat/hf.py reads it from, and writes it to, a config.json)

class CheckpointError(ValueError):
    """A checkpoint or config that cannot be loaded; the message names the problem and the fix."""


@dataclass
class Config:
    model_type: str = "llama"         # "gpt2" | "llama" | "qwen2" | "qwen3"
    vocab_size: int = 512
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 4                # < n_head: grouped-query attention
    d_model: int = 128
    head_dim: int = 32                # qwen3: not d_model / n_head
    d_ff: int = 512
    max_seq_len: int = 1024
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # None or {"rope_type": "llama3", ...}
    tie_embeddings: bool = True
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    mtp_token_id: int | None = None   # the <MTP> mask token, once added (add_mtp_token)
    mtp_k_max: int | None = None      # the largest k the student was trained for (distill.py --k)
    hf: dict = field(default_factory=dict, repr=False)  # the original config.json, kept for saving

    @property
    def qk_norm(self):
        """qwen3: an RMSNorm over each head's queries and keys, before RoPE."""
        return self.model_type == "qwen3"

    def summary(self):
        return {k: v for k, v in asdict(self).items() if k != "hf"}


# -----------------------------------------------------------------------------
# KV cache: a small object passed to forward(), not model state, so the same model trains

class KVCache:
    """Keys/values of every layer for the tokens seen so far; `truncate(n)` drops the newest.

    Buffers (B, n_kv_head, capacity, head_dim) per layer, doubled when full; attention reads the
    `length` real positions. (fast/cuda_graphs.py has a static variant for CUDA graphs: fixed
    slots written where the caller says, positions and mask always given by the caller.)
    """
    static = False

    def __init__(self):
        self.k, self.v = [], []
        self.length = 0

    def __len__(self):
        return self.length

    def store(self, layer, k, v):
        """Write k, v (B, nkv, T, hs) at positions [length, length+T); return the keys and values
        attention reads: (B, nkv, length+T, hs)."""
        start, end = self.length, self.length + k.size(2)
        if layer == len(self.k):                       # first use of this layer
            self.k.append(k.new_empty(0, 0, 0, 0)), self.v.append(v.new_empty(0, 0, 0, 0))
        if self.k[layer].size(2) < end:                # grow: double the capacity
            cap = max(256, 2 * end)
            for buf in (self.k, self.v):
                old = buf[layer]
                new = k.new_zeros(k.size(0), k.size(1), cap, k.size(3))
                if old.numel():
                    new[:, :, :start] = old[:, :, :start]
                buf[layer] = new
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def truncate(self, n):
        """Forget every position from n on (e.g. the <MTP> slots after a decoding step)."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot truncate a cache of length {self.length} to {n}")
        self.length = n


# -----------------------------------------------------------------------------
# Building blocks

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # computed in fp32 as HF does, then cast back
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(cfg):
    """Inverse frequencies (head_dim/2,), with Llama-3.1's long-context rescaling if configured."""
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).double() / cfg.head_dim))
    s = cfg.rope_scaling
    if s:  # llama3: slow down low frequencies by `factor`, interpolate the middle band
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_len / lo, inv / factor, inv)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        mid = (wavelen <= old_len / lo) & (wavelen >= old_len / hi)
        scaled = torch.where(mid, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
        inv = scaled
    return inv.float()


def apply_rope(x, cos, sin):
    """HF's rotate-half convention: pairs are (i, i + hs/2). x (B, nh, T, hs), cos/sin (B, 1, T, hs)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)   # under autocast q/k are bf16: stay there
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin



class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.nh, self.nkv, self.hs = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, (self.nh + 2 * self.nkv) * self.hs, bias=cfg.qkv_bias)
        self.proj = nn.Linear(self.nh * self.hs, cfg.d_model, bias=cfg.o_bias)
        self.q_norm = RMSNorm(self.hs, cfg.norm_eps) if cfg.qk_norm else None   # qwen3
        self.k_norm = RMSNorm(self.hs, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x, rope, mask, causal, cache, layer):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split([self.nh * self.hs, self.nkv * self.hs, self.nkv * self.hs], -1)
        q = q.view(B, T, self.nh, self.hs).transpose(1, 2)     # (B, nh, T, hs)
        k = k.view(B, T, self.nkv, self.hs).transpose(1, 2)    # (B, nkv, T, hs)
        v = v.view(B, T, self.nkv, self.hs).transpose(1, 2)
        if self.q_norm is not None:                             # per head, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.store(layer, k, v)                     # (B, nkv, S, hs), S = past + T
        if hasattr(mask, "attend"):      # a fast.flex.FlexMask (--attention flex): its own kernel
            y = mask.attend(q, k, v, enable_gqa=self.nkv != self.nh)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                               enable_gqa=self.nkv != self.nh)
        return self.proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hs))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gated = cfg.model_type != "gpt2"    # SwiGLU for llama-family, GELU-tanh for gpt2
        n_out = 2 * cfg.d_ff if self.gated else cfg.d_ff
        self.fc = nn.Linear(cfg.d_model, n_out, bias=cfg.mlp_bias)   # llama: [gate; up] fused
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.mlp_bias)

    def forward(self, x):
        if self.gated:
            gate, up = self.fc(x).chunk(2, dim=-1)
            return self.proj(F.silu(gate) * up)
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        Norm = (lambda d: nn.LayerNorm(d, eps=cfg.norm_eps)) if cfg.model_type == "gpt2" \
            else (lambda d: RMSNorm(d, cfg.norm_eps))
        self.norm1, self.attn = Norm(cfg.d_model), Attention(cfg)
        self.norm2, self.mlp = Norm(cfg.d_model), MLP(cfg)

    def forward(self, x, rope, mask, causal, cache, layer):
        x = x + self.attn(self.norm1(x), rope, mask, causal, cache, layer)
        return x + self.mlp(self.norm2(x))


# -----------------------------------------------------------------------------
# The model

class Transformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.model_type == "gpt2" else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps) if cfg.model_type == "gpt2" \
            else RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        if cfg.model_type != "gpt2":
            self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.apply(self._init)

    @staticmethod
    def _init(m):  # for models trained from scratch; checkpoints overwrite all of it
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    @property
    def device(self):
        return self.embed.weight.device

    def _apply(self, fn, recurse=True):
        """After .to()/.cuda()/.bfloat16(): the RoPE frequencies are fp32 again (a bf16 copy would
        blur far positions). Made here, once, not in forward: a forward that rebuilt them on the
        CPU could not be captured in a CUDA graph."""
        super()._apply(fn, recurse)
        if self.pos_embed is None and self.inv_freq.dtype != torch.float32:
            self.inv_freq = rope_inv_freq(self.cfg).to(self.inv_freq.device)
        return self

    def forward(self, idx, pos=None, mask=None, cache=None, out_idx=None):
        """
        idx:   (B, T) token ids.
        pos:   (B, T) or (T,) position ids; default: continue from the cache (0 without one).
        mask:  (B, T, S) or (T, S) boolean, True = may attend, S = cached + T; default causal;
               or a fast.flex.FlexMask (--attention flex).
        cache: a KVCache that grows by these T tokens (a static one: pass pos, and a mask over
               all of its capacity slots, (B, T, capacity)).
        out_idx: (B, n) positions at which to compute logits (default all): saves the vocab
               projection where only a few positions are supervised.
        Returns logits (B, T or n, V).
        """
        B, T = idx.shape
        static = cache is not None and cache.static
        if static and (mask is None or pos is None):
            raise ValueError("a static KVCache needs explicit pos and a (B, T, capacity) mask")
        # the static cache's length is the caller's business: reading it here would make a
        # compiled forward depend on it (a recompile every step)
        past = len(cache) if cache is not None and not static else 0
        if pos is None:
            pos = torch.arange(past, past + T, device=idx.device)
        if pos.dim() == 1:
            pos = pos.unsqueeze(0).expand(B, T)
        if self.pos_embed is not None and not (idx.is_cuda and torch.cuda.is_current_stream_capturing()) \
                and pos.max() >= self.cfg.max_seq_len:    # (no host sync inside a CUDA graph)
            raise ValueError(f"position {int(pos.max())} is beyond the model's context "
                             f"({self.cfg.max_seq_len})")
        causal = mask is None and past == 0            # the plain causal LM: SDPA's own mask
        if mask is None and past > 0 and T > 1:         # causal within the new tokens, all the past
            mask = torch.ones(T, past + T, dtype=torch.bool, device=idx.device).tril(past)
        if isinstance(mask, torch.Tensor) and mask.dim() == 3:
            mask = mask.unsqueeze(1)                    # (B, 1, T, S): the same for every head

        x = self.embed(idx)                            # (B, T, D)
        rope = None
        if self.pos_embed is not None:
            x = x + self.pos_embed(pos)
        else:
            freqs = pos.unsqueeze(-1).float() * self.inv_freq     # (B, T, hs/2), fp32 (_apply)
            emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)  # (B, 1, T, hs)
            rope = (emb.cos().to(x.dtype), emb.sin().to(x.dtype))
        for i, block in enumerate(self.blocks):
            x = block(x, rope, mask, causal, cache, i)
        if cache is not None and not static:
            cache.length = past + T
        x = self.norm(x)
        if out_idx is not None:
            x = x.gather(1, out_idx.unsqueeze(-1).expand(-1, -1, x.size(-1)))  # (B, n, D)
        return self.lm_head(x)

    # --- the <MTP> token (docs/METHOD.md, "The <MTP> token") ---

    @torch.no_grad()
    def add_mtp_token(self, seed=0):
        """Append one vocabulary row for <MTP>, drawn from the existing rows' mean and std."""
        if self.cfg.mtp_token_id is not None:
            raise CheckpointError(f"this model already has an <MTP> token (id "
                                  f"{self.cfg.mtp_token_id}); reuse it instead of adding another")
        g = torch.Generator().manual_seed(seed)

        def grow(w):  # (V, D) -> (V+1, D)
            wf = w.detach().float().cpu()      # on the CPU: the same row whatever the device
            row = wf.mean(0) + wf.std(0) * torch.randn(w.size(1), generator=g)
            return nn.Parameter(torch.cat([w, row.to(w.device, w.dtype)[None]], 0))

        self.embed.weight = grow(self.embed.weight)
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        else:
            self.lm_head.weight = grow(self.lm_head.weight)
        self.embed.num_embeddings = self.lm_head.out_features = self.cfg.vocab_size + 1
        self.cfg.mtp_token_id = self.cfg.vocab_size
        self.cfg.vocab_size += 1
        return self.cfg.mtp_token_id
