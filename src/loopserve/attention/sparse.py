"""Sparse prefill attention over vertical and slash lines (SPEC section 1, step 5).

Computes, for all n new rows, the exact softmax attention restricted to the cells of a
:class:`~loopserve.attention.lines.LinePattern`: the union of its vertical columns and
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
  vertical owns it, so each cell enters the softmax exactly once. Measured on the
  2-core AVX-512 box: ~4 ns per (query head, cell) single-threaded, against ~7 ns for
  the previous row-by-row kernel; see "Native slash kernel" below.
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
# cell (every step streams a (G, rows, D) temporary); the C kernel below puts 16 rows in
# the lanes of a vector register (their keys at one offset are contiguous) and does it in
# ~4 ns per (query head, cell), verticals included. It is generated per (G, D) so the
# score and value tiles stay in registers, compiled once per machine with the system C
# compiler (-O3 -march=native; seconds, no torch headers), cached, and called through
# ctypes, which releases the GIL so row ranges run on ``torch.get_num_threads()`` Python
# threads. Without a compiler, or with
# ``LOOPSERVE_NATIVE=0``, the pure-torch path is used; both give the same result up to
# fp32 rounding (the kernel's exp is a ~1 ulp polynomial).

_NATIVE_HEAD = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Row-vectorised slash attention. W = 16 consecutive rows share one vector register
   lane each: for offset o, their keys are the contiguous keys pos_0 - o .. pos_0 - o + 15,
   so with K, V stored transposed (d-major) every load is one contiguous vector and the
   dot products, softmax and value sums are plain vertical vector arithmetic (no
   horizontal reductions). The G query heads of a KV head share every K/V load. */

#define W 16
typedef float vf __attribute__((vector_size(W * 4)));
typedef int32_t vi __attribute__((vector_size(W * 4)));
typedef float vfu __attribute__((vector_size(W * 4), aligned(4)));

static inline vf ld(const float *p) { return *(const vfu *)p; }
/* Load once into a register: without this the compiler folds the load into each of the
   G FMAs that use it, and the loop becomes bound by loads instead of FMAs. */
#if defined(__GNUC__) && defined(__x86_64__) && defined(__AVX512F__)
#define KEEP(x) __asm__("" : "+v"(x)) /* a 16-float vector is one zmm register */
#else
#define KEEP(x) ((void)0)
#endif
static inline void st(float *p, vf x) { *(vfu *)p = x; }
static inline vf splat(float x) { return (vf){0} + x; }
static inline vf vsel(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }
static inline vf vmax(vf a, vf b) { return vsel(a > b, a, b); }

/* exp(x), exactly 0 for x < -87 (and -inf); Cody-Waite + degree-6 polynomial (~1 ulp). */
static inline vf vexp(vf x) {
    vi ok = x >= splat(-87.0f);
    x = vmax(x, splat(-87.0f));
    vf t = x * splat(1.44269504088896341f) + splat(12582912.0f);
    vf n = t - splat(12582912.0f);
    vf r = x - n * splat(0.693145751953125f) - n * splat(1.428606765330187045e-06f);
    vf p = splat(0.0013888889f);
    p = p * r + splat(0.008333334f);
    p = p * r + splat(0.041666668f);
    p = p * r + splat(0.16666667f);
    p = p * r + splat(0.5f);
    p = p * r + splat(1.0f);
    p = p * r + splat(1.0f);
    vi e = (__builtin_convertvector(n, vi) + 127) << 23;
    return (vf)((vi)(p * (vf)e) & ok);
}

#define TC 32 /* offsets per online-softmax chunk */

"""

