"""Sparse prefill attention over vertical and slash lines (SPEC section 1, step 5).

Computes, for all n new rows, the exact softmax attention restricted to the cells of a
:class:`~loopserve.attention.pattern.LinePattern`: the union of its vertical columns and
slash diagonals, each cell counted once, causal cells only. The full n x N score
matrix is never built.

CPU design, per KV head (the query heads of a GQA group share every K/V row read):

* **Native kernel** (default where a C compiler exists; D in {64, 128}, up to 8 query
  heads per pattern head): one pass per block of 16 consecutive rows, one row per
  vector lane, over the block's causal verticals and then its slashes, with a single
  online softmax (no merge). For a slash of offset ``o`` the 16 rows read the
  *contiguous* keys ``pos_0 - o .. pos_0 - o + 15``, so with K and V stored transposed
  ``(D, keys)`` every load is one vector and the dot products, softmax and value sums
  are vertical vector arithmetic, no horizontal reductions; a vertical is one key for
  all lanes (a broadcast). Each loaded K/V vector serves the G query heads of the
  group. A slash cell whose key is a selected vertical is masked (-inf bias): the
  vertical owns it, so each cell enters the softmax exactly once. Blocks go in sweeps of
  eight, each chunk of slashes for every block of the sweep in turn, so a slash's keys
  serve consecutive blocks from cache. Measured on the 2-core AVX-512 box: 3.4 (verticals)
  to 6.6 (spread slashes) ns per (query head, cell) single-threaded
  (``benchmarks/sparse_kernel_cells.py``); see "Native slash kernel" below.
* Without a C compiler (or ``LOOPSERVE_NATIVE=0``, or other shapes), a pure-torch path:
  **verticals** are the same keys for every row, so they are gathered once and a block
  of rows runs fused attention against them (sorted verticals: only the causal prefix,
  only its tail masked). **Slashes**: runs of nearby offsets (the local band above
  all) become small dense windows -- the C rows of a chunk read, at offset ``o``, the
  contiguous keys ``pos - o .. pos - o + C - 1``, so per chunk one fused attention call
  over keys ``pos_first - hi .. pos_last - lo`` with the non-selected diagonals masked,
  batched over chunks; isolated offsets are one vectorised step per offset on
  contiguous slices of K and V (~30-40 ns per cell). A tiny cost model picks windows
  or slices (:func:`_split_slashes`). Vertical cells that lie on a chosen slash are
  masked in the vertical part. Each part returns its output and row log-sum-exp; parts
  are merged exactly in fp32: ``out = sum_p exp(lse_p - lse) out_p`` with
  ``lse = logsumexp_p lse_p``.

The fused part is PyTorch's CPU flash-attention kernel
(``aten._scaled_dot_product_flash_attention_for_cpu``, the kernel behind
``F.scaled_dot_product_attention`` on CPU), used because it also returns the
log-sum-exp needed for the merge. Where it is unavailable a plain matmul/softmax path
gives the same result. Matmuls run in the input dtype (fp32 or bf16); softmax
statistics and the merge are fp32.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..kernels import choose_backend
from ..native import native_kernels
from ..threads import budget, intra_op_threads, parallel_map
from .backends import triton_sparse_prefill
from .pattern import LinePattern

__all__ = ["dense_prefill_attention", "sparse_prefill_attention"]

# Cost model of the pure-torch path (per row, in units of one windowed cell, ~5 ns in
# the fused kernel), measured on a 2-core AVX-512 CPU: a sliced slash cell costs ~30-40 ns;
# a window also pays a small fixed cost (mask, indices). So windows win for most runs of
# nearby offsets there. The native kernel needs no windows (see _plan_head).
_SLICE_CELL_COST_TORCH = 8.0
_WINDOW_FIXED_COST = 4.0

_flash_cpu = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)

# --------------------------------------------------------------------------------------
# Native slash kernel (optional)
# --------------------------------------------------------------------------------------
#
# A slash cell reads a different key for every row, so it has no matmul form: each cell
# is one D-long dot product and one D-long axpy. In torch ops that costs ~30-40 ns per
# cell (every step streams a (G, rows, D) temporary); the C kernel
# (loopserve/native/slash_attention.c) puts 16 rows in the lanes of a vector register
# (their keys at one offset are contiguous) and does it in ~4 ns per (query head, cell),
# verticals included. It is built once per machine by loopserve.native and called
# through ctypes, which releases the GIL, so row ranges run on the thread budget's
# Python threads. Without a compiler, or with ``LOOPSERVE_NATIVE=0``, the pure-torch
# path is used; both give the same result up to fp32 rounding (the kernel's exp is a
# ~1 ulp polynomial).

def _native_usable(D: int, G: int = 1) -> bool:
    kernels = native_kernels()
    return kernels is not None and bool(kernels.slash_supported(G, D))


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
        mask = torch.ones(n, N, dtype=torch.bool, device=q.device).tril(N - n)
        out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask, scale=scale)
    return out[0]


# --------------------------------------------------------------------------------------
# Fused attention with log-sum-exp
# --------------------------------------------------------------------------------------


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float, threads: int = 1
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
            with intra_op_threads(threads):
                return _flash_cpu(q, k.expand(B, G, S, D), v.expand(B, G, S, D), attn_mask=mask, scale=scale)
        except (RuntimeError, NotImplementedError):  # pragma: no cover - older/odd builds
            pass
    with intra_op_threads(threads):  # pragma: no cover
        s = torch.matmul(q, k.transpose(-1, -2)).float().mul_(scale)
    if mask is not None:  # pragma: no cover
        s = s + mask.float()
    lse = torch.logsumexp(s, -1)  # pragma: no cover
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])  # pragma: no cover
    return torch.matmul(p.to(q.dtype), v), lse  # pragma: no cover


# --------------------------------------------------------------------------------------
# Per-head plan
# --------------------------------------------------------------------------------------


def _split_slashes(offsets: list[int], chunk: int, slice_cost: float) -> tuple[list[tuple[int, int]], list[int]]:
    """Split sorted offsets into windowed runs ``(lo, hi)`` and isolated (sliced) offsets.

    Dynamic programme over the sorted offsets minimising the per-row cost: a window
    covering offsets ``lo..hi`` costs ``chunk + hi - lo + fixed`` cells, a sliced offset
    ``slice_cost``. Windows take contiguous runs of the sorted list, so
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
        sliced = best[i - 1] + slice_cost
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
    vertical_drop: torch.Tensor | None  # (N,) bool: offsets whose cells the vertical part must drop
    win_rel: torch.Tensor  # (L,) window column -> key offset from the chunk's first row position
    win_band: torch.Tensor  # (C, L) bool: window cell is a selected diagonal
    windows: list[tuple[int, int]]  # windowed offset runs (lo, hi)
    sliced: list[int]  # isolated offsets
    pad_front: int  # K/V are padded with this many zero rows in front (>= max offset)
    native: bool  # verticals and slashes go to the native kernel (no windows then)
    bias: torch.Tensor | None  # native only: (padded keys,) fp32, -inf = key not a slash cell (padding, verticals)
    offsets_t: torch.Tensor | None = None  # sliced offsets as an int64 tensor


