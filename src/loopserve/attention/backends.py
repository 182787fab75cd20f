"""The Triton side of the sparse prefill dispatch.

:func:`loopserve.attention.sparse.sparse_prefill_attention` is the one entry point; it
picks by the tensors' device (:func:`loopserve.kernels.choose_backend`): for CUDA tensors
the Triton kernel (:mod:`loopserve.kernels.vertical_slash`, optional extra
``loopserve[gpu]``) through :func:`triton_sparse_prefill`; for CPU tensors the native C
kernel or its pure-torch fallback. Both compute the same exact softmax over the
pattern's cells.
"""

from __future__ import annotations

import torch

from ..kernels import require_triton
from .pattern import LinePattern

__all__ = ["triton_sparse_prefill"]


def triton_sparse_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: LinePattern, scale: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton kernel on a :class:`LinePattern`: output ``(H, n, D)`` and log-sum-exp ``(H, n)``."""
    require_triton("the sparse prefill kernel", q.device)
    from ..kernels.vertical_slash import vertical_slash_attention  # imports Triton: only when used

    return vertical_slash_attention(
        q, k, v, pattern.vertical, pattern.slash, per_query_head=pattern.per_query_head, scale=scale
    )