# One specialisation per (G, D): with compile-time sizes the score and value tiles
# (G x TT and G x DT vectors) live in registers.
_NATIVE_BLOCK = r"""
static void blk_G_D(
           const float *qT, int64_t Rq, const float *KT, const float *VT, const float *bias, int64_t ldk,
           const int64_t *offsets, int64_t m, const float *kv, const float *vv, const int64_t *vkey, int64_t nv,
           int64_t p0, int64_t pad, int64_t r, float *S, float *acc, float *out, float *lse) {
    enum { G = GG, D = DD, TT = TTT, DT = DTT };
    /* qT: (G, D, Rq), out: (G, Rq, D); row block r .. r+W-1. S: G*(TC+8)*W, acc: G*D*W.
       Verticals first (kv, vv: (nv, D) gathered rows, one key for all lanes), then slashes
       (a contiguous key vector per offset); one online softmax over both. */
    const int64_t pos0 = p0 + r, base = pad + pos0;
    int64_t mt = 0, nvt = 0;
    while (mt < m && offsets[mt] <= pos0 + W - 1) ++mt;
    while (nvt < nv && vkey[nvt] <= pos0 + W - 1) ++nvt;
    vi lane_pos;
    for (int i = 0; i < W; ++i) lane_pos[i] = (int32_t)(pos0 + i);
    vf mrun[G], lrun[G];
    for (int g = 0; g < G; ++g) { mrun[g] = splat(-INFINITY); lrun[g] = splat(0.0f); }
    memset(acc, 0, sizeof(float) * G * D * W);
    const int64_t total = nvt + mt;
    for (int64_t c0 = 0, nc = 0; c0 < total; c0 += nc) {
        /* a chunk is all verticals or all slashes */
        const int vert = c0 < nvt;
        const int64_t lim = vert ? nvt : total;
        nc = lim - c0 < TC ? lim - c0 : TC;
        const int64_t s0 = c0 - nvt; /* first slash index of a slash chunk */
        if (vert) {
            for (int64_t t = 0; t < nc; t += TT) {
                const int tt_n = nc - t < TT ? (int)(nc - t) : TT;
                const float *kr[TT];
                for (int u = 0; u < TT; ++u) kr[u] = kv + (c0 + t + (u < tt_n ? u : 0)) * D;
                vf s[G][TT];
#pragma GCC unroll 16
                for (int g = 0; g < G; ++g)
#pragma GCC unroll 16
                    for (int u = 0; u < TT; ++u) s[g][u] = splat(0.0f);
                for (int d = 0; d < D; ++d) {
                    vf qv[G];
#pragma GCC unroll 16
                    for (int g = 0; g < G; ++g) qv[g] = ld(qT + ((int64_t)g * D + d) * Rq + r);
#pragma GCC unroll 16
                    for (int u = 0; u < TT; ++u) {
                        vf kb = splat(kr[u][d]);
                        KEEP(kb);
#pragma GCC unroll 16
                        for (int g = 0; g < G; ++g) s[g][u] += qv[g] * kb;
                    }
                }
#pragma GCC unroll 16
                for (int u = 0; u < TT; ++u) {
                    const int64_t key = vkey[c0 + t + (u < tt_n ? u : 0)];
                    vi ok = lane_pos >= (vi){0} + (int32_t)key;
                    vf b = vsel(ok, splat(0.0f), splat(-INFINITY));
#pragma GCC unroll 16
                    for (int g = 0; g < G; ++g) st(S + ((int64_t)g * (TC + 8) + t + u) * W, s[g][u] + b);
                }
            }
        } else {
            for (int64_t t = 0; t < nc; t += TT) {
                const int tt_n = nc - t < TT ? (int)(nc - t) : TT;
                int64_t kb[TT];
                for (int u = 0; u < TT; ++u) kb[u] = base - offsets[s0 + t + (u < tt_n ? u : 0)];
                vf s[G][TT];
#pragma GCC unroll 16
                for (int g = 0; g < G; ++g)
#pragma GCC unroll 16
                    for (int u = 0; u < TT; ++u) s[g][u] = splat(0.0f);
                for (int d = 0; d < D; ++d) {
                    vf qv[G];
#pragma GCC unroll 16
                    for (int g = 0; g < G; ++g) qv[g] = ld(qT + ((int64_t)g * D + d) * Rq + r);
                    const float *kd = KT + (int64_t)d * ldk;
#pragma GCC unroll 16
                    for (int u = 0; u < TT; ++u) {
                        vf kx = ld(kd + kb[u]);
                        KEEP(kx);
#pragma GCC unroll 16
                        for (int g = 0; g < G; ++g) s[g][u] += qv[g] * kx;
                    }
                }
#pragma GCC unroll 16
                for (int u = 0; u < TT; ++u) {
                    vf b = ld(bias + kb[u]);
#pragma GCC unroll 16
                    for (int g = 0; g < G; ++g) st(S + ((int64_t)g * (TC + 8) + t + u) * W, s[g][u] + b);
                }
            }
        }
        /* online softmax */
        vf corr[G];
        for (int g = 0; g < G; ++g) {
            float *Sg = S + (int64_t)g * (TC + 8) * W;
            vf cm = ld(Sg);
            for (int64_t u = 1; u < nc; ++u) cm = vmax(cm, ld(Sg + u * W));
            vf nm = vmax(mrun[g], cm);
            vf safe = vsel(nm == splat(-INFINITY), splat(0.0f), nm);
            corr[g] = vexp(mrun[g] - safe);
            vf sum = splat(0.0f);
            for (int64_t u = 0; u < nc; ++u) {
                vf p = vexp(ld(Sg + u * W) - safe);
                st(Sg + u * W, p);
                sum += p;
            }
            lrun[g] = lrun[g] * corr[g] + sum;
            mrun[g] = nm;
        }
        /* values */
        for (int d0 = 0; d0 < D; d0 += DT) {
            vf a[G][DT];
#pragma GCC unroll 16
            for (int g = 0; g < G; ++g)
#pragma GCC unroll 16
                for (int e = 0; e < DT; ++e) a[g][e] = ld(acc + ((int64_t)g * D + d0 + e) * W) * corr[g];
            if (vert) {
                for (int64_t u = 0; u < nc; ++u) {
                    const float *vr = vv + (c0 + u) * D + d0;
                    vf pv[G];
#pragma GCC unroll 16
                    for (int g = 0; g < G; ++g) pv[g] = ld(S + ((int64_t)g * (TC + 8) + u) * W);
#pragma GCC unroll 16
                    for (int e = 0; e < DT; ++e) {
                        vf vx = splat(vr[e]);
                        KEEP(vx);
#pragma GCC unroll 16
                        for (int g = 0; g < G; ++g) a[g][e] += pv[g] * vx;
                    }
                }
            } else {
                for (int64_t u = 0; u < nc; ++u) {
                    const int64_t vb = base - offsets[s0 + u];
                    vf pv[G];
#pragma GCC unroll 16
                    for (int g = 0; g < G; ++g) pv[g] = ld(S + ((int64_t)g * (TC + 8) + u) * W);
#pragma GCC unroll 16
                    for (int e = 0; e < DT; ++e) {
                        vf vx = ld(VT + (int64_t)(d0 + e) * ldk + vb);
                        KEEP(vx);
#pragma GCC unroll 16
                        for (int g = 0; g < G; ++g) a[g][e] += pv[g] * vx;
                    }
                }
            }
#pragma GCC unroll 16
            for (int g = 0; g < G; ++g)
#pragma GCC unroll 16
                for (int e = 0; e < DT; ++e) st(acc + ((int64_t)g * D + d0 + e) * W, a[g][e]);
        }
    }
    for (int g = 0; g < G; ++g) {
        float lv[W], mv[W], inv[W];
        st(lv, lrun[g]);
        st(mv, mrun[g]);
        for (int i = 0; i < W; ++i) {
            inv[i] = lv[i] > 0.0f ? 1.0f / lv[i] : 0.0f;
            lse[(int64_t)g * Rq + r + i] = lv[i] > 0.0f ? mv[i] + logf(lv[i]) : -INFINITY;
        }
        const float *ag = acc + (int64_t)g * D * W;
        float *og = out + ((int64_t)g * Rq + r) * D;
        for (int i = 0; i < W; ++i)
            for (int d = 0; d < D; ++d) og[i * D + d] = ag[d * W + i] * inv[i];
    }
}
"""

