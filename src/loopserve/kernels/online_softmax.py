"""Triton device functions shared by the attention kernels: the dot product and one step of
the online softmax (FlashAttention's running max, denominator and output accumulator)."""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["dot", "online_softmax_step"]


@triton.jit
def dot(a, b, UPCAST: tl.constexpr):
    """``a @ b`` with fp32 accumulation; ``UPCAST``: in fp32 IEEE precision (exact products of
    bf16/fp16 operands, so the same result as their low-precision dot up to summation order)."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def online_softmax_step(s, ok, v, m_i, l_i, acc, UPCAST: tl.constexpr, SPLIT_P: tl.constexpr):
    """Fold one tile of scores ``s`` (masked by ``ok``) and its values ``v`` into the running
    max ``m_i``, denominator ``l_i`` and output accumulator ``acc`` (all fp32)."""
    s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # Rows without any cell so far keep m = -inf; subtract 0 there so exp() gives 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if SPLIT_P:
        # P in two low-precision terms (hi + lo, ~16 bits together): one rounding of P to
        # bf16 alone costs up to 2^-9 |v| per output, above the 2e-3 target at |v| ~ 4.
        p_hi = p.to(v.dtype)
        p_lo = (p - p_hi.to(tl.float32)).to(v.dtype)
        pv = dot(p_hi, v, UPCAST) + dot(p_lo, v, UPCAST)
    else:
        pv = dot(p, v, UPCAST)
    acc = acc * alpha[:, None] + pv
    return m_new, l_i, acc
