"""Triton kernels: the attention mass each key receives from a few query rows (Phase 2 scoring).

Phase 2 re-scores every input key every n_d generated tokens (SPEC section 2): the softmax
attention of the buffered query rows, summed over the rows and over each KV head's query
heads (:func:`loopserve.cache.scoring.attention_scores`). In torch that materialises the
``(H_kv, G * w, N)`` logits and probabilities -- 256 MB per layer at 128k keys, G * w = 64.
Here nothing of size rows x N is stored:

1. ``_row_lse_kernel``: per (KV head, block of rows), the log-sum-exp of each row over
   all N keys (online, ``BLOCK_N`` keys at a time);
2. ``_key_mass_kernel``: per (KV head, block of keys), ``sum_rows exp(s - lse_row)``.

The G query heads of a KV head and the w rows are stacked into one row axis (each K tile
serves the whole group). With positions, a row at ``p`` only sees keys at positions
``<= p`` (the prefill probe's causal rule). Scores are fp32 (IEEE dots for fp32 inputs,
exact-product upcast dots for bf16/fp16 under the interpreter, bf16 dots on the GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import check_attention_inputs, check_blocks, dot_flags, interpreted, num_warps
from .online_softmax import dot

__all__ = ["INTERPRETED", "key_attention_mass"]


@triton.jit
def _scores(Q, K, QPos, KPos, kvh, rows, cols, n_rows, w, N, G, scale,
            stride_qh, stride_qw, stride_kh, stride_kn, stride_kph,
            HAS_POS: tl.constexpr, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr):
    """Scaled scores of the stacked rows ``rows`` (query head ``kvh * G + row // w``, row
    ``row % w``) against keys ``cols``, and the mask of the cells that count."""
    d = tl.arange(0, HEAD_DIM)
    row_ok = rows < n_rows
    qh = kvh * G + rows // w
    qr = rows % w
    q = tl.load(Q + qh[:, None] * stride_qh + qr[:, None] * stride_qw + d[None, :], mask=row_ok[:, None], other=0.0)
    col_ok = cols < N
    k = tl.load(K + kvh * stride_kh + cols[:, None] * stride_kn + d[None, :], mask=col_ok[:, None], other=0.0)
    s = dot(q, tl.trans(k), UPCAST) * scale
    ok = row_ok[:, None] & col_ok[None, :]
    if HAS_POS:
        q_pos = tl.load(QPos + qr, mask=row_ok, other=0)
        k_pos = tl.load(KPos + kvh * stride_kph + cols, mask=col_ok, other=0)
        ok = ok & (k_pos[None, :] <= q_pos[:, None])
    return s, ok


@triton.jit
def _row_lse_kernel(
    Q, K, QPos, KPos, Lse,
    n_rows, w, N, G, scale,
    stride_qh, stride_qw, stride_kh, stride_kn, stride_kph, stride_lh,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    HAS_POS: tl.constexpr, UPCAST: tl.constexpr,
):
    kvh = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        s, ok = _scores(Q, K, QPos, KPos, kvh, rows, cols, n_rows, w, N, G, scale,
                        stride_qh, stride_qw, stride_kh, stride_kn, stride_kph, HAS_POS, HEAD_DIM, UPCAST)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
        m_i = m_new
    lse = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("inf"))  # +inf: no key, no mass
    tl.store(Lse + kvh * stride_lh + rows, lse, mask=rows < n_rows)


@triton.jit
def _key_mass_kernel(
    Q, K, QPos, KPos, Lse, Mass,
    n_rows, w, N, G, scale,
    stride_qh, stride_qw, stride_kh, stride_kn, stride_kph, stride_lh, stride_mh,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    HAS_POS: tl.constexpr, UPCAST: tl.constexpr,
):
    kvh = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mass = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, n_rows, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        s, ok = _scores(Q, K, QPos, KPos, kvh, rows, cols, n_rows, w, N, G, scale,
                        stride_qh, stride_qw, stride_kh, stride_kn, stride_kph, HAS_POS, HEAD_DIM, UPCAST)
        lse = tl.load(Lse + kvh * stride_lh + rows, mask=rows < n_rows, other=float("inf"))
        mass += tl.sum(tl.where(ok, tl.exp(s - lse[:, None]), 0.0), 0)
    tl.store(Mass + kvh * stride_mh + cols, mass, mask=cols < N)


INTERPRETED = interpreted(_row_lse_kernel)


def key_attention_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    q_pos: torch.Tensor | None = None,
    k_pos: torch.Tensor | None = None,
    *,
    block_rows: int = 64,
    block_keys: int = 64,
) -> torch.Tensor:
    """Softmax attention of the rows of ``q`` over ``k``, summed over rows and over each KV
    head's query heads: the mass each key receives, fp32 ``(H_kv, N)``.

    q ``(H, w, D)``, k ``(H_kv, N, D)``. With positions (``q_pos (w,)``, ``k_pos (N,)`` or
    ``(H_kv, N)``) a row only sees keys at or before its position.
    """
    check_attention_inputs(q, k, k)
    check_blocks(block_rows=block_rows, block_keys=block_keys)
    H, w, D = q.shape
    Hkv, N, _ = k.shape
    G = H // Hkv
    n_rows = G * w
    has_pos = q_pos is not None and k_pos is not None
    q, k = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k))
    if has_pos:
        q_pos = q_pos.to(q.device, torch.int64).contiguous()
        k_pos = k_pos.to(q.device, torch.int64).expand(Hkv, N).contiguous()
    else:
        q_pos = k_pos = torch.zeros(Hkv, 1, dtype=torch.int64, device=q.device)  # unused
    lse = torch.empty(Hkv, n_rows, dtype=torch.float32, device=q.device)
    mass = torch.empty(Hkv, N, dtype=torch.float32, device=q.device)
    common = (n_rows, w, N, G, scale, q.stride(0), q.stride(1), k.stride(0), k.stride(1), k_pos.stride(0))
    consts = dict(BLOCK_M=block_rows, BLOCK_N=block_keys, HEAD_DIM=D, HAS_POS=has_pos,
                  UPCAST=dot_flags(_row_lse_kernel, q.dtype)["UPCAST"], num_warps=num_warps(block_rows, D))
    _row_lse_kernel[(Hkv, triton.cdiv(n_rows, block_rows))](q, k, q_pos, k_pos, lse, *common, lse.stride(0), **consts)
    _key_mass_kernel[(Hkv, triton.cdiv(N, block_keys))](
        q, k, q_pos, k_pos, lse, mass, *common, lse.stride(0), mass.stride(0), **consts
    )
    return mass
