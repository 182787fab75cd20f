"""Sparse prefill attention over vertical and slash lines (SPEC section 1, step 5).

Computes, for all n new rows, the exact softmax attention restricted to the cells of a
:class:`~loopserve.attention.lines.LinePattern`: the union of its vertical columns and
slash diagonals, each cell counted once, causal cells only. The full n x N score
matrix is never built.

CPU design (why it is fast):

* **Verticals** are the same keys for every row: gather them once per KV head and use a
  plain matmul ``q_rows @ K[vertical]^T`` for all query heads of the group. Verticals
  are sorted, so a block of rows only multiplies the prefix of verticals that is causal
  for some row of the block and masks just the tail.
* **Slashes** hit a different key in every row, but rows ``i..i+C-1`` at offset ``o``
  read the *contiguous* keys ``pos_i - o .. pos_i - o + C - 1``. Runs of nearby offsets
  (the local band above all) are therefore computed as small dense windows: for each
  chunk of C rows one ``C x (C + w - 1)`` block, taken as a strided view of K (no
  gather) and batched over chunks in one matmul; cells of the window that are not
  selected diagonals are masked. The waste is ``(C + w - 1) / #offsets``.
* **Isolated slashes**, far from any other, would waste a whole window each; they are
  gathered per row instead (``K[pos_i - o]``) and scored with a batched matmul.
* A slash cell whose key is also a chosen vertical is masked in the slash part (the
  vertical part owns it), so each cell enters the softmax once.
* The parts are merged with an online (flash-style) softmax in fp32: a running row
  max, a running denominator and an fp32 accumulator. Matmuls run in the input dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .lines import LinePattern

__all__ = ["dense_prefill_attention", "sparse_prefill_attention"]

# Relative per-cell cost of a gathered slash cell vs a windowed (dense block) cell,
# measured on a 2-core AVX-512 CPU (benchmarks/prefill_attention_kernel.py). A run of
# offsets goes to the window path when its window is cheaper than gathering its cells.
_GATHER_COST = 6.0
# Bound on gathered K (or V) elements per sub-chunk, to stay in cache.
_GATHER_ELEMS = 1 << 19


def dense_prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None
) -> torch.Tensor:
    """Dense causal attention of the n new rows over all N keys (reference, fallback).

    q ``(H, n, D)``, k/v ``(H_kv, N, D)``; row r sits at key position ``N - n + r``.
    Uses SDPA with GQA-repeated K/V; ``is_causal`` when there is no history, else an
    explicit offset causal mask.
    """
    H, n, D = q.shape
    Hkv, N, _ = k.shape
    G = H // Hkv
    kr = k.repeat_interleave(G, 0) if G > 1 else k
    vr = v.repeat_interleave(G, 0) if G > 1 else v
    if n == N:
        return F.scaled_dot_product_attention(q, kr, vr, is_causal=True, scale=scale)
    mask = torch.ones(n, N, dtype=torch.bool).tril(N - n)
    return F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask, scale=scale)


@dataclass
class _Window:
    """A run of nearby slash offsets ``lo..hi`` computed as dense C x W windows."""

    lo: int
    hi: int
    band: torch.Tensor  # (C, W) bool: window cell (l, t) is a selected diagonal


@dataclass
class _HeadPlan:
    vertical: torch.Tensor  # sorted key indices
    windows: list[_Window]
    gathered: torch.Tensor  # isolated slash offsets, sorted
    pad_front: int  # K/V are padded with this many zero rows in front (>= max offset)
    key_ok: torch.Tensor  # (pad_front + N + pad_back,) bool: real key not owned by a vertical


def _plan_head(vertical: torch.Tensor, slash: torch.Tensor, N: int, chunk: int) -> _HeadPlan:
    """Split one head's slashes into dense windows and gathered isolated offsets.

    Sorted offsets are grouped into runs while the gap to the next offset is at most
    ``chunk`` (a new window would cost ~chunk extra columns per row anyway). A run of
    ``m`` offsets spanning ``w`` costs ``chunk + w - 1`` window cells per row against
    ``_GATHER_COST * m`` for gathering, and takes the cheaper path.
    """
    vertical = vertical.to(torch.long)
    offsets = slash.to(torch.long).tolist()
    runs: list[list[int]] = []
    for o in offsets:
        if runs and o - runs[-1][-1] <= chunk:
            runs[-1].append(o)
        else:
            runs.append([o])
    windows, gathered = [], []
    for run in runs:
        lo, hi, m = run[0], run[-1], len(run)
        if chunk + (hi - lo) <= _GATHER_COST * m:
            width = chunk + hi - lo
            rel = torch.zeros(hi - lo + 1, dtype=torch.bool)
            rel[torch.tensor(run) - lo] = True  # rel[t] <-> offset hi - t
            rel = rel.flip(0)
            # Row l of a chunk meets offset o at window column l + (hi - o).
            t_minus_l = torch.arange(width)[None, :] - torch.arange(chunk)[:, None]
            band = (t_minus_l >= 0) & (t_minus_l <= hi - lo)
            band &= rel[t_minus_l.clamp(0, hi - lo)]
            windows.append(_Window(lo, hi, band))
        else:
            gathered.extend(run)
    pad_front = max(offsets, default=0)
    pad_back = chunk
    key_ok = torch.zeros(pad_front + N + pad_back, dtype=torch.bool)
    key_ok[pad_front : pad_front + N] = True
    key_ok[pad_front + vertical] = False  # vertical part owns these cells
    return _HeadPlan(vertical, windows, torch.tensor(gathered, dtype=torch.long), pad_front, key_ok)


class _OnlineSoftmax:
    """Running max / denominator / fp32 accumulator for one block of rows, (G, R) rows."""

    def __init__(self, G: int, R: int, D: int) -> None:
        self.m = torch.full((G, R), -math.inf)
        self.l = torch.zeros(G, R)
        self.acc = torch.zeros(G, R, D)

    def absorb(self, scores: torch.Tensor, pv, rows: slice = slice(None)) -> None:
        """Merge fp32 ``scores`` (G, r, c) of rows ``rows``; ``pv(p)`` returns p @ values."""
        m_old = self.m[:, rows]
        m_new = torch.maximum(m_old, scores.amax(-1))
        m_safe = torch.where(torch.isinf(m_new), 0.0, m_new)  # rows with no cell yet
        rescale = torch.exp(m_old - m_safe)
        p = torch.exp(scores - m_safe[..., None])
        self.l[:, rows] = self.l[:, rows] * rescale + p.sum(-1)
        acc = self.acc[:, rows]
        acc.mul_(rescale[..., None]).add_(pv(p))
        self.m[:, rows] = m_new

    def result(self, dtype: torch.dtype) -> torch.Tensor:
        # Rows without any selected cell (only possible for degenerate patterns) give 0.
        return (self.acc / self.l.clamp_min(1e-30)[..., None]).to(dtype)


def _attend_block(
    qb: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kpad: torch.Tensor,
    vpad: torch.Tensor,
    kvert: torch.Tensor,
    vvert: torch.Tensor,
    plan: _HeadPlan,
    p0: int,
    chunk: int,
) -> torch.Tensor:
    """Attention of one block of rows (absolute positions ``p0 .. p0 + R - 1``).

    ``qb`` is ``(G, R, D)`` pre-scaled, R a multiple of ``chunk`` (padded rows are
    computed and discarded by the caller).
    """
    G, R, D = qb.shape
    dtype = qb.dtype
    state = _OnlineSoftmax(G, R, D)
    row_pos = p0 + torch.arange(R)

    # Verticals: only the prefix j <= last row's position can be causal for this block.
    vert = plan.vertical
    n_hi = int(torch.searchsorted(vert, p0 + R - 1, right=True))
    if n_hi:
        n_lo = int(torch.searchsorted(vert, p0, right=True))  # causal for every row
        kv_, vv_ = kvert[:n_hi], vvert[:n_hi]
        s = (qb @ kv_.T).float()
        if n_hi > n_lo:
            s[..., n_lo:].masked_fill_(vert[None, n_lo:n_hi] > row_pos[:, None], -math.inf)
        state.absorb(s, lambda p: p.to(dtype) @ vv_)

    # Windows: chunk c of rows, run lo..hi, reads keys p0 + c*C - hi + t, t < C + hi - lo.
    n_chunks = R // chunk
    qc = qb.view(G, n_chunks, chunk, D)
    for w in plan.windows:
        width = chunk + w.hi - w.lo
        start = plan.pad_front + p0 - w.hi  # index into the padded K/V
        shape, stride = (n_chunks, width, D), (chunk * D, D, 1)
        kw = kpad.as_strided(shape, stride, start * D)
        vw = vpad.as_strided(shape, stride, start * D)
        key_ok = plan.key_ok.as_strided((n_chunks, width), (chunk, 1), start)
        allowed = w.band[None, :, :] & key_ok[:, None, :]  # (n_chunks, C, W)
        s = torch.matmul(qc, kw.transpose(1, 2)).float()  # (G, n_chunks, C, W)
        s.masked_fill_(~allowed, -math.inf)
        s = s.view(G, R, width)
        state.absorb(s, lambda p: torch.matmul(p.view(G, n_chunks, chunk, width).to(dtype), vw).view(G, R, D))

    # Isolated slashes: gather K/V rows per (row, offset), in cache-sized sub-chunks.
    offs = plan.gathered
    if len(offs):
        sub = max(chunk, _GATHER_ELEMS // (len(offs) * D) // chunk * chunk)
        qr = qb.transpose(0, 1)  # (R, G, D)
        for a in range(0, R, sub):
            b = min(R, a + sub)
            idx = plan.pad_front + row_pos[a:b, None] - offs[None, :]  # (r, m) padded index
            ok = plan.key_ok[idx]
            kg = kpad[idx]  # (r, m, D)
            s = torch.bmm(qr[a:b], kg.transpose(1, 2)).float()  # (r, G, m)
            s.masked_fill_(~ok[:, None, :], -math.inf)
            vg = vpad[idx]
            state.absorb(
                s.transpose(0, 1),
                lambda p: torch.bmm(p.transpose(0, 1).to(dtype), vg).transpose(0, 1),
                rows=slice(a, b),
            )
    return state.result(dtype)


def sparse_prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: LinePattern,
    *,
    scale: float | None = None,
    block: int = 1024,
    chunk: int = 64,
) -> torch.Tensor:
    """Exact softmax attention of the n new rows over exactly the pattern's cells.

    q ``(H, n, D)``; k, v ``(H_kv, N, D)`` with the new tokens' keys last (row r sits
    at key position ``N - n + r``). ``pattern`` has one head per KV head (shared by its
    query heads) or, if ``pattern.per_query_head``, one per query head. Returns
    ``(H, n, D)`` in the dtype of ``q``; scores and softmax are accumulated in fp32.

    ``block`` rows are processed at a time (bounds memory to block x lines); ``chunk``
    is the row-chunk height of the slash windows.
    """
    H, n, D = q.shape
    Hkv, N, _ = k.shape
    if pattern.n != n or pattern.N != N:
        raise ValueError(f"pattern is for n={pattern.n}, N={pattern.N}; inputs have n={n}, N={N}")
    G = H // Hkv
    heads = H if pattern.per_query_head else Hkv
    if pattern.n_heads != heads:
        raise ValueError(f"pattern has {pattern.n_heads} heads, expected {heads}")
    scale = D**-0.5 if scale is None else scale
    block = max(chunk, block // chunk * chunk)
    off = N - n
    n_pad = -(-n // chunk) * chunk
    dtype = q.dtype

    out = torch.empty(H, n_pad, D, dtype=dtype)
    for h in range(heads):
        if pattern.per_query_head:
            qh, kvh = slice(h, h + 1), h // G
        else:
            qh, kvh = slice(h * G, (h + 1) * G), h
        plan = _plan_head(pattern.vertical[h], pattern.slash[h], N, chunk)
        kh, vh = k[kvh], v[kvh]
        zeros_f = kh.new_zeros(plan.pad_front, D)
        zeros_b = kh.new_zeros(chunk + n_pad - n, D)
        kpad = torch.cat([zeros_f, kh, zeros_b]).contiguous()
        vpad = torch.cat([zeros_f, vh, zeros_b]).contiguous()
        kvert, vvert = kh[plan.vertical], vh[plan.vertical]
        qs = (q[qh].float() * scale).to(dtype)
        if n_pad > n:
            qs = torch.cat([qs, qs.new_zeros(qs.shape[0], n_pad - n, D)], 1)
        for r0 in range(0, n_pad, block):
            r1 = min(n_pad, r0 + block)
            out[qh, r0:r1] = _attend_block(
                qs[:, r0:r1], kh, vh, kpad, vpad, kvert, vvert, plan, off + r0, chunk
            )
    return out[:, :n]
