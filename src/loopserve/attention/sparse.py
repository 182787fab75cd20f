"""Sparse prefill attention over vertical and slash lines (SPEC section 1, step 5).

Computes, for all n new rows, the exact softmax attention restricted to the cells of a
:class:`~loopserve.attention.lines.LinePattern`: the union of its vertical columns and
slash diagonals, each cell counted once, causal cells only. The full n x N score
matrix is never built.

CPU design, per KV head (the query heads of a GQA group share every K/V row read):

* **Verticals** are the same keys for every row: gather them once and run fused
  attention of a block of rows against them. Verticals are sorted, so a block only
  uses the prefix of verticals that is causal for some of its rows, and only the tail
  of that prefix needs a mask.
* **Slashes** hit a different key in every row, so a slash cell has no matmul form: it
  is one D-long dot product and one D-long axpy. They go to a small C kernel compiled
  at first use (~7 ns per cell on 2-core AVX-512; see "Native slash kernel" below) that
  skips keys owned by the verticals, so each cell enters the softmax exactly once.
* Without a C compiler, a pure-torch path is used: runs of nearby offsets (the local
  band above all) become small dense windows -- the C rows of a chunk read, at offset
  ``o``, the *contiguous* keys ``pos - o .. pos - o + C - 1``, so per chunk one fused
  attention call over keys ``pos_first - hi .. pos_last - lo`` with the non-selected
  diagonals masked, batched over chunks; isolated offsets are one vectorised step per
  offset on contiguous slices of K and V (~30-40 ns per cell). A tiny cost model picks
  windows or slices (:func:`_split_slashes`). There, vertical cells that lie on a
  chosen slash are masked in the vertical part instead.
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

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .lines import LinePattern, _intra_op_threads

__all__ = ["dense_prefill_attention", "sparse_prefill_attention"]

# Cost model (per row, in units of one windowed cell, ~5 ns in the fused kernel), measured
# on a 2-core AVX-512 CPU with benchmarks/prefill_attention_kernel.py: a slash cell costs
# ~7 ns in the native kernel and ~30-40 ns on the pure-torch slice path; a window also
# pays a small fixed cost (mask, indices). So windows win only for long dense runs of
# offsets with the native kernel (a wide A-shape band), and for most runs without it.
_SLICE_CELL_COST_NATIVE = 1.5
_SLICE_CELL_COST_TORCH = 8.0
_WINDOW_FIXED_COST = 4.0

_flash_cpu = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)

# --------------------------------------------------------------------------------------
# Native slash kernel (optional)
# --------------------------------------------------------------------------------------
#
# A slash cell reads a different key for every row, so it has no matmul form: each cell
# is one D-long dot product and one D-long axpy. In torch ops that costs ~30-40 ns per
# cell (every step streams a (G, rows, D) temporary); a plain C loop that keeps one row's
# queries and accumulators in registers does it in ~7 ns. The C source below is compiled
# once per machine with the system C compiler (well under a second, no torch headers),
# cached, and called through ctypes, which releases the GIL so row ranges run on
# ``torch.get_num_threads()`` Python threads. Without a compiler, or with
# ``LOOPSERVE_NATIVE=0``, the pure-torch path is used; both give the same result up to
# fp32 rounding (the kernel's exp is a ~1 ulp polynomial).

_NATIVE_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

/* exp(x) for x <= 0: Cody-Waite reduction + degree-6 polynomial (~1 ulp), no libm
   call so that loops over it vectorise; x < -87 gives ~0. */
static inline float exp_neg(float x) {
    x = x < -87.0f ? -87.0f : x;
    float n = __builtin_rintf(x * 1.44269504088896341f);
    float r = x - n * 0.693145751953125f - n * 1.428606765330187045e-06f;
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (0.16666667f + r * (0.041666668f + r * (0.008333334f + r * 0.0013888889f)))));
    union { int32_t i; float f; } e;
    e.i = ((int32_t)n + 127) << 23;
    return p * e.f;
}

static inline float dot(const float *a, const float *b, int64_t D) {
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16)
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), _mm512_loadu_ps(b + d), acc);
    return _mm512_reduce_add_ps(acc);
#else
    float acc[16] = {0};
    for (int64_t d = 0; d < D; d += 16)
        for (int l = 0; l < 16; ++l) acc[l] += a[d + l] * b[d + l];
    for (int w = 8; w > 0; w /= 2)
        for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
    return acc[0];
#endif
}

/* out[0:64] = sum_t p[t] * rows[t][d0:d0+64], rows given by key indices. Two offsets per
   step with separate accumulators, so FMA latency does not serialise the loop. */
static inline void axpy_rows(float *o, const float *p, const float *v, const int64_t *key,
                             int64_t mm, int64_t D, int64_t d0) {
#if defined(__AVX512F__)
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    int64_t t = 0;
    for (; t + 1 < mm; t += 2) {
        const float *vr = v + key[t] * D + d0, *wr = v + key[t + 1] * D + d0;
        __m512 pt = _mm512_set1_ps(p[t]), pu = _mm512_set1_ps(p[t + 1]);
        a0 = _mm512_fmadd_ps(pt, _mm512_loadu_ps(vr), a0);
        a1 = _mm512_fmadd_ps(pt, _mm512_loadu_ps(vr + 16), a1);
        a2 = _mm512_fmadd_ps(pt, _mm512_loadu_ps(vr + 32), a2);
        a3 = _mm512_fmadd_ps(pt, _mm512_loadu_ps(vr + 48), a3);
        b0 = _mm512_fmadd_ps(pu, _mm512_loadu_ps(wr), b0);
        b1 = _mm512_fmadd_ps(pu, _mm512_loadu_ps(wr + 16), b1);
        b2 = _mm512_fmadd_ps(pu, _mm512_loadu_ps(wr + 32), b2);
        b3 = _mm512_fmadd_ps(pu, _mm512_loadu_ps(wr + 48), b3);
    }
    if (t < mm) {
        const float *vr = v + key[t] * D + d0;
        __m512 pt = _mm512_set1_ps(p[t]);
        a0 = _mm512_fmadd_ps(pt, _mm512_loadu_ps(vr), a0);
        a1 = _mm512_fmadd_ps(pt, _mm512_loadu_ps(vr + 16), a1);
        a2 = _mm512_fmadd_ps(pt, _mm512_loadu_ps(vr + 32), a2);
        a3 = _mm512_fmadd_ps(pt, _mm512_loadu_ps(vr + 48), a3);
    }
    _mm512_storeu_ps(o, _mm512_add_ps(a0, b0)); _mm512_storeu_ps(o + 16, _mm512_add_ps(a1, b1));
    _mm512_storeu_ps(o + 32, _mm512_add_ps(a2, b2)); _mm512_storeu_ps(o + 48, _mm512_add_ps(a3, b3));
#else
    float acc[64] = {0};
    for (int64_t t = 0; t < mm; ++t) {
        const float *vr = v + key[t] * D + d0;
        for (int l = 0; l < 64; ++l) acc[l] += p[t] * vr[l];
    }
    for (int l = 0; l < 64; ++l) o[l] = acc[l];
#endif
}

/* max and sum over x[0:n] with 16 independent lanes (no serial dependency chain). */
static inline float lane_max(const float *x, int64_t n) {
    float acc[16];
    for (int l = 0; l < 16; ++l) acc[l] = -INFINITY;
    int64_t t = 0;
    for (; t + 16 <= n; t += 16)
        for (int l = 0; l < 16; ++l) acc[l] = x[t + l] > acc[l] ? x[t + l] : acc[l];
    for (; t < n; ++t) acc[0] = x[t] > acc[0] ? x[t] : acc[0];
    for (int w = 8; w > 0; w /= 2)
        for (int l = 0; l < w; ++l) acc[l] = acc[l + w] > acc[l] ? acc[l + w] : acc[l];
    return acc[0];
}

static inline float lane_sum(const float *x, int64_t n) {
    float acc[16] = {0};
    int64_t t = 0;
    for (; t + 16 <= n; t += 16)
        for (int l = 0; l < 16; ++l) acc[l] += x[t + l];
    for (; t < n; ++t) acc[0] += x[t];
    for (int w = 8; w > 0; w /= 2)
        for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
    return acc[0];
}

/* Slash attention of rows [r0, r1) of one KV head; D a multiple of 64.
   q (G, R, D) pre-scaled; k, v padded (key j at row pad + j); offsets ascending (m);
   row r sits at position p0 + r; its key for offset o is p0 + r - o, a cell iff >= 0
   and skip[pad + key] == 0 (skip marks keys owned by the vertical part).
   scratch: G * m floats, keys: m int64 (per calling thread).
   Writes out (G, R, D) and lse (G, R) (-inf for rows without a cell). */
void slash_attention(const float *q, const float *k, const float *v, const int64_t *offsets,
                     const uint8_t *skip, int64_t m, int64_t G, int64_t R, int64_t D, int64_t p0,
                     int64_t pad, int64_t r0, int64_t r1, float *scratch, int64_t *keys,
                     float *out, float *lse) {
    for (int64_t r = r0; r < r1; ++r) {
        int64_t pos = p0 + r, mm = 0;
        for (int64_t t = 0; t < m && offsets[t] <= pos; ++t) {
            int64_t key = pad + pos - offsets[t];
            keys[mm] = key;
            mm += !skip[key];
        }
        for (int64_t t = 0; t < mm; ++t) {  /* each K row serves the G heads */
            const float *kr = k + keys[t] * D;
            for (int64_t g = 0; g < G; ++g) scratch[g * m + t] = dot(q + (g * R + r) * D, kr, D);
        }
        for (int64_t g = 0; g < G; ++g) {
            float *s = scratch + g * m, *o = out + (g * R + r) * D;
            if (mm == 0) {
                lse[g * R + r] = -INFINITY;
                for (int64_t d = 0; d < D; ++d) o[d] = 0.0f;
                continue;
            }
            float mx = lane_max(s, mm);
            for (int64_t t = 0; t < mm; ++t) s[t] = exp_neg(s[t] - mx);
            float den = lane_sum(s, mm);
            lse[g * R + r] = mx + logf(den);
            float inv = 1.0f / den;
            for (int64_t t = 0; t < mm; ++t) s[t] *= inv;
            for (int64_t d0 = 0; d0 < D; d0 += 64) axpy_rows(o + d0, s, v, keys, mm, D, d0);
        }
    }
}
"""