def _plan_head(vertical: torch.Tensor, slash: torch.Tensor, N: int, chunk: int, native: bool = False) -> _HeadPlan:
    vertical = vertical.to(torch.long).contiguous()
    is_slash = torch.zeros(N, dtype=torch.bool)
    is_slash[slash.to(torch.long)] = True
    offsets = sorted(set(slash.tolist()))
    if native:
        # The native kernel runs verticals and slashes in one pass; a band of adjacent
        # offsets reads contiguous, cache-resident keys there, so no windows are needed.
        windows, sliced = [], offsets
    else:
        windows, sliced = _split_slashes(offsets, chunk, _SLICE_CELL_COST_TORCH)
    # Each cell enters the softmax once. The native kernel skips vertical keys on its
    # slashes (the vertical owns the cell), so nothing is dropped there; on the torch path
    # the vertical part drops the cells on every selected offset (sliced or windowed: per-row
    # masks are cheaper than per-chunk window masks).
    vertical_drop = None if native or not bool(is_slash.any()) else is_slash
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
    bias = None
    if native:
        bias = torch.zeros(pad_front + N + _back_pad(chunk))
        bias[:pad_front] = -math.inf  # keys before position 0
        bias[pad_front + vertical] = -math.inf  # owned by the vertical part
    offsets_t = torch.tensor(sliced, dtype=torch.long)
    return _HeadPlan(vertical, is_slash, vertical_drop, win_rel, win_band, windows, sliced, pad_front, native, bias, offsets_t)