_NATIVE_TAIL = r"""
typedef void (*blk_fn)(const float *, int64_t, const float *, const float *, const float *, int64_t,
                       const int64_t *, int64_t, const float *, const float *, const int64_t *, int64_t, int64_t,
                       int64_t, int64_t, float *, float *, float *, float *);
static const blk_fn table64[8] = {blk_1_64, blk_2_64, blk_3_64, blk_4_64, blk_5_64, blk_6_64, blk_7_64, blk_8_64};
static const blk_fn table128[8] = {blk_1_128, blk_2_128, blk_3_128, blk_4_128,
                                   blk_5_128, blk_6_128, blk_7_128, blk_8_128};

/* ---- Greedy maximum coverage rounds (see lines._greedy_cover, which this mirrors) ----
   gain (B, 2, N) fp64: marginal mass of vertical x (kind 0) / slash x (kind 1), -inf once
   taken; chosen (B, 2, N); A (B, s, N) fp32 probe attention; pos (s) row positions.
   Each round, per active head: the leading kind's lines with gain >= the other kind's
   best (and > tol), in gain order, cut where the target or lines_left is reached; taking
   a line lowers the other kind's gains by the cells they share. Picks are appended to
   the log. Returns the number of rounds. scr_g/scr_x: N entries; work: 3*B doubles. */
static int cmp_desc(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x < y) - (x > y);
}

int64_t greedy_rounds(double *gain, uint8_t *chosen, const float *A, const int64_t *pos, int64_t B, int64_t s,
                      int64_t N, double *covered, const double *target, const double *tol, int64_t *lines_left,
                      int64_t *log_b, int64_t *log_k, int64_t *log_x, double *log_g, int64_t *n_log,
                      double *scr, double *work) {
    int64_t rounds = 0, nl = *n_log;
    double *best0 = work, *best1 = work + B;
    for (;;) {
        int any = 0;
        for (int64_t b = 0; b < B; ++b) {
            const double *g0 = gain + (b * 2) * N, *g1 = g0 + N;
            double m0 = -INFINITY, m1 = -INFINITY;
            for (int64_t x = 0; x < N; ++x) { m0 = g0[x] > m0 ? g0[x] : m0; m1 = g1[x] > m1 ? g1[x] : m1; }
            best0[b] = m0; best1[b] = m1;
            double best = m0 >= m1 ? m0 : m1;
            any |= covered[b] < target[b] && best > tol[b] && lines_left[b] > 0;
        }
        if (!any) break;
        ++rounds;
        for (int64_t b = 0; b < B; ++b) {
            const double m0 = best0[b], m1 = best1[b];
            const int lead = m0 >= m1 ? 0 : 1;
            const double best = lead ? m1 : m0, bound = lead ? m0 : m1;
            if (!(covered[b] < target[b] && best > tol[b] && lines_left[b] > 0)) continue;
            double *cand = gain + (b * 2 + lead) * N, *other = gain + (b * 2 + 1 - lead) * N;
            /* run: (gain, x) pairs, sorted by gain descending */
            int64_t nr = 0;
            for (int64_t x = 0; x < N; ++x)
                if (cand[x] >= bound && cand[x] > tol[b]) { scr[2 * nr] = cand[x]; scr[2 * nr + 1] = (double)x; ++nr; }
            qsort(scr, (size_t)nr, 2 * sizeof(double), cmp_desc);
            const double remaining = target[b] - covered[b];
            double before = 0.0;
            int64_t taken = 0;
            for (int64_t i = 0; i < nr; ++i) {
                if (!(before < remaining) || taken >= lines_left[b]) break;
                const double g = scr[2 * i];
                const int64_t x = (int64_t)scr[2 * i + 1];
                before += g;
                ++taken;
                const double gp = g > 0.0 ? g : 0.0;
                log_b[nl] = b; log_k[nl] = lead; log_x[nl] = x; log_g[nl] = gp; ++nl;
                covered[b] += gp;
                cand[x] = -INFINITY;
                chosen[(b * 2 + lead) * N + x] = 1;
                const float *Ab = A + b * s * N;
                for (int64_t r = 0; r < s; ++r) {
                    const int64_t ox = pos[r] - x;
                    if (ox < 0) continue;
                    other[ox] -= (double)Ab[r * N + (lead == 0 ? x : ox)];
                }
            }
            lines_left[b] -= taken;
        }
    }
    *n_log = nl;
    return rounds;
}

int slash_supported(int64_t G, int64_t D) { return G >= 1 && G <= 8 && (D == 64 || D == 128); }

/* Rows [r0, r1) (multiples of 16) of one KV head, over its verticals and slashes.
   qT (G, D, Rq) pre-scaled queries, transposed (Rq a multiple of 16); KT, VT (D, ldk):
   K/V transposed with `pad` zero keys in front (key j at column pad + j) and >= 16 zero
   keys behind; bias (ldk): 0 for keys a slash may use, -inf for the front padding and
   for vertical keys (a vertical/slash intersection belongs to the vertical);
   offsets ascending (m), pad >= the largest; kv, vv (nv, D): the K/V rows of the
   verticals, keys vkey ascending (nv); row r sits at position p0 + r.
   scratch: G*(TC + 8 + D)*16 floats. Writes out (G, Rq, D) and lse (G, Rq) (-inf for rows without a cell). */
void slash_attention(const float *qT, int64_t Rq, const float *KT, const float *VT, const float *bias,
                     int64_t ldk, const int64_t *offsets, int64_t m, const float *kv, const float *vv,
                     const int64_t *vkey, int64_t nv, int64_t G, int64_t D, int64_t p0,
                     int64_t pad, int64_t r0, int64_t r1, float *scratch, float *out, float *lse) {
    blk_fn f = (D == 64 ? table64 : table128)[G - 1];
    float *S = scratch, *acc = scratch + G * (TC + 8) * W;
    for (int64_t r = r0; r < r1; r += W)
        f(qT, Rq, KT, VT, bias, ldk, offsets, m, kv, vv, vkey, nv, p0, pad, r, S, acc, out, lse);
}
"""

