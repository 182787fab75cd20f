"""Sparse prefill attention over vertical and slash lines (SPEC section 1, step 5).

Computes, for all n new rows, the exact softmax attention restricted to the cells of a
:class:`~loopserve.attention.lines.LinePattern`: the union of its vertical columns and
slash diagonals, each cell counted once, causal cells only. The full n x N score
matrix is never built.

CPU design, per KV head (the query heads of a GQA group share every gather):

* **Verticals** are the same keys for every row: gather them once and run fused
  attention of a block of rows against them. Verticals are sorted, so a block only
  uses the prefix of verticals that is causal for some of its rows, and only the tail
  of that prefix needs a mask.
* **Slashes** hit a different key in every row, but the C rows of a chunk read, at
  offset ``o``, the *contiguous* keys ``pos - o .. pos - o + C - 1``. Runs of nearby
  offsets (the local band above all) are therefore computed as small dense windows:
  per chunk of C rows, keys ``pos_first - hi .. pos_last - lo`` for a run ``lo..hi``,
  with the cells that are not selected diagonals masked. All windows of a head are
  concatenated and computed in one fused call batched over chunks.
* **Isolated slashes** would waste a whole window each; they are computed per offset
  on contiguous slices of K and V (no gather), one vectorised step per offset.
  Which offsets go where is decided by a tiny cost model (:func:`_split_slashes`).
* A vertical cell that also lies on a chosen slash is masked in the vertical part (the
  slash parts own it), so each cell enters the softmax exactly once.
* Each part returns its output and row log-sum-exp; parts are merged exactly in fp32:
  ``out = sum_p exp(lse_p - lse) out_p`` with ``lse = logsumexp_p lse_p``.

The fused part is PyTorch's CPU flash-attention kernel
(``aten._scaled_dot_product_flash_attention_for_cpu``, the kernel behind
``F.scaled_dot_product_attention`` on CPU), used because it also returns the
log-sum-exp needed for the merge. Where it is unavailable a plain matmul/softmax path
gives the same result. Matmuls run in the input dtype (fp32 or bf16); softmax
statistics and the merge are fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .lines import LinePattern

__all__ = ["dense_prefill_attention", "sparse_prefill_attention"]

# Cost model (per row, in units of one windowed cell), measured on a 2-core AVX-512 CPU
# with benchmarks/prefill_attention_kernel.py: a windowed cell costs ~5 ns in the fused
# kernel, an isolated slash cell ~35-40 ns on the slice path; a window also pays a small
# fixed cost (mask, indices).
_SLICE_CELL_COST = 8.0
_WINDOW_FIXED_COST = 4.0

_flash_cpu = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


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
    # 4-D (batch, heads, rows, dim) inputs: only then does CPU SDPA take its fused flash
    # kernel; 3-D inputs fall back to the unfused math path that materialises n x N.
    q4, k4, v4 = q[None], kr[None], vr[None]
    if n == N:
        out = F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, scale=scale)
    else:
        mask = torch.ones(n, N, dtype=torch.bool).tril(N - n)
        out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask, scale=scale)
    return out[0]


# --------------------------------------------------------------------------------------
# Fused attention with log-sum-exp
# --------------------------------------------------------------------------------------


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with row log-sum-exp.

    q ``(B, G, L, D)``; k, v ``(B, 1, S, D)`` (shared by the G heads); ``mask`` additive,
    ``(B, 1, L, S)`` in q's dtype, or None. Returns out ``(B, G, L, D)`` and lse
    ``(B, G, L)`` (fp32). Rows whose cells are all masked are not meaningful; callers
    track them separately.
    """
    B, G, L, D = q.shape
    S = k.shape[2]
    if _flash_cpu is not None and q.device.type == "cpu":
        try:
            return _flash_cpu(q, k.expand(B, G, S, D), v.expand(B, G, S, D), attn_mask=mask, scale=scale)
        except (RuntimeError, NotImplementedError):  # pragma: no cover - older/odd builds
            pass
    s = torch.matmul(q, k.transpose(-1, -2)).float().mul_(scale)  # pragma: no cover
    if mask is not None:  # pragma: no cover
        s = s + mask.float()
    lse = torch.logsumexp(s, -1)  # pragma: no cover
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])  # pragma: no cover
    return torch.matmul(p.to(q.dtype), v), lse  # pragma: no cover


