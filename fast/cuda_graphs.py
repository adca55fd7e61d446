"""
Fast decoding on a GPU: every decoding pass replayed from a CUDA graph over a static KV cache
(decode.py --engine graphs; --engine compile captures torch.compile'd passes). decode.make_engine
builds these; decode.Eager is the reference they are tested against (tests/test_cuda.py, and
tests/test_decode.py runs the same static-cache layout uncaptured on the CPU: --engine static).
"""
import time

import torch

from model import KVCache


class StaticKVCache(KVCache):
    """Fixed buffers (B, n_kv_head, capacity, head_dim) per layer, allocated up front, written at
    `write_at` (a device tensor of slot indices set by the caller); attention spans all
    `capacity` slots under the caller's mask. Nothing about it changes shape or needs the host
    from one pass to the next, which is what a CUDA graph needs. `length` (the real cached
    positions, the same for every row) is the caller's bookkeeping: the forward never reads it."""
    static = True

    def __init__(self, cfg, batch, capacity, dtype, device):
        super().__init__()
        self.capacity, self.write_at = capacity, None
        shape = (batch, cfg.n_kv_head, capacity, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layer)]

    def store(self, layer, k, v):
        """Write k, v (B, nkv, T, hs) at slots write_at; return every slot (B, nkv, capacity, hs)."""
        self.k[layer].index_copy_(2, self.write_at, k.to(self.k[layer].dtype))
        self.v[layer].index_copy_(2, self.write_at, v.to(self.v[layer].dtype))
        return self.k[layer], self.v[layer]


class CudaGraphs:
    """Decoding passes replayed from CUDA graphs over a StaticKVCache.

    A pass of T tokens reading n logits per row is captured once per (T, n) and replayed after
    that: one launch instead of a few hundred small kernels, which is what a small model at a
    small batch is bound by on a GPU. Inputs are copied into the graph's own tensors first. The
    prefill (the first pass after reset: one shape per prompt length) runs uncaptured on the same
    cache. prepare() captures a new shape ahead of its pass, so that callers can time the pass
    without the capture. compile=True
    captures torch.compile'd passes instead of eager ones. graphs=False runs the very same
    static-cache passes uncaptured: the layout check on a machine without a GPU.
    """

    def __init__(self, model, batch, capacity, graphs=True, compile=False):
        cfg = model.cfg
        self.model, self.capacity, self.batch = model, capacity, batch
        self.graphs = graphs and model.device.type == "cuda"
        self.cache = StaticKVCache(cfg, batch, capacity, model.embed.weight.dtype, model.device)
        self.fn = torch.compile(model, dynamic=False) if compile else model
        self.captured = {}              # (T, n) -> (graph, static inputs, static logits)

    def reset(self):
        """Empty the cache (its stale slots are masked out); captured graphs stay valid."""
        self.cache.length = 0

    def _pass(self, idx, pos, mask, write_at, out_idx):
        self.cache.write_at = write_at
        return self.fn(idx, pos=pos, mask=mask, cache=self.cache, out_idx=out_idx)

    def _static_inputs(self, idx, pos, mask, out_idx):
        """A pass's inputs in the static cache's layout: (pos, mask over every slot, write_at)."""
        B, T = idx.shape
        L, device = len(self.cache), idx.device
        if L + T > self.capacity:
            raise ValueError(f"the static cache holds {self.capacity} slots; this pass needs {L + T}: "
                             "make the engine with a larger capacity")
        if pos is None:                                   # no padding: positions continue the cache
            pos = torch.arange(L, L + T, device=device).expand(B, T)
        slot = torch.arange(self.capacity, device=device)
        if mask is None:                                  # causal over the real slots
            mask = (slot[None, :] <= L + torch.arange(T, device=device)[:, None]).expand(B, T, -1)
        else:                                             # (B, T, L + T) -> (B, T, capacity)
            mask = torch.nn.functional.pad(mask, (0, self.capacity - mask.size(-1)))
        return pos, mask, slot[L:L + T]

    def _replayed(self):
        """Passes after the prefill are replayed; the prefill (the first pass after reset, one
        shape per prompt length) runs as it comes."""
        return self.graphs and len(self.cache) > 0

    def prepare(self, idx, pos, mask, out_idx):
        """Capture this pass's shape if it is new, before the pass is timed: returns the seconds
        it took (device synchronized at both ends), 0.0 if there was nothing to capture. The
        capture's warm-up passes write the same k/v that the pass itself then writes."""
        key = (idx.size(1), out_idx.size(1))
        if not self._replayed() or key in self.captured:
            return 0.0
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        self.captured[key] = self._capture(idx, *self._static_inputs(idx, pos, mask, out_idx), out_idx)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    def __call__(self, idx, pos, mask, out_idx):
        self.prepare(idx, pos, mask, out_idx)             # (generate_batch has, untimed)
        pos, mask, write_at = self._static_inputs(idx, pos, mask, out_idx)
        if not self._replayed():
            self.cache.write_at = write_at
            logits = self.model(idx, pos=pos, mask=mask, cache=self.cache, out_idx=out_idx)
        else:
            graph, inputs, logits = self.captured[idx.size(1), out_idx.size(1)]
            for buf, x in zip(inputs, (idx, pos, mask, write_at, out_idx)):
                buf.copy_(x)
            graph.replay()
        self.cache.length += idx.size(1)
        return logits

    def _capture(self, *inputs):
        inputs = [x.clone() for x in inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):                     # warm-up (and compilation) off-graph;
            for _ in range(2):                            # it writes the same k/v the replay will
                self._pass(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self._pass(*inputs)
        return graph, inputs, logits
