/* Decode attention of several conversations in one call: every segment is one query
   token of H heads over its own N_s keys (its cache layer's store or active view), with
   G = H / H_kv query heads per KV head.

   Decoding reads every key and value once per step and does little arithmetic on them,
   so it is bound by memory: one fused pass per (segment, KV head, chunk of CHUNK keys)
   computes the G rows' scores, a chunk-local softmax and the weighted sum of values,
   reading each key and value once for all G query heads. The chunks of all segments are
   the work items of one OpenMP loop (the process's OpenMP runtime, the one torch runs on),
   and a second loop merges each (segment, KV head)'s chunks in order. A segment's result
   depends only on its own inputs, never on the other segments or the thread count, so a
   conversation decoded in a batch gets the same bits as decoded alone. */

#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "slash_vector.h"

#define CHUNK 256 /* keys per work item */
#define MAX_G 16  /* larger query groups or heads take the torch path */
#define MAX_D 256

/* exp(s[j] - mx) in place over one row of n scores; returns their sum. */
static inline float exp_row(float *s, int64_t n, float mx) {
    vf mg = splat(mx), sum = (vf){0};
    int64_t j = 0;
    for (; j + W <= n; j += W) {
        vf p = vexp(ld(s + j) - mg);
        st(s + j, p);
        sum += p;
    }
    float tail = 0.0f;
    for (; j < n; ++j) {
        s[j] = expf(s[j] - mx);
        tail += s[j];
    }
    return hsum(sum) + tail;
}

/* One chunk: keys k[0..n) (token stride D) against G query rows q (G x D); writes the
   chunk's row maxima m, sums of exp l and unnormalised value sums acc (G x D). */
static void chunk_partial(const float *q, const float *k, const float *v, int64_t n, int64_t G, int64_t D,
                          float scale, float *m, float *l, float *acc) {
    float s[MAX_G][CHUNK] __attribute__((aligned(64)));
    for (int64_t g = 0; g < G; ++g) m[g] = -INFINITY;
    if (D % W == 0) {
        for (int64_t j = 0; j < n; ++j) {
            const float *kj = k + j * D;
            for (int64_t g = 0; g < G; ++g) {
                vf a = (vf){0};
                for (int64_t d = 0; d < D; d += W) a += ld(q + g * D + d) * ld(kj + d);
                float x = hsum(a) * scale;
                s[g][j] = x;
                m[g] = x > m[g] ? x : m[g];
            }
        }
    } else {
        for (int64_t j = 0; j < n; ++j)
            for (int64_t g = 0; g < G; ++g) {
                float x = 0.0f;
                for (int64_t d = 0; d < D; ++d) x += q[g * D + d] * k[j * D + d];
                x *= scale;
                s[g][j] = x;
                m[g] = x > m[g] ? x : m[g];
            }
    }
    for (int64_t g = 0; g < G; ++g) l[g] = exp_row(s[g], n, m[g]);
    for (int64_t i = 0; i < G * D; ++i) acc[i] = 0.0f;
    if (D % W == 0) {
        for (int64_t j = 0; j < n; ++j) {
            const float *vj = v + j * D;
            for (int64_t g = 0; g < G; ++g) {
                vf p = splat(s[g][j]);
                for (int64_t d = 0; d < D; d += W) st(acc + g * D + d, ld(acc + g * D + d) + p * ld(vj + d));
            }
        }
    } else {
        for (int64_t j = 0; j < n; ++j)
            for (int64_t g = 0; g < G; ++g)
                for (int64_t d = 0; d < D; ++d) acc[g * D + d] += s[g][j] * v[j * D + d];
    }
}

/* The fast path, for D a multiple of 16 and G, D known at compile time: each row's query
   and the value sums live in registers, and the dot products of 16 keys are summed
   horizontally together (a transpose-reduction: 15 shuffle-and-add steps for 16 scores
   rather than 4 per score), which also keeps 16 independent key loads in flight. The
   dot product of key j of a block goes to t[bitrev(j)], so the reduction leaves its
   score in lane j. */
