"""Triton kernel: sparse prefill attention over vertical and slash lines (SPEC section 1, step 5).

The GPU counterpart of :func:`loopserve.attention.sparse.sparse_prefill_attention`: the n
new rows (row r at key position ``N - n + r``) attend, with an exact softmax, to exactly
the cells of the pattern -- the union of the selected key columns (verticals) and
diagonals of offset ``o = pos - key`` (slashes), causal cells only, each cell counted
once -- over all N keys (cached history + new tokens). Returns the output and the row
log-sum-exp (natural log, fp32; ``-inf`` and a zero output for rows without a cell).

Design (one program = one block of ``BLOCK_R`` rows x the query heads of one pattern head):

* **GQA sharing.** A pattern head serves ``gq`` query heads (its GQA group, or 1 with
  per-query-head patterns). Their rows are stacked into one tile of ``GP * BLOCK_R`` rows
  (``GP`` = ``gq`` rounded up to a power of two), so every K/V tile is loaded once for
  the whole group and each matmul covers all of its heads.
* **Slashes as key tiles aligned to the row block** (the vertical-slash idea of
  MInference, made exact). For rows at positions ``p0 .. p0 + BLOCK_R - 1``, an offset
  ``o`` reads keys ``p0 - o ..``; with key tiles ``p0 + e * BLOCK_N ..`` the tiles that
  offset touches depend only on ``o``, not on the row block. So the set of tile indices
  ``e`` is computed once per head from its offsets, and every row block runs
  the same list (minus tiles wholly before key 0). A nearby run of offsets, the local
  band above all, shares its tiles. Inside a tile, a cell counts iff its diagonal is
  selected (``is_slash[pos - key]``, a gathered lookup) and its key is not a vertical.
* **Verticals** are gathered ``BLOCK_V`` key rows at a time (the head's sorted columns,
  only those at or before the block's last row), causal-masked per row. They own the
  cells they share with slashes, which is why the slash tiles mask vertical keys.
* One online softmax over both parts (fp32 statistics, no merge pass). Matmuls take the
  input dtype with fp32 accumulation: bf16/fp16 ``Q K^T`` is exact per product; for
  ``P @ V`` the probabilities are split into two bf16/fp16 terms (FlashAttention rounds
  them once, which alone costs up to ~2^-9 |v| per output, beyond the 2e-3 bf16 target),
  so a bf16 call is as exact as fp32 up to its inputs and its output rounding. fp32
  runs in IEEE precision (no TF32): ~1e-6 from the fp64 reference.

Index preparation (:func:`_prepare`) runs as a few torch ops on the tensors' device, its
size proportional to lines + row blocks, never n x N.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .launch import check_attention_inputs, check_blocks, dot_flags, interpreted, next_pow2, num_warps
from .online_softmax import dot, online_softmax_step

__all__ = ["INTERPRETED", "vertical_slash_attention"]


@triton.jit
def _vertical_slash_kernel(
    Q, K, V, Out, Lse,
    Vert, VertEnd, Tiles, TileStart, TileCount, IsSlash, IsVert,
    scale, n, N, gq, G,
    stride_qh, stride_qn, stride_kh, stride_kn, stride_vh, stride_vn, stride_oh, stride_on, stride_lh,
    stride_vert, stride_vend, stride_tiles, stride_tstart, stride_lines,
    GP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr, SPLIT_P: tl.constexpr,
):
    blk = tl.program_id(0)
    ph = tl.program_id(1)  # pattern head
    m = tl.arange(0, GP * BLOCK_R)
    g = m // BLOCK_R  # query head within the group
    r = blk * BLOCK_R + m % BLOCK_R  # new row
    row_ok = (g < gq) & (r < n)
    pos = N - n + r  # absolute key position of the row
    p0 = N - n + blk * BLOCK_R
    qh = (ph * gq + g).to(tl.int64)
    kvh = ((ph * gq) // G).to(tl.int64)
    d = tl.arange(0, HEAD_DIM)
    r64 = r.to(tl.int64)  # addresses in int64: strided views can exceed 2^31 elements
    q = tl.load(Q + qh[:, None] * stride_qh + r64[:, None] * stride_qn + d[None, :], mask=row_ok[:, None], other=0.0)
    k_base = K + kvh * stride_kh
    v_base = V + kvh * stride_vh

    m_i = tl.full([GP * BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([GP * BLOCK_R], tl.float32)
    acc = tl.zeros([GP * BLOCK_R, HEAD_DIM], tl.float32)

    # Verticals: the head's sorted key columns up to the block's last row.
    v_end = tl.load(VertEnd + ph * stride_vend + blk)
    for start in range(0, v_end, BLOCK_V):
        idx = start + tl.arange(0, BLOCK_V)
        live = idx < v_end
        j = tl.load(Vert + ph * stride_vert + idx, mask=live, other=0)
        j64 = j.to(tl.int64)
        kt = tl.load(k_base + j64[:, None] * stride_kn + d[None, :], mask=live[:, None], other=0.0)
        vt = tl.load(v_base + j64[:, None] * stride_vn + d[None, :], mask=live[:, None], other=0.0)
        s = dot(q, tl.trans(kt), UPCAST) * scale
        ok = row_ok[:, None] & live[None, :] & (j[None, :] <= pos[:, None])
        m_i, l_i, acc = online_softmax_step(s, ok, vt, m_i, l_i, acc, UPCAST, SPLIT_P)

    # Slashes: key tiles p0 + e * BLOCK_N .. (+ BLOCK_N - 1) for the head's tile indices e.
    t_end = tl.load(TileCount + ph)
    t_start = tl.load(TileStart + ph * stride_tstart + blk)
    cols = tl.arange(0, BLOCK_N)
    for t in range(t_start, t_end):
        e = tl.load(Tiles + ph * stride_tiles + t)
        j = p0 + e * BLOCK_N + cols
        k_in = (j >= 0) & (j < N)
        j64 = j.to(tl.int64)
        kt = tl.load(k_base + j64[:, None] * stride_kn + d[None, :], mask=k_in[:, None], other=0.0)
        vt = tl.load(v_base + j64[:, None] * stride_vn + d[None, :], mask=k_in[:, None], other=0.0)
        s = dot(q, tl.trans(kt), UPCAST) * scale
        offset = pos[:, None] - j[None, :]
        on_slash = tl.load(
            IsSlash + ph * stride_lines + offset, mask=row_ok[:, None] & k_in[None, :] & (offset >= 0), other=0
        )
        is_vert = tl.load(IsVert + ph * stride_lines + j, mask=k_in, other=1)
        ok = (on_slash != 0) & (is_vert == 0)[None, :]
        m_i, l_i, acc = online_softmax_step(s, ok, vt, m_i, l_i, acc, UPCAST, SPLIT_P)

    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(Out + qh[:, None] * stride_oh + r64[:, None] * stride_on + d[None, :], out.to(Out.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(Lse + qh * stride_lh + r, lse, mask=row_ok)


INTERPRETED = interpreted(_vertical_slash_kernel)


@dataclass
class _Indices:
    """Per pattern head: sorted verticals and slash tiles, and where each row block starts/ends in them."""

    vertical: torch.Tensor  # (P, max verticals) int32, sorted, padded with N
    vertical_end: torch.Tensor  # (P, row blocks) int32: verticals at or before the block's last row
    tiles: torch.Tensor  # (P, max tiles) int32: sorted tile indices e (padding after tile_count)
    tile_start: torch.Tensor  # (P, row blocks) int32: first tile not wholly before key 0
    tile_count: torch.Tensor  # (P,) int32
    is_slash: torch.Tensor  # (P, N) int8: offset selected
    is_vertical: torch.Tensor  # (P, N) int8: key selected as a vertical


def _padded(lines: Sequence[torch.Tensor], fill: int, device) -> torch.Tensor:
    """Lines as one ``(P, max len)`` int64 tensor padded with ``fill``."""
    width = max((len(x) for x in lines), default=0)
    out = torch.full((len(lines), max(width, 1)), fill, dtype=torch.long, device=device)
    for h, x in enumerate(lines):
        out[h, : len(x)] = torch.as_tensor(x, dtype=torch.long, device=device)
    return out


def _prepare(vertical, slash, n: int, N: int, block_r: int, block_n: int, device) -> _Indices:
    P = len(vertical)
    n_blocks = -(-n // block_r)
    heads = torch.arange(P, device=device)[:, None]
    first_pos = (N - n) + block_r * torch.arange(n_blocks, device=device)  # p0 of each row block
    last_pos = torch.clamp(first_pos + block_r - 1, max=N - 1)

    vert = _padded(vertical, N, device)
    vert = torch.where((vert >= 0) & (vert < N), vert, N).sort(dim=1).values
    vert[:, 1:].masked_fill_(vert[:, 1:] == vert[:, :-1], N)  # a repeated key counts once
    vert = vert.sort(dim=1).values  # padding and dropped keys (N) last: never causal
    vertical_end = torch.searchsorted(vert, last_pos.expand(P, -1).contiguous(), right=True)
    is_vertical = torch.zeros(P, N + 1, dtype=torch.int8, device=device)
    is_vertical[heads, vert] = 1  # column N collects the padding

    offs = _padded(slash, N, device)
    offs = torch.where((offs >= 0) & (offs < N), offs, N)
    is_slash = torch.zeros(P, N + 1, dtype=torch.int8, device=device)
    is_slash[heads, offs] = 1
    # Offset o (row block at p0) reads keys p0 - o .. p0 - o + block_r - 1: tiles
    # floor(-o / block_n) .. floor((block_r - 1 - o) / block_n) -- the same for every block.
    span = -(-(block_r - 1) // block_n) + 1
    e_lo = torch.div(-offs, block_n, rounding_mode="floor")
    e_hi = torch.div(block_r - 1 - offs, block_n, rounding_mode="floor")
    e = e_lo[:, :, None] + torch.arange(span, device=device)
    live = (e <= e_hi[:, :, None]) & (offs < N)[:, :, None]
    big = torch.iinfo(torch.int32).max
    e = torch.where(live, e, big).flatten(1).sort(dim=1).values
    keep = torch.ones_like(e, dtype=torch.bool)  # first of each run of equal values
    keep[:, 1:] = e[:, 1:] != e[:, :-1]
    keep &= e != big
    tile_count = keep.sum(1)
    tiles = torch.where(keep, e, big).sort(dim=1).values[:, : max(int(tile_count.max()), 1)]
    # Tile e is wholly before key 0 when p0 + e * block_n + block_n - 1 < 0.
    e_min = -torch.div(first_pos + block_n - 1, block_n, rounding_mode="floor")
    tile_start = torch.searchsorted(tiles.contiguous(), e_min.expand(P, -1).contiguous())
    tile_start = torch.minimum(tile_start, tile_count[:, None])
    i32 = torch.int32
    return _Indices(
        vert.to(i32).contiguous(), vertical_end.to(i32).contiguous(), tiles.to(i32).contiguous(),
        tile_start.to(i32).contiguous(), tile_count.to(i32).contiguous(),
        is_slash[:, :N].contiguous(), is_vertical[:, :N].contiguous(),
    )


def vertical_slash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    vertical: Sequence[torch.Tensor],
    slash: Sequence[torch.Tensor],
    *,
    per_query_head: bool = False,
    scale: float | None = None,
    block_rows: int | None = None,
    block_keys: int = 64,
    block_verticals: int = 64,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax attention of the n new rows over the cells of vertical and slash lines.

    q ``(H, n, D)``; k, v ``(H_kv, N, D)`` with the new tokens' keys last. ``vertical[h]``
    (key indices) and ``slash[h]`` (offsets) are the lines of pattern head ``h``: one per
    KV head, shared by its query heads, or one per query head if ``per_query_head``
    (the fields of a :class:`~loopserve.attention.pattern.LinePattern`). Returns the output
    ``(H, n, D)`` in ``out_dtype`` (default q's dtype) and the log-sum-exp ``(H, n)`` fp32 (``-inf``, with a zero
    output, for rows without a cell).

    ``block_rows`` rows per query head per program (default: 64 / group size, at least
    16), ``block_keys`` keys per slash tile, ``block_verticals`` verticals per step; all
    powers of two >= 16.
    """
    check_attention_inputs(q, k, v)
    H, n, D = q.shape
    Hkv, N, _ = k.shape
    if not 0 < n <= N:
        raise ValueError(f"need 0 < n <= N, got n={n} new rows and N={N} keys")
    G = H // Hkv
    P = H if per_query_head else Hkv
    if len(vertical) != P or len(slash) != P:
        raise ValueError(f"need one vertical and one slash entry per pattern head ({P}); got {len(vertical)}, {len(slash)}")
    gq = 1 if per_query_head else G
    GP = next_pow2(gq)
    block_r = block_rows or max(16, 64 // GP)
    check_blocks(block_rows=block_r, block_keys=block_keys, block_verticals=block_verticals)
    scale = D**-0.5 if scale is None else float(scale)

    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    idx = _prepare(vertical, slash, n, N, block_r, block_keys, q.device)
    out_dtype = q.dtype if out_dtype is None else out_dtype
    # The interpreter casts fp32 to bf16 by truncation, the GPU rounds to nearest: under the
    # interpreter the kernel writes fp32 and torch rounds, as the GPU would.
    store_dtype = torch.float32 if INTERPRETED else out_dtype
    out = torch.empty(H, n, D, dtype=store_dtype, device=q.device)
    lse = torch.empty(H, n, dtype=torch.float32, device=q.device)
    grid = (idx.vertical_end.shape[1], P)
    _vertical_slash_kernel[grid](
        q, k, v, out, lse,
        idx.vertical, idx.vertical_end, idx.tiles, idx.tile_start, idx.tile_count, idx.is_slash, idx.is_vertical,
        scale, n, N, gq, G,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        lse.stride(0),
        idx.vertical.stride(0), idx.vertical_end.stride(0), idx.tiles.stride(0), idx.tile_start.stride(0),
        idx.is_slash.stride(0),
        GP=GP, BLOCK_R=block_r, BLOCK_N=block_keys, BLOCK_V=block_verticals, HEAD_DIM=D,
        **dot_flags(_vertical_slash_kernel, q.dtype), num_warps=num_warps(GP * block_r, D),
    )
    return out.to(out_dtype), lse