def _back_pad(chunk: int) -> int:
    """Zero keys behind the last: padded rows (to a multiple of chunk, then of 16) read there."""
    return 2 * chunk + 16


# --------------------------------------------------------------------------------------
# Parts
# --------------------------------------------------------------------------------------


def _vertical_part(qb, kvert, vvert, plan: _HeadPlan, p0, scale, threads):
    """Fused attention of the block's rows over the causal prefix of the verticals.

    Cells on offsets in ``plan.vertical_drop`` are masked here (a slash part owns them,
    see :func:`_plan_head`); without such offsets only the causal tail needs a mask.
    """
    G, R, D = qb.shape
    vert = plan.vertical
    rows = p0 + torch.arange(R)
    n_hi = int(torch.searchsorted(vert, p0 + R - 1, right=True))
    if n_hi == 0:
        return None
    if plan.vertical_drop is None:
        n_lo = int(torch.searchsorted(vert, p0, right=True))  # causal for every row of the block
        mask = None
        if n_hi > n_lo:
            mask = torch.zeros(R, n_hi, dtype=qb.dtype)
            mask[:, n_lo:].masked_fill_(vert[None, n_lo:n_hi] > rows[:, None], -math.inf)
            mask = mask[None, None]
        has = vert[0] <= rows
    else:
        offset = rows[:, None] - vert[None, :n_hi]  # (R, n_hi)
        drop = (offset < 0) | plan.vertical_drop[offset.clamp(0, len(plan.vertical_drop) - 1)]
        mask = torch.zeros(R, n_hi, dtype=qb.dtype).masked_fill_(drop, -math.inf)[None, None] if bool(drop.any()) else None
        has = ~drop.all(-1)
    out, lse = _attend(qb[None], kvert[None, None, :n_hi], vvert[None, None, :n_hi], mask, scale, threads)
    return out[0], lse[0], has


def _window_part(qb, kpad, vpad, plan: _HeadPlan, p0, chunk, scale, threads):
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
    if len(plan.windows) == 1:
        # One window: chunk c's keys are rows idx[c, 0] .. + L - 1, i.e. overlapping
        # slices of K a chunk apart -- a strided view, no copy (a wide band would
        # otherwise be copied L / chunk times).
        shape, stride, first = (n_chunks, 1, L, D), (chunk * D, 0, D, 1), int(idx[0, 0]) * D
        kw = kpad.as_strided(shape, stride, kpad.storage_offset() + first)
        vw = vpad.as_strided(shape, stride, vpad.storage_offset() + first)
    else:
        flat = idx.flatten()
        kw = kpad.index_select(0, flat).view(n_chunks, 1, L, D)
        vw = vpad.index_select(0, flat).view(n_chunks, 1, L, D)
    out, lse = _attend(qc, kw, vw, mask, scale, threads)
    # (n_chunks, G, C, .) -> (G, R, .)
    return out.transpose(0, 1).reshape(G, R, D), lse.transpose(0, 1).reshape(G, R), has


def _sliced_part(qb, kf, vf, plan: _HeadPlan, p0, scale, threads):
    """Isolated slashes of a block of rows (torch path); ``kf``/``vf``: padded K/V in fp32."""
    with intra_op_threads(threads):  # large elementwise ops: worth the threads
        return _sliced_torch(qb, kf, vf, plan, p0, scale)