_native_lock = threading.Lock()
_native_state: dict = {}


def _native_cache_dir() -> Path:
    root = os.environ.get("LOOPSERVE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "loopserve")
    try:
        Path(root).mkdir(parents=True, exist_ok=True)
        return Path(root)
    except OSError:
        return Path(tempfile.gettempdir())


def _cpu_signature() -> str:
    """Identifies the CPU features ``-march=native`` compiled for."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def _native_kernel():
    """The compiled slash kernel (a ctypes function), or None if unavailable."""
    with _native_lock:
        if "fn" in _native_state:
            return _native_state["fn"]
        fn = None
        if os.environ.get("LOOPSERVE_NATIVE", "1") != "0":
            try:
                fn = _build_native()
            except Exception:  # no compiler, read-only cache, odd platform: fall back
                fn = None
        _native_state["fn"] = fn
        return fn


def _build_native():
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        return None
    flags = ["-O3", "-march=native", "-shared", "-fPIC"]
    tag = hashlib.sha256((_NATIVE_SOURCE + " ".join(flags) + _cpu_signature()).encode()).hexdigest()[:16]
    cache = _native_cache_dir()
    lib_path = cache / f"loopserve_slash_{tag}.so"
    if not lib_path.exists():
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            src = Path(tmp) / "slash.c"
            src.write_text(_NATIVE_SOURCE)
            out = Path(tmp) / "slash.so"
            subprocess.run([cc, *flags, "-o", str(out), str(src), "-lm"], check=True, capture_output=True, timeout=120)
            os.replace(out, lib_path)  # atomic: concurrent builders are harmless
    lib = ctypes.CDLL(str(lib_path))
    fn = lib.slash_attention
    fn.restype = None
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, i64, i64, ptr, ptr, ptr, ptr]
    return fn


_pool: ThreadPoolExecutor | None = None


def _thread_pool(workers: int) -> ThreadPoolExecutor:
    global _pool
    with _native_lock:
        if _pool is None or _pool._max_workers < workers:  # noqa: SLF001 - sizing only
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="loopserve-slash")
        return _pool


def _native_usable(D: int) -> bool:
    return D % 64 == 0 and _native_kernel() is not None


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
            with _intra_op_threads(threads):
                return _flash_cpu(q, k.expand(B, G, S, D), v.expand(B, G, S, D), attn_mask=mask, scale=scale)
        except (RuntimeError, NotImplementedError):  # pragma: no cover - older/odd builds
            pass
    with _intra_op_threads(threads):  # pragma: no cover
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
    native: bool  # sliced offsets go to the native kernel
    skip: torch.Tensor | None  # native only: (padded keys,) uint8, 1 = key owned by the verticals


def _plan_head(vertical: torch.Tensor, slash: torch.Tensor, N: int, chunk: int, native: bool = False) -> _HeadPlan:
    vertical = vertical.to(torch.long)
    is_slash = torch.zeros(N, dtype=torch.bool)
    is_slash[slash.to(torch.long)] = True
    offsets = sorted(set(slash.tolist()))
    windows, sliced = _split_slashes(offsets, chunk, _SLICE_CELL_COST_NATIVE if native else _SLICE_CELL_COST_TORCH)
    # Each cell enters the softmax once. A vertical cell on a sliced offset: the native
    # kernel skips vertical keys (the vertical part owns the cell); the torch slice path
    # does not, so there the vertical part drops it. On a windowed offset the vertical
    # part always drops it (per-row masks are cheaper than per-chunk window masks).
    vertical_drop = torch.zeros(N, dtype=torch.bool)
    if native:
        for lo, hi in windows:
            vertical_drop[lo : hi + 1] = is_slash[lo : hi + 1]
    else:
        vertical_drop = is_slash
    vertical_drop = vertical_drop if bool(vertical_drop.any()) else None
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
    skip = None
    if native:
        skip = torch.zeros(pad_front + N + 2 * chunk, dtype=torch.uint8)
        skip[pad_front + vertical] = 1
    return _HeadPlan(vertical, is_slash, vertical_drop, win_rel, win_band, windows, sliced, pad_front, native, skip)


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
    """Isolated slashes of a block of rows; ``kf``/``vf`` are the padded K/V in fp32."""
    if plan.native:
        return _sliced_native(qb, kf, vf, plan, p0, scale, threads)
    with _intra_op_threads(threads):  # large elementwise ops: worth the threads
        return _sliced_torch(qb, kf, vf, plan, p0, scale)


def _sliced_native(qb, kf, vf, plan: _HeadPlan, p0, scale, threads):
    """Isolated slashes in the native kernel, rows split over the intra-op thread count."""
    G, R, D = qb.shape
    fn = _native_kernel()
    q = (qb.float() * scale).contiguous()
    offs = torch.tensor(plan.sliced, dtype=torch.long)
    m = len(offs)
    out = torch.empty(G, R, D)
    lse = torch.empty(G, R)
    workers = max(1, min(threads, R // 64))
    # Several small row ranges per worker, taken dynamically: if another process holds a
    # core, the other worker picks up the rest instead of everyone waiting for it.
    step = R if workers == 1 else max(64, -(-R // (4 * workers)))
    ranges = [(a, min(R, a + step)) for a in range(0, R, step)]
    local = threading.local()

    def run(rows: tuple[int, int]) -> None:
        if not hasattr(local, "scratch"):
            local.scratch = (torch.empty(G * m), torch.empty(m, dtype=torch.long))
        sc, keys = local.scratch
        fn(q.data_ptr(), kf.data_ptr(), vf.data_ptr(), offs.data_ptr(), plan.skip.data_ptr(), m, G, R, D, p0,
           plan.pad_front, rows[0], rows[1], sc.data_ptr(), keys.data_ptr(), out.data_ptr(), lse.data_ptr())

    if workers == 1:
        run(ranges[0])
    else:
        list(_thread_pool(workers).map(run, ranges))
    has = ~torch.isinf(lse[0])  # a row has cells iff some offset is <= its position
    return out, lse, has


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
    native = _native_usable(D) if native is None else bool(native) and _native_usable(D)

    out = torch.empty(H, n_pad, D, dtype=dtype)
    threads = torch.get_num_threads()
    # Bookkeeping runs on one thread; the fused attention calls and the native kernel use
    # all of them (see lines._intra_op_threads).
    with _intra_op_threads(1):
        for h in range(heads):
            if pattern.per_query_head:
                qh, kvh = slice(h, h + 1), h // G
            else:
                qh, kvh = slice(h * G, (h + 1) * G), h
            plan = _plan_head(pattern.vertical[h], pattern.slash[h], N, chunk, native)
            kh, vh = k[kvh], v[kvh]
            # Zero padding: in front so that pos - offset >= 0 indexes, behind for padded rows.
            front = kh.new_zeros(plan.pad_front, D)
            back = kh.new_zeros(2 * chunk, D)
            kpad, vpad = torch.cat([front, kh, back]), torch.cat([front, vh, back])
            kvert, vvert = kh[plan.vertical], vh[plan.vertical]
            kf, vf = (kpad.float().contiguous(), vpad.float().contiguous()) if plan.sliced else (None, None)
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