# --------------------------------------------------------------------------------------
# Per-head plan
# --------------------------------------------------------------------------------------


def _split_slashes(offsets: list[int], chunk: int) -> tuple[list[tuple[int, int]], list[int]]:
    """Split sorted offsets into windowed runs ``(lo, hi)`` and isolated (sliced) offsets.

    Dynamic programme over the sorted offsets minimising the per-row cost: a window
    covering offsets ``lo..hi`` costs ``chunk + hi - lo + fixed`` cells, a sliced offset
    ``_SLICE_CELL_COST``. Windows take contiguous runs of the sorted list, so
    ``best[i] = min(best[i-1] + slice, min_j best[j-1] + chunk + o_i - o_j + fixed)``
    and the inner minimum is a running minimum: O(m).
    """
    m = len(offsets)
    best = [0.0] * (m + 1)
    choice: list[int] = [0] * (m + 1)  # start index of the window ending at i, or -1
    run_min, run_arg = math.inf, 0
    for i in range(1, m + 1):
        o = offsets[i - 1]
        if best[i - 1] - o < run_min:
            run_min, run_arg = best[i - 1] - o, i
        window = run_min + chunk + o + _WINDOW_FIXED_COST
        sliced = best[i - 1] + _SLICE_CELL_COST
        if window <= sliced:
            best[i], choice[i] = window, run_arg
        else:
            best[i], choice[i] = sliced, -1
    runs, isolated = [], []
    i = m
    while i > 0:
        if choice[i] < 0:
            isolated.append(offsets[i - 1])
            i -= 1
        else:
            j = choice[i]
            runs.append((offsets[j - 1], offsets[i - 1]))
            i = j - 1
    return runs[::-1], isolated[::-1]


@dataclass
class _HeadPlan:
    """Everything about one pattern head that does not depend on the row block."""

    vertical: torch.Tensor  # sorted key indices
    is_slash: torch.Tensor  # (N,) bool: offset is a selected slash
    win_rel: torch.Tensor  # (L,) window column -> key offset from the chunk's first row position
    win_band: torch.Tensor  # (C, L) bool: window cell is a selected diagonal
    windows: list[tuple[int, int]]  # windowed offset runs (lo, hi)
    sliced: list[int]  # isolated offsets
    pad_front: int  # K/V are padded with this many zero rows in front (>= max offset)


def _plan_head(vertical: torch.Tensor, slash: torch.Tensor, N: int, chunk: int) -> _HeadPlan:
    vertical = vertical.to(torch.long)
    is_slash = torch.zeros(N, dtype=torch.bool)
    is_slash[slash.to(torch.long)] = True
    windows, sliced = _split_slashes(sorted(set(slash.tolist())), chunk)
    rel, bands = [], []
    row = torch.arange(chunk)[:, None]
    for lo, hi in windows:
        t = torch.arange(chunk + hi - lo)
        rel.append(t - hi)  # column t of a chunk holds key pos(first row) - hi + t
        offset = hi - (t[None, :] - row)  # (C, W): row l meets offset hi - (t - l) at column t
        bands.append(is_slash[offset.clamp(lo, hi)] & (offset >= lo) & (offset <= hi))
    win_rel = torch.cat(rel) if rel else torch.zeros(0, dtype=torch.long)
    win_band = torch.cat(bands, 1) if bands else torch.zeros(chunk, 0, dtype=torch.bool)
    pad_front = int(slash.max()) if len(slash) else 0
    return _HeadPlan(vertical, is_slash, win_rel, win_band, windows, sliced, pad_front)


# --------------------------------------------------------------------------------------
# Parts
# --------------------------------------------------------------------------------------


