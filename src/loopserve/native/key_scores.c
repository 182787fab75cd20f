/* Phase 2's re-selection on the CPU: the attention mass every key receives from a few
   query rows, and the top rows of a score per head.

   key_scores: per KV head, R query rows (the buffered generated tokens' queries of the G
   query heads that share it) against its n keys; softmax per row over all n keys, summed
   over the rows. It replaces a matmul, a max, an exp, a sum and a second matmul with one
   pass over the keys and two over a logit buffer that stays in the cache: work items
   (KV head, chunk of CHUNK keys) compute the logits of a block of keys for all rows at
   once (the rows live in the lanes of NV vectors, so each key element is one broadcast
   into NV FMAs), the chunk's row maxima and its exp sums; the chunks of a head are merged
   in order, and a last pass weights each chunk's exps by its rows' exp(m_c - m) / l. Each
   item's result is the same whatever thread runs it, so the scores do not depend on the
   thread count.

   top_rows: per head, the K indices of the largest values, ascending, ties to the lower
   index, found by a radix selection of the K-th largest value (4 passes of 8 bits over
   the values) and one ordered scan: O(n), no sort. pooled_top_rows first max-pools the
   scores over neighbouring positions and forces the first and last few. */

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "slash_vector.h"

#define CHUNK 256 /* keys per work item */
#define KB 8      /* keys per register block */
#define MAX_NV 4  /* rows up to 4 vectors (64) */

int key_scores_supported(int64_t R, int64_t D) { return R >= 1 && R <= MAX_NV * W && D >= 1 && D <= 1024; }

/* x in every lane, loaded straight from memory (splat's x + 0 costs an add per key). */
static inline vf bcast(const float *x) {
    const float v = *x;
    return (vf){v, v, v, v, v, v, v, v, v, v, v, v, v, v, v, v};
}

static int64_t padded_rows(int64_t R) { return (R + W - 1) / W * W; }

/* Floats of scratch key_scores needs: the transposed queries, every key's logits and the
   chunks' (max, sum) pairs. */
int64_t key_scores_scratch_floats(int64_t H_kv, int64_t n, int64_t R, int64_t D) {
    const int64_t RP = padded_rows(R), chunks = (n + CHUNK - 1) / CHUNK;
    return H_kv * (D * RP + n * RP + chunks * 2 * RP);
}

/* One chunk of n keys k (token stride D) against the transposed rows qT (D x NV*W): the
   logits L (n x NV*W, key-major), replaced by exp(logit - chunk max); the chunk's row
   maxima m and exp sums l. */
static inline __attribute__((always_inline)) void chunk_exps(const float *restrict qT, const float *restrict k,
                                                              int64_t n, const int NV, int64_t D, float *restrict L,
                                                              float *restrict m, float *restrict l) {
    const int64_t RP = NV * W;
    vf mx[MAX_NV];
    for (int v = 0; v < NV; ++v) mx[v] = splat(-INFINITY);
    int64_t j = 0;
    for (; j < n; j += KB) {
        const int64_t nb = n - j < KB ? n - j : KB;
        vf acc[KB][MAX_NV];
#pragma GCC unroll 8
        for (int i = 0; i < KB; ++i)
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) acc[i][v] = (vf){0};
        if (nb == KB) {
            const float *kj = k + j * D;
            for (int64_t d = 0; d < D; ++d) {
                vf qv[MAX_NV];
#pragma GCC unroll 4
                for (int v = 0; v < NV; ++v) {
                    qv[v] = ld(qT + d * RP + v * W);
                    KEEP(qv[v]);
                }
#pragma GCC unroll 8
                for (int i = 0; i < KB; ++i) {
                    const vf kb = bcast(kj + i * D + d);
#pragma GCC unroll 4
                    for (int v = 0; v < NV; ++v) acc[i][v] += qv[v] * kb;
                }
            }
        } else {
            for (int64_t d = 0; d < D; ++d)
                for (int64_t i = 0; i < nb; ++i) {
                    const vf kb = bcast(k + (j + i) * D + d);
                    for (int v = 0; v < NV; ++v) acc[i][v] += ld(qT + d * RP + v * W) * kb;
                }
        }
        for (int64_t i = 0; i < nb; ++i)
            for (int v = 0; v < NV; ++v) {
                st(L + (j + i) * RP + v * W, acc[i][v]);
                mx[v] = vmax(mx[v], acc[i][v]);
            }
    }
    vf sum[MAX_NV];
    for (int v = 0; v < NV; ++v) sum[v] = (vf){0};
    for (j = 0; j < n; ++j)
        for (int v = 0; v < NV; ++v) {
            const vf e = vexp(ld(L + j * RP + v * W) - mx[v]);
            st(L + j * RP + v * W, e);
            sum[v] += e;
        }
    for (int v = 0; v < NV; ++v) {
        st(m + v * W, mx[v]);
        st(l + v * W, sum[v]);
    }
}

typedef void (*chunk_fn)(const float *, const float *, int64_t, int64_t, float *, float *, float *);
#define CHUNK_NV(NV)                                                                                        \
    static void chunk_nv##NV(const float *qT, const float *k, int64_t n, int64_t D, float *L, float *m,     \
                             float *l) {                                                                    \
        chunk_exps(qT, k, n, NV, D, L, m, l);                                                              \
    }
CHUNK_NV(1) CHUNK_NV(2) CHUNK_NV(3) CHUNK_NV(4)

/* q: H_kv x R x D rows, already scaled by the softmax scale; keys: head h's token t at
   k + h * kstride + t * D; out: H_kv x n scores. */
