"""Triton kernel: decode attention over a selected view of the KV store (SPEC section 2).

Phase 2 decodes over the top-B input keys of each KV head (plus sinks, recent and
generated tokens): store indices ``idx (H_kv, L)``. This kernel reads those rows of the
full store directly -- the gather and the attention in one pass, no compact copy -- for
the few query rows of a decode step. Every query row attends every view key (the view
already holds only keys at or before the decoded token).

Design (flash-decoding): one program per (KV head, split of the view). The G query heads
of the KV head and the T query rows are stacked into one tile of rows, so each gathered
K/V row serves the whole GQA group; a split walks its ``L / splits`` indices
``BLOCK_N`` at a time with an online softmax (fp32) and writes a partial output and
log-sum-exp; the splits are merged exactly by their log-sum-exp. Splitting the view keeps
the GPU busy when H_kv x T is far below its core count. Matmuls: as in
:mod:`loopserve.kernels.vertical_slash` (IEEE fp32, or bf16/fp16 with the probabilities
split in two terms, see :func:`~loopserve.kernels.launch.dot_flags`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import check_attention_inputs, check_blocks, dot_flags, interpreted, next_pow2, num_warps
from .online_softmax import dot, online_softmax_step

__all__ = ["INTERPRETED", "view_decode_attention"]


@triton.jit
def _view_decode_kernel(
    Q, K, V, Idx, OutPart, LsePart,
    scale, T, L, G, split_len,
    stride_qh, stride_qt, stride_kh, stride_kn, stride_vh, stride_vn, stride_ih,
    stride_oh, stride_ot, stride_os, stride_lh, stride_lt,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    UPCAST: tl.constexpr, SPLIT_P: tl.constexpr,
):
    kvh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    m = tl.arange(0, BLOCK_M)
    g = m // T
    t = m % T
    row_ok = g < G
    qh = kvh * G + g
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + qh[:, None] * stride_qh + t[:, None] * stride_qt + d[None, :], mask=row_ok[:, None], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, L)
    for start in range(lo, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        live = pos < hi
        j = tl.load(Idx + kvh * stride_ih + pos, mask=live, other=0).to(tl.int64)
        kt = tl.load(K + kvh * stride_kh + j[:, None] * stride_kn + d[None, :], mask=live[:, None], other=0.0)
        vt = tl.load(V + kvh * stride_vh + j[:, None] * stride_vn + d[None, :], mask=live[:, None], other=0.0)
        s = dot(q, tl.trans(kt), UPCAST) * scale
        m_i, l_i, acc = online_softmax_step(s, row_ok[:, None] & live[None, :], vt, m_i, l_i, acc, UPCAST, SPLIT_P)
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(OutPart + qh[:, None] * stride_oh + t[:, None] * stride_ot + split * stride_os + d[None, :], out,
             mask=row_ok[:, None])
    tl.store(LsePart + qh * stride_lh + t * stride_lt + split, lse, mask=row_ok)


INTERPRETED = interpreted(_view_decode_kernel)


def view_decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor,
    *,
    scale: float | None = None,
    splits: int | None = None,
    block_keys: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of T decode query rows over the store rows ``idx`` of each KV head.

    q ``(H, T, D)``; k, v ``(H_kv, N, D)`` (the store); ``idx (H_kv, L)`` store indices
    (any order; a repeated index counts twice, as it would in a gathered copy). Returns
    the output ``(H, T, D)`` in q's dtype and the log-sum-exp ``(H, T)`` fp32.
    ``splits`` partitions of the view run in parallel (default: enough for ~128
    programs, at least ``block_keys`` keys each).
    """
    check_attention_inputs(q, k, v)
    H, T, D = q.shape
    Hkv = k.shape[0]
    if idx.dim() != 2 or idx.shape[0] != Hkv or idx.shape[1] == 0:
        raise ValueError(f"idx must be (H_kv={Hkv}, L >= 1) store indices; got {tuple(idx.shape)}")
    L = idx.shape[1]
    check_blocks(block_keys=block_keys)
    G = H // Hkv
    scale = D**-0.5 if scale is None else float(scale)
    if splits is None:
        splits = max(1, min(-(-128 // Hkv), L // block_keys))
    split_len = -(-L // splits)
    splits = -(-L // split_len)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    idx = idx.to(device=q.device, dtype=torch.int32).contiguous()
    block_m = max(16, next_pow2(G * T))
    out_part = torch.empty(H, T, splits, D, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(H, T, splits, dtype=torch.float32, device=q.device)
    _view_decode_kernel[(Hkv, splits)](
        q, k, v, idx, out_part, lse_part,
        scale, T, L, G, split_len,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), idx.stride(0),
        out_part.stride(0), out_part.stride(1), out_part.stride(2), lse_part.stride(0), lse_part.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_keys, HEAD_DIM=D,
        **dot_flags(_view_decode_kernel, q.dtype), num_warps=num_warps(block_m, D),
    )
    # Exact merge of the splits (every split holds at least one key, so lse is finite).
    lse = torch.logsumexp(lse_part, dim=-1)
    out = (out_part * torch.exp(lse_part - lse[..., None])[..., None]).sum(dim=2)
    return out.to(q.dtype), lse