def _vertical_part(qb, kvert, vvert, plan: _HeadPlan, p0, scale):
    """Fused attention of the block's rows over the causal prefix of the verticals.

    Cells that also lie on a selected slash are masked here (the slash parts own them),
    so every cell is counted once; this check is (rows x verticals), cheaper than doing
    it in the slash windows.
    """
    G, R, D = qb.shape
    vert = plan.vertical
    rows = p0 + torch.arange(R)
    n_hi = int(torch.searchsorted(vert, p0 + R - 1, right=True))
    if n_hi == 0:
        return None
    offset = rows[:, None] - vert[None, :n_hi]  # (R, n_hi)
    drop = (offset < 0) | plan.is_slash[offset.clamp(0, len(plan.is_slash) - 1)]
    mask = None
    if bool(drop.any()):
        mask = torch.zeros(R, n_hi, dtype=qb.dtype).masked_fill_(drop, -math.inf)[None, None]
    out, lse = _attend(qb[None], kvert[None, None, :n_hi], vvert[None, None, :n_hi], mask, scale)
    return out[0], lse[0], ~drop.all(-1)


def _window_part(qb, kpad, vpad, plan: _HeadPlan, p0, chunk, scale):
    """All slash windows of the head, one fused call batched over chunks of rows."""
    G, R, D = qb.shape
    n_chunks = R // chunk
    starts = p0 + chunk * torch.arange(n_chunks)  # position of each chunk's first row
    idx = plan.pad_front + starts[:, None] + plan.win_rel[None, :]  # (n_chunks, L) into padded K
    L = idx.shape[1]
    if p0 - plan.windows[-1][1] >= 0:
        # No key before position 0 in this block: the same band mask for every chunk.
        band = torch.zeros(1, 1, chunk, L, dtype=qb.dtype).masked_fill_(~plan.win_band, -math.inf)
        mask = band.expand(n_chunks, 1, chunk, L)
        has = torch.ones(R, dtype=torch.bool)
    else:
        allowed = plan.win_band[None] & (idx >= plan.pad_front)[:, None, :]  # (n_chunks, C, L)
        mask = torch.zeros(allowed.shape, dtype=qb.dtype).masked_fill_(~allowed, -math.inf)[:, None]
        has = allowed.any(-1).view(R)
    qc = qb.view(G, n_chunks, chunk, D).transpose(0, 1)
    flat = idx.flatten()
    kw = kpad.index_select(0, flat).view(n_chunks, 1, L, D)
    vw = vpad.index_select(0, flat).view(n_chunks, 1, L, D)
    out, lse = _attend(qc, kw, vw, mask, scale)
    # (n_chunks, G, C, .) -> (G, R, .)
    return out.transpose(0, 1).reshape(G, R, D), lse.transpose(0, 1).reshape(G, R), has


def _sliced_part(qb, kf, vf, plan: _HeadPlan, p0, scale):
    """Isolated slashes: per offset, the rows' keys are one contiguous slice of K.

    Each offset is one vectorised multiply-reduce over the block (no gather, no copy of
    K); ~6x the cost of a windowed cell, so only offsets far from any other come here.
    ``kf``/``vf`` are the padded K/V in fp32.
    """
    G, R, D = qb.shape
    offs = plan.sliced
    rows = p0 + torch.arange(R)
    qf = qb.float() * scale
    s = torch.empty(len(offs), G, R)  # offset-major: each step writes one contiguous slab
    tmp = torch.empty(G, R, D)
    for t, o in enumerate(offs):
        a = plan.pad_front + p0 - o
        torch.sum(torch.mul(qf, kf[a : a + R], out=tmp), -1, out=s[t])
    ok = rows[None, None, :] >= torch.tensor(offs)[:, None, None]  # key >= 0
    s.masked_fill_(~ok, -math.inf)
    m = s.amax(0)
    m_safe = torch.where(torch.isinf(m), 0.0, m)
    s.sub_(m_safe).exp_()
    denom = s.sum(0)
    acc = torch.zeros(G, R, D)
    for t, o in enumerate(offs):
        a = plan.pad_front + p0 - o
        acc.addcmul_(s[t, :, :, None], vf[a : a + R])
    out = acc.div_(denom.clamp_min(1e-30)[..., None])
    return out, m_safe + torch.log(denom), ok.any(0)[0]


