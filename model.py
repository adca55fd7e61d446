"""
One decoder for GPT-2 and Llama-family (Llama, Qwen2, Qwen3) checkpoints, read and written in
the Hugging Face layout.

    from model import Transformer, KVCache
    model = Transformer.from_pretrained("path/to/hf_dir")      # config.json + *.safetensors
    logits = model(idx)                                        # plain causal LM, (B, T, V)
    logits = model(idx, pos=pos, mask=mask)                    # packed MTP training layout
    cache = KVCache(); logits = model(idx, cache=cache); cache.truncate(n)   # decoding
    model.add_mtp_token(); model.save_pretrained("out_dir")    # still an ordinary HF checkpoint

Both architectures share one set of module names; `hf_layout` is the explicit map between our
names and the checkpoint's, used for both loading and saving. Loading is strict: every expected
tensor present, every shape checked, every unknown key an error that names it. Beside the core:
compat/ (config.json field checks and RoPE spellings, hub downloads), fast/ (the static cache
of CUDA-graph decoding, FlexAttention masks).
"""
import json
import math
import os
from dataclasses import dataclass, field, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

# -----------------------------------------------------------------------------
# Config: read from (and written back to) a Hugging Face config.json

ARCHS = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
         "qwen3": "Qwen3ForCausalLM"}


class CheckpointError(ValueError):
    """A checkpoint or config that cannot be loaded; the message names the problem and the fix."""