void key_scores(const float *q, const float *k, int64_t kstride, int64_t n, int64_t H_kv, int64_t R, int64_t D,
                float *out, float *scratch, int64_t threads) {
    const int64_t RP = padded_rows(R), NV = RP / W, chunks = (n + CHUNK - 1) / CHUNK, items = H_kv * chunks;
    float *const qT = scratch, *const logits = qT + H_kv * D * RP, *const parts = logits + H_kv * n * RP;
    static const chunk_fn by_nv[MAX_NV] = {chunk_nv1, chunk_nv2, chunk_nv3, chunk_nv4};
    const chunk_fn chunk = by_nv[NV - 1];
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t h = 0; h < H_kv; ++h) /* rows into the lanes: qT[d][r], padded rows 0 */
            for (int64_t d = 0; d < D; ++d)
                for (int64_t r = 0; r < RP; ++r) qT[(h * D + d) * RP + r] = r < R ? q[(h * R + r) * D + d] : 0.0f;
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < items; ++it) {
            const int64_t h = it / chunks, j0 = (it % chunks) * CHUNK, nc = n - j0 < CHUNK ? n - j0 : CHUNK;
            chunk(qT + h * D * RP, k + h * kstride + j0 * D, nc, D, logits + (h * n + j0) * RP, parts + it * 2 * RP,
                  parts + it * 2 * RP + RP);
        }
        /* Per head and row, in chunk order: the max m and sum l over all keys; then each
           chunk's weight exp(m_c - m) / l in place of its max (0 for the padding rows). */
#pragma omp for schedule(static)
        for (int64_t h = 0; h < H_kv; ++h)
            for (int64_t r = 0; r < RP; ++r) {
                float *p0 = parts + h * chunks * 2 * RP + r;
                float mx = -INFINITY, total = 0.0f;
                for (int64_t c = 0; c < chunks; ++c) mx = p0[c * 2 * RP] > mx ? p0[c * 2 * RP] : mx;
                for (int64_t c = 0; c < chunks; ++c) total += p0[c * 2 * RP + RP] * expf(p0[c * 2 * RP] - mx);
                for (int64_t c = 0; c < chunks; ++c) p0[c * 2 * RP] = r < R ? expf(p0[c * 2 * RP] - mx) / total : 0.0f;
            }
#pragma omp for schedule(static)
        for (int64_t it = 0; it < items; ++it) {
            const int64_t h = it / chunks, j0 = (it % chunks) * CHUNK, nc = n - j0 < CHUNK ? n - j0 : CHUNK;
            const float *wt = parts + it * 2 * RP, *L = logits + (h * n + j0) * RP;
            float *o = out + h * n + j0;
            for (int64_t j = 0; j < nc; ++j) {
                vf a = ld(L + j * RP) * ld(wt);
                for (int64_t v = 1; v < NV; ++v) a += ld(L + j * RP + v * W) * ld(wt + v * W);
                o[j] = hsum(a);
            }
        }
    }
}

/* A float's bits as an unsigned key with the same order (-0 and +0 the same key; every NaN
   the largest key, as in torch's descending sort). */
static inline uint32_t ordered(float x) {
    uint32_t u;
    if (x != x) return 0xFFFFFFFFu;
    x = x == 0.0f ? 0.0f : x;
    memcpy(&u, &x, sizeof u);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

/* The indices of the K largest of x[0..n), ascending (ties to the lower index), into o. */
static void top_of(const float *x, int64_t n, int64_t K, int64_t *o) {
    if (K <= 0) return;
    /* The K-th largest key, 8 bits at a time from the top: `need` of the keys that match the
       prefix so far are still to be taken. */
    uint32_t prefix = 0, mask = 0;
    int64_t need = K;
    for (int shift = 24; shift >= 0; shift -= 8) {
        int64_t hist[256] = {0};
        for (int64_t i = 0; i < n; ++i) {
            const uint32_t u = ordered(x[i]);
            if ((u & mask) == prefix) ++hist[(u >> shift) & 255];
        }
        int b = 255;
        for (; b > 0 && need > hist[b]; --b) need -= hist[b];
        prefix |= (uint32_t)b << shift;
        mask |= 255u << shift;
    }
    /* Keys above the threshold, and the first `need` equal to it, in index order. */
    int64_t c = 0;
    for (int64_t i = 0; i < n && c < K; ++i) {
        const uint32_t u = ordered(x[i]);
        if (u > prefix || (u == prefix && need-- > 0)) o[c++] = i;
    }
}

/* Per head h of values (H x n, row-major): the indices of its K largest values, ascending
   (ties go to the lower index; NaN ranks above +inf), into out + h * K. */
void top_rows(const float *values, int64_t H, int64_t n, int64_t K, int64_t *out) {
    for (int64_t h = 0; h < H; ++h) top_of(values + h * n, n, K, out + h * K);
}

/* top_rows of the scores max-pooled over a window of `pool` positions (from i - pool / 2,
   as torch's max_pool1d with padding pool / 2), with positions < head and >= n - tail
   forced in (ranked +inf). scratch: n floats. */
void pooled_top_rows(const float *scores, int64_t H, int64_t n, int64_t pool, int64_t head, int64_t tail, int64_t K,
                     int64_t *out, float *scratch) {
    const int64_t left = pool > 1 ? pool / 2 : 0, width = pool > 1 ? pool : 1;
    for (int64_t h = 0; h < H; ++h) {
        const float *x = scores + h * n;
        for (int64_t i = 0; i < n; ++i) {
            if (i < head || i >= n - tail) {
                scratch[i] = INFINITY;
                continue;
            }
            const int64_t a = i - left < 0 ? 0 : i - left, b = i - left + width > n ? n : i - left + width;
            float m = x[a];
            for (int64_t j = a + 1; j < b; ++j) m = x[j] > m ? x[j] : m;
            scratch[i] = m;
        }
        top_of(scratch, n, K, out + h * K);
    }
}
