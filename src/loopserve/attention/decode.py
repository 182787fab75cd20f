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

import torch

from ..native import native_kernels, scratch_buffer

__all__ = ["decode_attention", "reads_views_by_index", "torch_decode_attention", "view_indices"]


def view_indices(rows: torch.Tensor, tail: int, n: int) -> torch.Tensor:
    """The store indices a selected view attends, per KV head: ``rows`` (H_kv, L), then every
    token from ``tail`` to ``n - 1``; ``(H_kv, L + n - tail)``."""
    return torch.cat([rows, torch.arange(tail, n, device=rows.device).expand(rows.shape[0], -1)], dim=1)


def reads_views_by_index(heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device) -> bool:
    """Whether decode attention for this shape, dtype and device runs the native kernel,
    which reads a selected view's rows from the store by index (so a cache need not copy
    them out at each selection)."""
    if torch.device(device).type != "cpu" or dtype != torch.float32 or heads % kv_heads:
        return False
    kernels = native_kernels()
    return kernels is not None and bool(kernels.decode_attention_supported(heads // kv_heads, head_dim))


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
                     scaling: float | None = None, views: list | None = None) -> list[torch.Tensor]:
    """Segment i: query ``(1, H, 1, D)`` over keys/values ``(1, H_kv, N_i, D)``; returns each
    segment's ``(1, H, 1, D)`` output. Segments are independent: each output is the same
    whatever the other segments are (each takes the path it would take alone).

    ``views[i]``, if given and not None, is ``(rows, tail)``: segment i attends, per KV head h,
    the tokens ``rows[h]`` (an ``(H_kv, L)`` int64 tensor) and then every token from ``tail``
    to N_i - 1, read straight from keys/values (a selected view without a copy of its rows).
    The result is the same bits as attending those rows copied out."""
    views = views if views is not None else [None] * len(queries)
    kernels = native_kernels() if queries else None
    outs: list[torch.Tensor | None] = [None] * len(queries)
    groups: dict[tuple, list[int]] = {}  # segments the kernel can take, by (H, H_kv, D)
    for i, (q, k, v) in enumerate(zip(queries, keys, values)):
        if kernels is not None and _native_usable(q, k, v, kernels):
            groups.setdefault((q.shape[1], k.shape[1], q.shape[-1]), []).append(i)
    for (H, Hkv, D), members in groups.items():
        scale = D**-0.5 if scaling is None else scaling
        attended = _native(kernels, [queries[i] for i in members], [keys[i] for i in members],
                           [values[i] for i in members], [views[i] for i in members], H, Hkv, D, scale)
        for i, out in zip(members, attended):
            outs[i] = out
    for i, (q, k, v) in enumerate(zip(queries, keys, values)):
        if outs[i] is None:
            if views[i] is not None:
                k, v = _view_rows(k, views[i]), _view_rows(v, views[i])
            outs[i] = torch_decode_attention(q, k, v, scaling)
    return outs


def _view_rows(x: torch.Tensor, view) -> torch.Tensor:
    """The view's rows of x ``(1, H_kv, N, D)``, copied out: ``(1, H_kv, L + N - tail, D)``."""
    idx = view_indices(*view, x.shape[2])
    h = idx.shape[0]
    return torch.gather(x, 2, idx.view(1, h, -1, 1).expand(1, h, idx.shape[1], x.shape[-1]))


def _native_usable(q, k, v, kernels) -> bool:
    if q.device.type != "cpu" or q.dim() != 4 or k.dim() != 4:
        return False
    _, H, _, D = q.shape
    Hkv = k.shape[1]
    if H % Hkv or q.shape != (1, H, 1, D) or k.shape[0] != 1 or k.shape[-1] != D or v.shape != k.shape:
        return False
    if q.stride(-1) != 1:  # each head's D values packed (heads may be strided, as in a packed step)
        return False
    if not (q.dtype == k.dtype == v.dtype == torch.float32) or k.shape[2] < 1:
        return False
    # Within a head, tokens follow each other densely (a store or view buffer's slice).
    if k.stride(-1) != 1 or v.stride(-1) != 1 or k.stride(-2) != D or v.stride(-2) != D:
        return False
    return bool(kernels.decode_attention_supported(H // Hkv, D))


def _native(kernels, queries, keys, values, views, H: int, Hkv: int, D: int, scale: float) -> list[torch.Tensor]:
    S = len(queries)
    out = torch.empty(S, 1, H, 1, D)
    i64s, ptrs = ctypes.c_int64 * S, ctypes.c_void_p * S
    # A view's length is its selected rows plus the tokens from `tail` on.
    lens = i64s(*(k.shape[2] if view is None else view[0].shape[1] + k.shape[2] - view[1] for k, view in zip(keys, views)))
    threads = torch.get_num_threads()
    scratch = scratch_buffer(kernels.decode_attention_scratch_floats(S, lens, Hkv, H // Hkv, D, threads))
    rows = [None if view is None else view[0].contiguous() for view in views]
    row = H * D * out.element_size()
    kernels.decode_attention(
        S, lens, i64s(*(q.stride(1) for q in queries)), i64s(*(k.stride(1) for k in keys)), i64s(*(v.stride(1) for v in values)),
        ptrs(*(q.data_ptr() for q in queries)), ptrs(*(k.data_ptr() for k in keys)),
        ptrs(*(v.data_ptr() for v in values)), ptrs(*(out.data_ptr() + i * row for i in range(S))),
        ptrs(*(r.data_ptr() if r is not None else None for r in rows)),
        i64s(*(r.shape[1] if r is not None else 0 for r in rows)),
        i64s(*(view[1] if view is not None else 0 for view in views)),
        Hkv, H // Hkv, D, scale, scratch.data_ptr(), threads,
    )
    return list(out.unbind(0))
