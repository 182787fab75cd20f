"""Which sparse prefill kernel runs where: Triton on CUDA, the CPU kernels elsewhere.

:func:`loopserve.attention.sparse.sparse_prefill_attention` is the one entry point. For
CUDA tensors it runs the Triton kernel (:mod:`loopserve.kernels.vertical_slash`, optional
extra ``loopserve[gpu]``); for CPU tensors the native C kernel or its pure-torch fallback
(:mod:`loopserve.attention.sparse`). Both compute the same exact softmax over the
pattern's cells. ``backend="triton"`` also runs the Triton kernel on CPU tensors, which
works under Triton's interpreter (``TRITON_INTERPRET=1``): the tests' way of checking it
without a GPU.
"""

from __future__ import annotations

import torch

from ..kernels import GPU_EXTRA_HINT, triton_available
from .lines import LinePattern

__all__ = ["PREFILL_BACKENDS", "prefill_backend", "triton_sparse_prefill"]

PREFILL_BACKENDS = ("cpu", "triton")


def prefill_backend(device: torch.device | str, backend: str | None = None) -> str:
    """The sparse prefill kernel for tensors on ``device``: ``"triton"`` on CUDA, else ``"cpu"``.

    An explicit ``backend`` is checked and returned: ``"cpu"`` cannot take CUDA tensors.
    """
    device = torch.device(device)
    if backend is None:
        return "triton" if device.type == "cuda" else "cpu"
    if backend not in PREFILL_BACKENDS:
        raise ValueError(f"unknown sparse prefill backend {backend!r}: expected one of {PREFILL_BACKENDS}")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"the cpu sparse prefill kernels take CPU tensors, got {device.type} tensors: use backend='triton'")
    return backend


def triton_sparse_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: LinePattern, scale: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton kernel on a :class:`LinePattern`: output ``(H, n, D)`` and log-sum-exp ``(H, n)``."""
    if not triton_available():
        raise RuntimeError(f"the sparse prefill kernel for {q.device.type} tensors needs Triton: {GPU_EXTRA_HINT}")
    from ..kernels.vertical_slash import vertical_slash_attention  # imports Triton: only when used

    return vertical_slash_attention(
        q, k, v, pattern.vertical, pattern.slash, per_query_head=pattern.per_query_head, scale=scale
    )
