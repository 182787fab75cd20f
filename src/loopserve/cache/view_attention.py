"""Decode attention over a selected view of the KV store (SPEC section 2), per device.

Phase 2 attends, per KV head, to the store rows ``idx`` chosen at the last re-selection
(top-B scored inputs, sinks, recent and generated tokens). On CUDA the Triton kernel
(:mod:`loopserve.kernels.view_decode`) reads those rows of the store directly, the
gather and the attention in one pass; on the CPU the rows are gathered and attended
with SDPA. Both are exact softmax attention over the view.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels import choose_backend, require_triton

__all__ = ["view_decode_attention"]


def view_decode_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    idx: torch.Tensor,
    scale: float,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention of the decode query rows over the store rows ``idx`` of each KV head.

    q ``(1, H, T, D)``; keys, values ``(1, H_kv, N, D)`` (a :class:`SessionLayer`'s store);
    idx ``(H_kv, L)`` store indices. Every query row attends every view key. Returns
    ``(1, H, T, D)`` in q's dtype. ``backend``: ``"cpu"`` or ``"triton"``; None picks by
    the tensors' device (:func:`loopserve.kernels.choose_backend`).
    """
    if choose_backend(q.device, backend) == "triton":
        require_triton("decode attention over the view", q.device)
        from ..kernels.view_decode import view_decode_attention as triton_view_decode  # imports Triton

        return triton_view_decode(q[0], keys[0], values[0], idx, scale=scale)[0][None]
    h_kv, L = idx.shape
    d = keys.shape[-1]
    gather = idx.to(keys.device, torch.long).view(1, h_kv, L, 1).expand(1, h_kv, L, d)
    k_view, v_view = torch.gather(keys, 2, gather), torch.gather(values, 2, gather)
    return F.scaled_dot_product_attention(q, k_view, v_view, scale=scale, enable_gqa=q.shape[1] != h_kv)