# (G, score tile TT, value tile DT): G*TT and G*DT accumulators stay within ~24 of the 32
# vector registers; DT must divide D.
_NATIVE_SPECS = [(1, 8, 16), (2, 8, 8), (3, 8, 8), (4, 6, 4), (5, 4, 4), (6, 4, 4), (7, 3, 2), (8, 3, 2)]
_NATIVE_SOURCE = "\n".join(
    [_NATIVE_HEAD]
    + [
        _NATIVE_BLOCK.replace("blk_G_D", f"blk_{g}_{d}").replace(
            "G = GG, D = DD, TT = TTT, DT = DTT", f"G = {g}, D = {d}, TT = {tt}, DT = {dt}"
        )
        for d in (64, 128)
        for g, tt, dt in _NATIVE_SPECS
    ]
    + [_NATIVE_TAIL]
)
_NATIVE_MAX_G = 8
_NATIVE_DIMS = (64, 128)
_NATIVE_TC = 32  # TC in the C source


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
    fn.argtypes = [ptr, i64, ptr, ptr, ptr, i64, ptr, i64, ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, i64, ptr, ptr, ptr]
    greedy = lib.greedy_rounds
    greedy.restype = i64
    greedy.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr]
    _native_state["greedy"] = greedy
    return fn


def _native_greedy():
    """The compiled greedy round loop (used by lines._greedy_cover), or None."""
    _native_kernel()
    return _native_state.get("greedy")