static inline vf merge(vf a, vf b, vi x, vi y) { return __builtin_shuffle(a, b, x) + __builtin_shuffle(a, b, y); }

static inline vf reduce16(const vf *t) {
    const vi x8 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
    const vi y8 = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
    const vi x4 = {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27};
    const vi y4 = {4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31};
    const vi x2 = {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29};
    const vi y2 = {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31};
    const vi x1 = {0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30};
    const vi y1 = {1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31};
    vf a[8], b[4], c[2];
    for (int i = 0; i < 8; ++i) a[i] = merge(t[2 * i], t[2 * i + 1], x8, y8);
    for (int i = 0; i < 4; ++i) b[i] = merge(a[2 * i], a[2 * i + 1], x4, y4);
    for (int i = 0; i < 2; ++i) c[i] = merge(b[2 * i], b[2 * i + 1], x2, y2);
    return merge(c[0], c[1], x1, y1);
}

static const int BITREV[W] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};

static inline __attribute__((always_inline)) void chunk_fast(
    const float *restrict q, const float *restrict k, const float *restrict v, const int64_t *restrict rows,
    int64_t n, const int64_t G, const int64_t D, float scale, float *restrict m, float *restrict l,
    float *restrict out) {
    float s[MAX_G][CHUNK] __attribute__((aligned(64)));
/* Token j of the chunk: the j-th row, or the store row rows[j] of a view (read in place). */
#define ROW(x, j) ((x) + (rows ? rows[j] : (j)) * D)
    if (rows) /* a view's first rows: the loop below prefetches four blocks ahead */
        for (int64_t j = 0; j < n && j < 4 * W; ++j)
            for (int64_t i = 0; i < D; i += W) __builtin_prefetch(ROW(k, j) + i, 0, 3);
    for (int64_t g = 0; g < G; ++g) {
        vf qg[D / W];
        for (int64_t d = 0; d < D / W; ++d) qg[d] = ld(q + g * D + d * W);
        int64_t j0 = 0;
        for (; j0 + W <= n; j0 += W) {
            if (g == 0) { /* more loads in flight: this block's values, the keys two blocks on */
                if (!rows) /* past the chunk's end too: prefetches never fault */
                    for (int64_t i = 0; i < W * D; i += W) {
                        __builtin_prefetch(v + j0 * D + i, 0, 3);
                        __builtin_prefetch(k + (j0 + 2 * W) * D + i, 0, 3);
                    }
                else /* a view's rows are scattered: row by row, within the chunk */
                    for (int64_t j = j0; j < j0 + W; ++j)
                        for (int64_t i = 0; i < D; i += W) {
                            __builtin_prefetch(ROW(v, j) + i, 0, 3);
                            if (j + 4 * W < n) __builtin_prefetch(ROW(k, j + 4 * W) + i, 0, 3);
                        }
            }
            vf t[W];
#pragma GCC unroll 16
            for (int i = 0; i < W; ++i) {
                const float *kj = ROW(k, j0 + BITREV[i]);
                vf a = qg[0] * ld(kj);
                for (int64_t d = 1; d < D / W; ++d) a += qg[d] * ld(kj + d * W);
                t[i] = a;
            }
            st(&s[g][j0], reduce16(t) * splat(scale));
        }
        for (; j0 < n; ++j0) {
            const float *kj = ROW(k, j0);
            vf a = qg[0] * ld(kj);
            for (int64_t d = 1; d < D / W; ++d) a += qg[d] * ld(kj + d * W);
            s[g][j0] = hsum(a) * scale;
        }
    }
    for (int64_t g = 0; g < G; ++g) {
        float mx = -INFINITY;
        for (int64_t j = 0; j < n; ++j) mx = s[g][j] > mx ? s[g][j] : mx;
        m[g] = mx;
        l[g] = exp_row(s[g], n, mx);
    }
    vf acc[G][D / W];
    for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D / W; ++d) acc[g][d] = (vf){0};
    for (int64_t j = 0; j < n; ++j)
        for (int64_t g = 0; g < G; ++g) {
            vf p = splat(s[g][j]);
            for (int64_t d = 0; d < D / W; ++d) acc[g][d] += p * ld(ROW(v, j) + d * W);
        }
    for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D / W; ++d) st(out + g * D + d * W, acc[g][d]);
