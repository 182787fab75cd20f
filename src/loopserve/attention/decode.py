"""Decode attention: one new query token per conversation over its own keys.

Every decode step, alone or in the scheduler's batch, runs through
:func:`decode_attention`, so a conversation's attention output is the same bits either way.
With the native kernels (``loopserve/native/decode_attention.c``) all segments of a step
go to one call that reads each key and value once for the G query heads sharing them and
spreads chunks of keys over the cores; a decode step is bound by reading the KV cache,
and this reads it at close to memory speed. The kernel uses as many threads as torch's
ops would here (``torch.get_num_threads()``: the budget, or one inside a
:func:`loopserve.threads.parallel_map` item). Without them (no compiler, other dtypes or
layouts, another device) each segment runs :func:`torch_decode_attention`, which also does
not depend on the other segments.
"""

from __future__ import annotations

import ctypes
import threading

import torch

from ..native import native_kernels

__all__ = ["decode_attention", "torch_decode_attention"]


def torch_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float | None = None) -> torch.Tensor:
    """One decode row of every query head over all N keys, q ``(1, H, 1, D)``, k/v ``(1, H_kv, N, D)``.

    The query heads that share a KV head go through one ``bmm`` over its keys and one over
    its values, so each key and value is read once per KV head (the CPU SDPA reads them
    once per query head)."""
    _, H, _, D = q.shape
    Hkv = k.shape[1]
    scale = D**-0.5 if scaling is None else scaling
    scores = torch.bmm(q.reshape(Hkv, H // Hkv, D), k[0].transpose(1, 2)) * scale
    return torch.bmm(torch.softmax(scores, -1), v[0]).reshape(1, H, 1, D)


def decode_attention(queries: list[torch.Tensor], keys: list[torch.Tensor], values: list[torch.Tensor],
                     scaling: float | None = None) -> list[torch.Tensor]:
    """Segment i: query ``(1, H, 1, D)`` over keys/values ``(1, H_kv, N_i, D)``; returns each
    segment's ``(1, H, 1, D)`` output. Segments are independent: each output is the same
    whatever the other segments are (each takes the path it would take alone)."""
    kernels = native_kernels() if queries else None
    outs: list[torch.Tensor | None] = [None] * len(queries)
    groups: dict[tuple, list[int]] = {}  # segments the kernel can take, by (H, H_kv, D)
    for i, (q, k, v) in enumerate(zip(queries, keys, values)):
        if kernels is not None and _native_usable(q, k, v, kernels):
            groups.setdefault((q.shape[1], k.shape[1], q.shape[-1]), []).append(i)
    for (H, Hkv, D), members in groups.items():
        scale = D**-0.5 if scaling is None else scaling
        attended = _native(kernels, [queries[i] for i in members], [keys[i] for i in members],
                           [values[i] for i in members], H, Hkv, D, scale)
        for i, out in zip(members, attended):
            outs[i] = out
    for i, (q, k, v) in enumerate(zip(queries, keys, values)):
        if outs[i] is None:
            outs[i] = torch_decode_attention(q, k, v, scaling)
    return outs


def _native_usable(q, k, v, kernels) -> bool:
    if q.device.type != "cpu" or q.dim() != 4 or k.dim() != 4:
        return False
    _, H, _, D = q.shape
    Hkv = k.shape[1]
    if H % Hkv or q.shape != (1, H, 1, D) or k.shape[0] != 1 or k.shape[-1] != D or v.shape != k.shape:
        return False
    if not (q.dtype == k.dtype == v.dtype == torch.float32) or k.shape[2] < 1:
        return False
    # Within a head, tokens follow each other densely (a store or view buffer's slice).
    if k.stride(-1) != 1 or v.stride(-1) != 1 or k.stride(-2) != D or v.stride(-2) != D:
        return False
    return bool(kernels.decode_attention_supported(H // Hkv, D))


_scratch = threading.local()


def _scratch_buffer(n: int) -> torch.Tensor:
    """A per-thread float buffer of >= n elements, kept between calls (no fresh pages per step)."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < n:
        buf = _scratch.buf = torch.empty(max(n, 2 * (buf.numel() if buf is not None else 0)))
    return buf


def _native(kernels, queries, keys, values, H: int, Hkv: int, D: int, scale: float) -> list[torch.Tensor]:
    S = len(queries)
    queries = [q.contiguous() for q in queries]
    out = torch.empty(S, 1, H, 1, D)
    i64s, ptrs = ctypes.c_int64 * S, ctypes.c_void_p * S
    lens = i64s(*(k.shape[2] for k in keys))
    scratch = _scratch_buffer(kernels.decode_attention_scratch_floats(S, lens, Hkv, H // Hkv, D))
    row = H * D * out.element_size()
    kernels.decode_attention(
        S, lens, i64s(*(k.stride(1) for k in keys)), i64s(*(v.stride(1) for v in values)),
        ptrs(*(q.data_ptr() for q in queries)), ptrs(*(k.data_ptr() for k in keys)),
        ptrs(*(v.data_ptr() for v in values)), ptrs(*(out.data_ptr() + i * row for i in range(S))),
        Hkv, H // Hkv, D, scale, scratch.data_ptr(), torch.get_num_threads(),
    )
    return list(out.unbind(0))