_pool: ThreadPoolExecutor | None = None


def _thread_pool(workers: int) -> ThreadPoolExecutor:
    global _pool
    with _native_lock:
        if _pool is None or _pool._max_workers < workers:  # noqa: SLF001 - sizing only
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="loopserve-slash")
        return _pool


def _native_usable(D: int, G: int = 1) -> bool:
    return D in _NATIVE_DIMS and 1 <= G <= _NATIVE_MAX_G and _native_kernel() is not None


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
    with _intra_op_threads(threads):  # large elementwise ops: worth the threads
        return _sliced_torch(qb, kf, vf, plan, p0, scale)


def _native_part(qb, kT, vT, kvert, vvert, plan: _HeadPlan, p0, scale, threads):
    """Verticals and slashes of a block of rows in the native kernel (one online softmax).

    ``kT``/``vT``: padded K/V, fp32, transposed ``(D, keys)``; ``kvert``/``vvert``: the
    verticals' K/V rows, fp32 ``(nv, D)``. The kernel reads transposed queries
    ``(G, D, rows)`` (rows in vector lanes) and writes the output as ``(G, rows, D)``.
    16-row blocks are split over ``threads`` Python threads (ctypes releases the GIL).
    """
    G, R, D = qb.shape
    fn = _native_kernel()
    Rq = -(-R // 16) * 16
    q = torch.zeros(G, D, Rq)
    torch.mul(qb.transpose(1, 2), scale, out=q[:, :, :R])
    offs, vkey = plan.offsets_t, plan.vertical
    out = torch.empty(G, Rq, D)
    lse = torch.empty(G, Rq)
    workers = max(1, min(threads, Rq // 64))
    # Several small row ranges per worker, taken dynamically: if another process holds a
    # core, the other worker picks up the rest instead of everyone waiting for it.
    step = Rq if workers == 1 else max(64, -(-Rq // (4 * workers * 16)) * 16)
    ranges = [(a, min(Rq, a + step)) for a in range(0, Rq, step)]
    local = threading.local()
    ldk = kT.shape[1]

    def run(rows: tuple[int, int]) -> None:
        if not hasattr(local, "scratch"):
            local.scratch = torch.empty(G * (_NATIVE_TC + 8 + D) * 16)
        fn(q.data_ptr(), Rq, kT.data_ptr(), vT.data_ptr(), plan.bias.data_ptr(), ldk, offs.data_ptr(), len(offs),
           kvert.data_ptr(), vvert.data_ptr(), vkey.data_ptr(), len(vkey), G, D, p0, plan.pad_front, rows[0], rows[1],
           local.scratch.data_ptr(), out.data_ptr(), lse.data_ptr())

    if workers == 1:
        run(ranges[0])
    else:
        list(_thread_pool(workers).map(run, ranges))
    lse = lse[:, :R]
    return out[:, :R], lse, ~torch.isinf(lse[0])


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
    gq = 1 if pattern.per_query_head else G  # query heads per pattern head
    native = _native_usable(D, gq) if native is None else bool(native) and _native_usable(D, gq)

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
            back = kh.new_zeros(_back_pad(chunk), D)
            kpad, vpad = torch.cat([front, kh, back]), torch.cat([front, vh, back])
            kvert, vvert = kh[plan.vertical], vh[plan.vertical]
            kf = vf = None
            if plan.native:  # transposed (D, keys): rows go in vector lanes
                kf, vf = kpad.float().T.contiguous(), vpad.float().T.contiguous()
                kvert, vvert = kvert.float().contiguous(), vvert.float().contiguous()
            elif plan.sliced:
                kf, vf = kpad.float().contiguous(), vpad.float().contiguous()
            qs = q[qh]
            if n_pad > n:
                qs = torch.cat([qs, qs.new_zeros(qs.shape[0], n_pad - n, D)], 1)
            if plan.native:  # memory is O(rows) here: all rows in one call
                out[qh] = _merge([_native_part(qs, kf, vf, kvert, vvert, plan, off, scale, threads)], dtype)
                continue
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