def _merge(parts, dtype):
    """Exact merge of partial attentions by their log-sum-exp (rows without cells -> 0)."""
    full = [bool(has.all()) for _, _, has in parts]
    if len(parts) == 1:
        out, _, has = parts[0]
        return (out if full[0] else torch.where(has[None, :, None], out, 0)).to(dtype)
    lses = torch.stack([lse if f else torch.where(has[None, :], lse, -math.inf) for (_, lse, has), f in zip(parts, full)])
    total = torch.logsumexp(lses, 0)
    if not all(full):
        total = torch.where(torch.isinf(total), 0.0, total)
    out = None
    for (o, _, has), lse, f in zip(parts, lses, full):
        w = torch.exp(lse - total).unsqueeze(-1)
        term = o.float() * w if f else torch.where(has[None, :, None], o.float(), 0.0) * w
        out = term if out is None else out.add_(term)
    return out.to(dtype)


def sparse_prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: LinePattern,
    *,
    scale: float | None = None,
    block: int = 2048,
    chunk: int = 32,
) -> torch.Tensor:
    """Exact softmax attention of the n new rows over exactly the pattern's cells.

    q ``(H, n, D)``; k, v ``(H_kv, N, D)`` with the new tokens' keys last (row r sits
    at key position ``N - n + r``). ``pattern`` has one head per KV head (shared by its
    query heads) or, if ``pattern.per_query_head``, one per query head. Returns
    ``(H, n, D)`` in the dtype of ``q``; softmax statistics are fp32. Rows with no
    selected cell (only possible for degenerate patterns) get zeros.

    ``block`` rows are processed at a time (memory ~ block x lines); ``chunk`` is the
    row-chunk height of the slash windows (smaller: less waste, less efficient matmuls).
    """
    H, n, D = q.shape
    Hkv, N, _ = k.shape
    if pattern.n != n or pattern.N != N:
        raise ValueError(f"pattern is for n={pattern.n}, N={pattern.N}; inputs have n={n}, N={N}")
    G = H // Hkv
    heads = H if pattern.per_query_head else Hkv
    if pattern.n_heads != heads:
        raise ValueError(f"pattern has {pattern.n_heads} heads, expected {heads}")
    scale = D**-0.5 if scale is None else float(scale)
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
        # Zero padding: in front so that pos - offset >= 0 indexes, behind for padded rows.
        front = kh.new_zeros(plan.pad_front, D)
        back = kh.new_zeros(2 * chunk, D)
        kpad, vpad = torch.cat([front, kh, back]), torch.cat([front, vh, back])
        kvert, vvert = kh[plan.vertical], vh[plan.vertical]
        kf, vf = (kpad.float(), vpad.float()) if plan.sliced else (None, None)
        qs = q[qh]
        if n_pad > n:
            qs = torch.cat([qs, qs.new_zeros(qs.shape[0], n_pad - n, D)], 1)
        for r0 in range(0, n_pad, block):
            qb = qs[:, r0 : r0 + block]
            p0 = off + r0
            parts = []
            if len(plan.vertical):
                part = _vertical_part(qb, kvert, vvert, plan, p0, scale)
                if part is not None:
                    parts.append(part)
            if plan.windows:
                parts.append(_window_part(qb, kpad, vpad, plan, p0, chunk, scale))
            if plan.sliced:
                parts.append(_sliced_part(qb, kf, vf, plan, p0, scale))
            if parts:
                out[qh, r0 : r0 + block] = _merge(parts, dtype)
            else:
                out[qh, r0 : r0 + block] = 0
    return out[:, :n]
