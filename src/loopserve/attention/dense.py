"""Dense attention (PyTorch SDPA): the reference every sparse method is measured against."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import PrefillMethod, register_prefill
from .decode import decode_attention


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float | None = None) -> torch.Tensor:
    """Causal attention of the last n = q.shape[-2] positions over all N keys.

    q: (B, H, n, D), k/v: (B, H_kv, N, D) with H a multiple of H_kv; the n queries are the
    last n keys' tokens. Returns (B, H, n, D).
    """
    n, N = q.shape[-2], k.shape[-2]
    if n == 1 and q.shape[0] == 1:  # a decode step: the same function as the scheduler's batches
        return decode_attention([q], [k], [v], scaling)[0]
    # enable_gqa avoids copying K/V per query head (measured: 4x faster decode at 8k on CPU).
    gqa = k.shape[1] != q.shape[1]
    if n == 1 or n == N:
        return F.scaled_dot_product_attention(q, k, v, is_causal=n > 1, scale=scaling, enable_gqa=gqa)
    # New rows over a cached history: row i may see keys 0 .. N - n + i.
    rows = torch.arange(n, device=q.device).unsqueeze(1)
    cols = torch.arange(N, device=q.device).unsqueeze(0)
    mask = cols <= rows + (N - n)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=gqa)


@register_prefill
@dataclass
class DensePrefill(PrefillMethod):
    name = "dense"
    chunkable = True
    description = "Full causal attention (PyTorch SDPA) over history + new tokens."

    def attend(self, q, k, v, *, layer_idx, scaling, ctx):
        return dense_attention(q, k, v, scaling)