#undef ROW
}

typedef void (*chunk_fn)(const float *, const float *, const float *, const int64_t *, int64_t, float, float *,
                         float *, float *);

/* Two copies per (G, D): contiguous keys (rows == NULL, folded away) and a view's rows. */
#define FAST(G, D)                                                                                         \
    static void chunk_g##G##_d##D(const float *q, const float *k, const float *v, const int64_t *rows,     \
                                  int64_t n, float scale, float *m, float *l, float *out) {                 \
        if (rows)                                                                                          \
            chunk_fast(q, k, v, rows, n, G, D, scale, m, l, out);                                          \
        else                                                                                               \
            chunk_fast(q, k, v, 0, n, G, D, scale, m, l, out);                                             \
    }
FAST(1, 64) FAST(2, 64) FAST(3, 64) FAST(4, 64) FAST(1, 128) FAST(2, 128)

/* The specialised chunk function for (G, D), or 0 (then chunk_partial, for any G and D). */
static chunk_fn fast_chunk(int64_t G, int64_t D) {
    static const chunk_fn d64[4] = {chunk_g1_d64, chunk_g2_d64, chunk_g3_d64, chunk_g4_d64};
    if (D == 64 && G >= 1 && G <= 4) return d64[G - 1];
    if (D == 128 && G >= 1 && G <= 2) return G == 1 ? chunk_g1_d128 : chunk_g2_d128;
    return 0;
}

int decode_attention_supported(int64_t G, int64_t D) { return G >= 1 && G <= MAX_G && D >= 1 && D <= MAX_D; }

/* Floats of scratch one call needs: (G * D + 2 * G) per work item for the chunks' partial
   results, then 2 * CHUNK * D per thread for the rows of a view's chunk. */
int64_t decode_attention_scratch_floats(int64_t S, const int64_t *lens, int64_t H_kv, int64_t G, int64_t D,
                                        int64_t threads) {
    int64_t items = 0;
    for (int64_t s = 0; s < S; ++s) items += H_kv * ((lens[s] + CHUNK - 1) / CHUNK);
    return items * (G * D + 2 * G) + threads * 2 * CHUNK * D;
}

/* Segment s: query qs[s] (H heads of D, H = H_kv * G, head stride qstrides[s]), keys ks[s] and values vs[s]
   (H_kv heads, token stride D, head strides kstrides[s] and vstrides[s] floats), output
   outs[s] (H x D). The segment attends lens[s] keys: tokens 0 .. lens[s] - 1 of each head,
   or, where views[s] is not NULL, a selected view of them: key j of head h is token
   views[s][h * view_lens[s] + j] for j < view_lens[s], then tails[s] + (j - view_lens[s])
   (the tokens appended since the selection). A view's chunks are copied into the thread's
   part of the scratch before the same chunk function runs, so a view gives the same bits as
   its rows copied out beforehand. scratch: decode_attention_scratch_floats(..., threads)
   floats; threads: the OpenMP threads to run on. */
