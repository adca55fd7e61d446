"""
FlexAttention for the packed MTP training layout (distill.py --attention flex, CUDA).

The packed layout's mask is mostly empty away from the diagonal: FlexAttention skips the
128x128 tiles that are fully masked instead of multiplying by zeros. A FlexMask goes where a
boolean mask would (model.Transformer.forward(mask=...)); the attention layer sees that it has
an `attend` method and lets it compute the attention.
"""
import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

_compiled = None


def flex(device):
    """flex_attention, compiled on CUDA (its fast path); the eager reference elsewhere."""
    global _compiled
    if device.type != "cuda":
        return flex_attention
    if _compiled is None:
        _compiled = torch.compile(flex_attention)
    return _compiled


class FlexMask:
    """A boolean (L, L) mask, True = may attend, as a FlexAttention BlockMask."""

    def __init__(self, mask):
        L = mask.size(-1)
        self.block = create_block_mask(lambda b, h, q, kv: mask[q, kv], B=None, H=None,
                                       Q_LEN=L, KV_LEN=L, device=mask.device)

    def attend(self, q, k, v, enable_gqa):
        """q (B, nh, L, hs), k/v (B, nkv, L, hs) -> (B, nh, L, hs)."""
        return flex(q.device)(q, k, v, block_mask=self.block, enable_gqa=enable_gqa)