@dataclass
class Config:
    model_type: str = "llama"         # "gpt2" | "llama" | "qwen2" | "qwen3" (see ARCHS)
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
    rope_scaling: dict | None = None  # None or {"rope_type": "llama3", ...} (read_rope)
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

    @classmethod
    def from_hf(cls, d):
        mt = d.get("model_type")
        if mt not in ARCHS:
            raise CheckpointError(f"unknown model_type {mt!r} in config.json "
                                  f"(supported: {', '.join(ARCHS)})")
        from compat.hf_config import check_fields, read_rope   # the field tables live there
        check_fields(d, mt)             # every field read, fixed at our value, or harmless
        ours = dict(model_type=mt, vocab_size=d["vocab_size"], mtp_token_id=d.get("mtp_token_id"),
                    mtp_k_max=d.get("mtp_k_max"), hf=d)
        if mt == "gpt2":
            n_embd = d["n_embd"]
            return cls(**ours, n_layer=d["n_layer"], n_head=d["n_head"], n_kv_head=d["n_head"],
                       d_model=n_embd, head_dim=n_embd // d["n_head"],
                       d_ff=d.get("n_inner") or 4 * n_embd, max_seq_len=d["n_positions"],
                       norm_eps=d.get("layer_norm_epsilon", 1e-5),
                       tie_embeddings=d.get("tie_word_embeddings", True), qkv_bias=True,
                       o_bias=True, mlp_bias=True)
        n_head = d["num_attention_heads"]
        theta, scaling = read_rope(d)
        # llama and qwen3: attention_bias puts a bias on q, k, v and o; qwen2: on q, k, v only
        bias = d.get("attention_bias", False)
        return cls(**ours, n_layer=d["num_hidden_layers"], n_head=n_head,
                   n_kv_head=d.get("num_key_value_heads") or n_head, d_model=d["hidden_size"],
                   head_dim=d.get("head_dim") or d["hidden_size"] // n_head,
                   d_ff=d["intermediate_size"], max_seq_len=d.get("max_position_embeddings", 2048),
                   norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
                   tie_embeddings=d.get("tie_word_embeddings", False),
                   qkv_bias=True if mt == "qwen2" else bias, o_bias=False if mt == "qwen2" else bias,
                   mlp_bias=d.get("mlp_bias", False) if mt == "llama" else False)

    def to_hf(self):
        """The config.json dict: the original fields kept, ours updated."""
        d = dict(self.hf)
        if self.model_type == "gpt2":
            d.update(model_type="gpt2", n_embd=self.d_model, n_layer=self.n_layer,
                     n_head=self.n_head, n_positions=self.max_seq_len, n_inner=self.d_ff,
                     layer_norm_epsilon=self.norm_eps, activation_function="gelu_new")
        else:
            # RoPE in both spellings, from the same values: transformers 4 reads only rope_theta
            # and rope_scaling, transformers 5 reads rope_scaling if set, else rope_parameters
            rope = self.rope_scaling or {"rope_type": "default"}
            d.update(model_type=self.model_type, hidden_size=self.d_model,
                     num_hidden_layers=self.n_layer, num_attention_heads=self.n_head,
                     num_key_value_heads=self.n_kv_head, head_dim=self.head_dim,
                     intermediate_size=self.d_ff, max_position_embeddings=self.max_seq_len,
                     rms_norm_eps=self.norm_eps, rope_theta=self.rope_theta,
                     rope_scaling=self.rope_scaling,
                     rope_parameters={**rope, "rope_theta": self.rope_theta}, hidden_act="silu")
            if self.model_type == "llama":
                d.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
            if self.model_type == "qwen3":
                d.update(attention_bias=self.qkv_bias)
        d.update(architectures=[ARCHS[self.model_type]], vocab_size=self.vocab_size,
                 tie_word_embeddings=self.tie_embeddings)
        for name in ("mtp_token_id", "mtp_k_max"):
            if getattr(self, name) is not None:
                d[name] = getattr(self, name)
        return d

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

    # --- Hugging Face checkpoints ---

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu"):
        """Load a local HF directory, or download a hub name (e.g. "gpt2") to $MTP_CACHE first."""
        if not os.path.isdir(path):                     # a hub name such as "gpt2"
            from compat.hub import resolve_checkpoint
            path = resolve_checkpoint(path)
        cfg_file = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_file):
            raise CheckpointError(f"no config.json in {path}: a checkpoint directory needs "
                                  "config.json and model.safetensors (or a sharded index)")
        try:
            with open(cfg_file, encoding="utf-8") as f:
                d = json.load(f)
            if not isinstance(d, dict):
                raise CheckpointError(f"{cfg_file} is not a JSON object of config fields")
            cfg = Config.from_hf(d)
        except (ValueError, KeyError) as e:     # ValueError: not JSON, not UTF-8
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"{cfg_file} is not a usable config: {e!r}") from None
        with torch.device("meta"):
            model = cls(cfg)
        hf = read_safetensors(path)
        state = {}
        for ours, (names, transpose) in hf_layout(cfg).items():
            missing = [n for n in names if n not in hf]
            if missing:
                raise CheckpointError(f"{path}: tensor {missing[0]!r} is missing from the checkpoint")
            parts = [hf.pop(n) for n in names]
            parts = [p.t() if transpose else p for p in parts]
            state[ours] = torch.cat(parts, 0) if len(parts) > 1 else parts[0]
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
        expected = {n: p.shape for n, p in model.named_parameters()}
        for n, shape in expected.items():
            if state[n].shape != shape:
                raise CheckpointError(f"{path}: {n} has shape {tuple(state[n].shape)}, the config "
                                      f"implies {tuple(shape)}")
        if cfg.tie_embeddings:
            state["lm_head.weight"] = state["embed.weight"]
        model.load_state_dict(state, strict=True, assign=True)
        if cfg.tie_embeddings:
            model.lm_head.weight = model.embed.weight   # assign=True replaced both: tie again
        if cfg.model_type != "gpt2":
            model.inv_freq = rope_inv_freq(cfg)
        return model.to(device=device, dtype=dtype)

    def save_pretrained(self, out_dir, extra_files=None):
        """Write config.json + model.safetensors (each atomically); extra_files: {name: text}."""
        os.makedirs(out_dir, exist_ok=True)
        own = {n: p.detach() for n, p in self.named_parameters()}  # tied lm_head appears once
        tensors = {}
        for ours, (names, transpose) in hf_layout(self.cfg).items():
            w = own[ours]
            sizes = hf_split_sizes(self.cfg, ours)
            parts = w.split(sizes, 0) if sizes else [w]
            for n, p in zip(names, parts):
                tensors[n] = (p.t() if transpose else p).contiguous().cpu()
        tmp = os.path.join(out_dir, "model.safetensors.tmp")
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.chmod(tmp, 0o644)          # safetensors creates it owner-only; a checkpoint is shared
        os.replace(tmp, os.path.join(out_dir, "model.safetensors"))
        cfg = self.cfg.to_hf()
        # transformers 5 reads "dtype" before "torch_dtype" (4 reads only the latter): write both,
        # or a stale "dtype" kept from the original config would load an fp32 save as bf16
        cfg["torch_dtype"] = cfg["dtype"] = str(self.embed.weight.dtype).removeprefix("torch.")
        files = {"config.json": json.dumps(cfg, indent=2) + "\n", **(extra_files or {})}
        for name, text in files.items():
            atomic_write(os.path.join(out_dir, name), text)


def atomic_write(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


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
        with open(index) as f:
            files = [os.path.join(path, s) for s in sorted(set(json.load(f)["weight_map"].values()))]
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