void decode_attention(int64_t S, const int64_t *lens, const int64_t *qstrides, const int64_t *kstrides,
                      const int64_t *vstrides, float *const *qs,
                      float *const *ks, float *const *vs, float *const *outs, const int64_t *const *views,
                      const int64_t *view_lens, const int64_t *tails, int64_t H_kv, int64_t G, int64_t D, float scale,
                      float *scratch, int64_t threads) {
    /* Work items: per segment, per KV head, per chunk (first item index of each segment). */
    int64_t first[S + 1];
    first[0] = 0;
    for (int64_t s = 0; s < S; ++s) first[s + 1] = first[s] + H_kv * ((lens[s] + CHUNK - 1) / CHUNK);
    const int64_t items = first[S], per = G * D + 2 * G;
    float *const gather = scratch + items * per; /* per thread: one view chunk's keys and values */
    const chunk_fn fast = fast_chunk(G, D);
#pragma omp parallel num_threads(threads)
    {
#ifdef _OPENMP
        float *own = gather + (int64_t)omp_get_thread_num() * 2 * CHUNK * D;
#else
        float *own = gather;
#endif
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < items; ++it) {
            int64_t s = 0;
            while (first[s + 1] <= it) ++s;
            const int64_t chunks = (lens[s] + CHUNK - 1) / CHUNK, local = it - first[s];
            const int64_t h = local / chunks, c = local % chunks;
            const int64_t j0 = c * CHUNK, n = lens[s] - j0 < CHUNK ? lens[s] - j0 : CHUNK;
            /* The G query rows of this KV head, packed (a packed step's queries are strided). */
            float q[MAX_G * MAX_D] __attribute__((aligned(64)));
            for (int64_t g = 0; g < G; ++g) memcpy(q + g * D, qs[s] + (h * G + g) * qstrides[s], D * sizeof(float));
            const float *k = ks[s] + h * kstrides[s], *v = vs[s] + h * vstrides[s];
            float *part = scratch + it * per;
            if (views && views[s]) {
                /* The chunk's store rows: selected rows, then the tokens appended since. */
                const int64_t L0 = view_lens[s], *rows = views[s] + h * L0;
                int64_t idx[CHUNK];
                for (int64_t j = 0; j < n; ++j) idx[j] = j0 + j < L0 ? rows[j0 + j] : tails[s] + (j0 + j - L0);
                if (fast) {
                    fast(q, k, v, idx, n, scale, part, part + G, part + 2 * G);
                    continue;
                }
                float *kc = own, *vc = own + CHUNK * D; /* the generic path reads a copy */
                for (int64_t j = 0; j < n; ++j) {
                    memcpy(kc + j * D, k + idx[j] * D, D * sizeof(float));
                    memcpy(vc + j * D, v + idx[j] * D, D * sizeof(float));
                }
                k = kc;
                v = vc;
            } else {
                k += j0 * D;
                v += j0 * D;
            }
            if (fast)
                fast(q, k, v, 0, n, scale, part, part + G, part + 2 * G);
            else
                chunk_partial(q, k, v, n, G, D, scale, part, part + G, part + 2 * G);
        }
        /* Merge each (segment, KV head)'s chunks, in chunk order. */
#pragma omp for schedule(static)
        for (int64_t sh = 0; sh < S * H_kv; ++sh) {
            const int64_t s = sh / H_kv, h = sh % H_kv;
            const int64_t chunks = (lens[s] + CHUNK - 1) / CHUNK;
            const float *part0 = scratch + (first[s] + h * chunks) * per;
            for (int64_t g = 0; g < G; ++g) {
                float mx = -INFINITY;
                for (int64_t c = 0; c < chunks; ++c) mx = part0[c * per + g] > mx ? part0[c * per + g] : mx;
                float *o = outs[s] + (h * G + g) * D;
                float total = 0.0f;
                for (int64_t d = 0; d < D; ++d) o[d] = 0.0f;
                for (int64_t c = 0; c < chunks; ++c) {
                    const float *p = part0 + c * per;
                    const float w = expf(p[g] - mx);
                    total += p[G + g] * w;
                    const float *a = p + 2 * G + g * D;
                    for (int64_t d = 0; d < D; ++d) o[d] += a[d] * w;
                }
                const float inv = 1.0f / total;
                for (int64_t d = 0; d < D; ++d) o[d] *= inv;
            }
        }
    }
}