def _head_slices(pattern: LinePattern, h: int, G: int) -> tuple[slice, int]:
    """(query heads, KV head) that pattern head ``h`` serves."""
    if pattern.per_query_head:
        return slice(h, h + 1), h // G
    return slice(h * G, (h + 1) * G), h


def _padded_transposed(x: torch.Tensor, front: int, back: int) -> torch.Tensor:
    """``x`` (N, D) as fp32 ``(D, front + N + back)``: transposed, zero keys on both sides."""
    N, D = x.shape
    padded = x.new_zeros(front + N + back, D, dtype=torch.float32)
    padded[front : front + N] = x
    return padded.T.contiguous()  # a whole-tensor transpose: twice as fast as copying into a slice


def _native_attention(q, k, v, pattern: LinePattern, out: torch.Tensor, *, scale: float, chunk: int) -> None:
    """Every pattern head in the native kernel (verticals and slashes, one online softmax);
    writes ``out`` ``(H, n_pad, D)``.

    The kernel reads K/V transposed and padded ``(D, keys)``, the verticals' K/V rows
    ``(nv, D)`` and pre-scaled transposed queries ``(G, D, rows)`` (rows in vector lanes),
    and writes ``(G, rows, D)``. Each head's operands are prepared as one work item (copies
    of its K/V: on the thread budget, not one thread), then blocks of 16-row ranges of every
    head are work items of one :func:`loopserve.threads.parallel_map` (ctypes releases the
    GIL; small ranges taken dynamically, so no worker waits at a head's end). Rows without a
    cell get zeros (the kernel divides by their empty softmax sum as by infinity).
    """
    H, n, D = q.shape
    N = k.shape[1]
    n_pad = out.shape[1]
    G = H // k.shape[0]
    kernels = native_kernels()
    fn = kernels.slash_attention
    gq = 1 if pattern.per_query_head else G
    scratch_floats = kernels.slash_scratch_floats(gq, D)
    direct = out.dtype == torch.float32  # the kernel writes fp32: straight into `out`

    def prepare(h: int):
        qh, kvh = _head_slices(pattern, h, G)
        plan = _plan_head(pattern.vertical[h], pattern.slash[h], N, chunk, native=True)
        kT = _padded_transposed(k[kvh], plan.pad_front, _back_pad(chunk))
        vT = _padded_transposed(v[kvh], plan.pad_front, _back_pad(chunk))
        kvert = k[kvh][plan.vertical].float().contiguous()
        vvert = v[kvh][plan.vertical].float().contiguous()
        qT = torch.empty(gq, D, n_pad)
        qT[:, :, n:] = 0
        torch.mul(q[qh].transpose(1, 2), scale, out=qT[:, :, :n])
        dst = out[qh] if direct else torch.empty(gq, n_pad, D)
        return plan, qT, kT, vT, kvert, vvert, dst, torch.empty(gq, n_pad)

    ops = parallel_map(prepare, list(range(pattern.n_heads)))
    threads = budget()
    # ranges of at least one sweep of the kernel (8 blocks of 16 rows), several per worker
    step = n_pad if threads == 1 else max(128, -(-n_pad // (4 * threads * 16)) * 16)
    items = [(h, a, min(n_pad, a + step)) for h in range(pattern.n_heads) for a in range(0, n_pad, step)]
    local = threading.local()
    off = N - n

    def run(item: tuple[int, int, int]) -> None:
        h, r0, r1 = item
        plan, qT, kT, vT, kvert, vvert, dst, lse = ops[h]
        if not hasattr(local, "scratch"):
            local.scratch = torch.empty(scratch_floats)
        offs, vkey = plan.offsets_t, plan.vertical
        fn(qT.data_ptr(), n_pad, kT.data_ptr(), vT.data_ptr(), plan.bias.data_ptr(), kT.shape[1], offs.data_ptr(),
           len(offs), kvert.data_ptr(), vvert.data_ptr(), vkey.data_ptr(), len(vkey), gq, D, off, plan.pad_front,
           r0, r1, local.scratch.data_ptr(), dst.data_ptr(), lse.data_ptr())

    parallel_map(run, items)
    if not direct:
        for h, (_, _, _, _, _, _, dst, _) in enumerate(ops):
            out[_head_slices(pattern, h, G)[0]] = dst.to(out.dtype)


def _sliced_torch(qb, kf, vf, plan: _HeadPlan, p0, scale):
    """Isolated slashes in torch: per offset, the rows' keys are one contiguous slice of K.

    Each offset is one vectorised multiply-reduce over the block (no gather, no copy of
    K); ~6-8x the cost of a windowed cell.
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
    native: bool | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Exact softmax attention of the n new rows over exactly the pattern's cells.

    q ``(H, n, D)``; k, v ``(H_kv, N, D)`` with the new tokens' keys last (row r sits
    at key position ``N - n + r``). ``pattern`` has one head per KV head (shared by its
    query heads) or, if ``pattern.per_query_head``, one per query head. Returns
    ``(H, n, D)`` in the dtype of ``q``; softmax statistics are fp32. Rows with no
    selected cell (only possible for degenerate patterns) get zeros.

    ``block`` rows are processed at a time (memory ~ block x lines); ``chunk`` is the
    row-chunk height of the slash windows (smaller: less waste, less efficient matmuls).
    ``native``: use the compiled slash kernel (None: when available; False: pure torch).
    The result is the same either way, up to fp32 rounding.

    ``backend``: ``"cpu"`` (the kernels here) or ``"triton"`` (the GPU kernel); None picks
    by the tensors' device (:func:`loopserve.kernels.choose_backend`). The
    Triton kernel ignores ``block``, ``chunk`` and ``native``.
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
    if choose_backend(q.device, backend) == "triton":
        return triton_sparse_prefill(q, k, v, pattern, scale)[0]
    block = max(chunk, block // chunk * chunk)
    off = N - n
    n_pad = -(-n // chunk) * chunk
    dtype = q.dtype
    gq = 1 if pattern.per_query_head else G  # query heads per pattern head
    native = _native_usable(D, gq) if native is None else bool(native) and _native_usable(D, gq)

    out = torch.empty(H, n_pad, D, dtype=dtype)
    if native:
        _native_attention(q, k, v, pattern, out, scale=scale, chunk=chunk)
        return out[:, :n]
    threads = budget()
    # Bookkeeping runs on one thread; the fused attention calls use the whole thread
    # budget (see loopserve.threads.intra_op_threads).
    with intra_op_threads(1):
        for h in range(heads):
            qh, kvh = _head_slices(pattern, h, G)
            plan = _plan_head(pattern.vertical[h], pattern.slash[h], N, chunk)
            kh, vh = k[kvh], v[kvh]
            # Zero padding: in front so that pos - offset >= 0 indexes, behind for padded rows.
            front = kh.new_zeros(plan.pad_front, D)
            back = kh.new_zeros(_back_pad(chunk), D)
            kpad, vpad = torch.cat([front, kh, back]), torch.cat([front, vh, back])
            kvert, vvert = kh[plan.vertical], vh[plan.vertical]
            kf = vf = None
            if plan.sliced:
                kf, vf = kpad.float().contiguous(), vpad.float().contiguous()
            qs = q[qh]
            if n_pad > n:
                qs = torch.cat([qs, qs.new_zeros(qs.shape[0], n_pad - n, D)], 1)
            for r0 in range(0, n_pad, block):
                qb = qs[:, r0 : r0 + block]
                p0 = off + r0
                parts = []
                if len(plan.vertical):
                    part = _vertical_part(qb, kvert, vvert, plan, p0, scale, threads)
                    if part is not None:
                        parts.append(part)
                if plan.windows:
                    parts.append(_window_part(qb, kpad, vpad, plan, p0, chunk, scale, threads))
                if plan.sliced:
                    parts.append(_sliced_part(qb, kf, vf, plan, p0, scale, threads))
                if parts:
                    out[qh, r0 : r0 + block] = _merge(parts, dtype)
                else:
                    out[qh, r0 : r0 + block] = 0
    return out[:, :n]
