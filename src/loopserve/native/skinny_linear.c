/* y = x W^T (+ b) for a few rows of x: the linear layers of a decode step.

   A decode step multiplies one row per conversation by every weight matrix, so it is
   bound by reading the weights. BLAS sgemm packs the weights into panels first, which for
   2-16 rows makes the step read (and write) them more than once, so a few rows cost far
   more than one. Here each block of R weight rows is read once, straight from the
   weight matrix (the next block prefetched meanwhile), and multiplied by up to MT rows of x
   at a time (x stays in L1); the blocks are split over the process's OpenMP threads
   (torch's runtime, see loader.py). Prefetches past the matrix's end are harmless: they
   never fault.

   Every output element is the same sum in the same order whatever the number of rows, so
   a conversation's logits in a batch are the same bits as alone. */

#include <stdint.h>

#include "slash_vector.h"

#define R 4  /* weight rows per block */
#define MT 4 /* rows of x per tile */

/* mt rows of x (row stride I) times r weight rows (row stride I) into y (row stride O). */
static inline __attribute__((always_inline)) void tile(const float *x, int64_t I, const float *w, float *y,
                                                       int64_t O, const int mt, const int r) {
    vf acc[MT][R];
    for (int m = 0; m < mt; ++m)
        for (int j = 0; j < r; ++j) acc[m][j] = (vf){0};
    int64_t i = 0;
    for (; i + W <= I; i += W) {
        vf wv[R];
        for (int j = 0; j < r; ++j) wv[j] = ld(w + j * I + i);
        /* The next block's rows, while this one is multiplied: more loads in flight. */
        for (int j = 0; j < r; ++j) __builtin_prefetch(w + (R + j) * I + i, 0, 3);
        for (int m = 0; m < mt; ++m) {
            vf xv = ld(x + m * I + i);
            for (int j = 0; j < r; ++j) acc[m][j] += xv * wv[j];
        }
    }
    for (int m = 0; m < mt; ++m)
        for (int j = 0; j < r; ++j) {
            float s = hsum(acc[m][j]);
            for (int64_t t = i; t < I; ++t) s += x[m * I + t] * w[j * I + t];
            y[m * O + j] = s;
        }
}

#define TILE(mt, r) \
    static void tile_##mt##_##r(const float *x, int64_t I, const float *w, float *y, int64_t O) { tile(x, I, w, y, O, mt, r); }
TILE(1, 4) TILE(2, 4) TILE(3, 4) TILE(4, 4) TILE(1, 1) TILE(2, 1) TILE(3, 1) TILE(4, 1)

typedef void (*tile_fn)(const float *, int64_t, const float *, float *, int64_t);
static const tile_fn BLOCK[MT + 1] = {0, tile_1_4, tile_2_4, tile_3_4, tile_4_4};
static const tile_fn SINGLE[MT + 1] = {0, tile_1_1, tile_2_1, tile_3_1, tile_4_1};

/* x: M rows of I floats; w: O rows of I floats; bias: O floats or NULL; y: M rows of O. */
void skinny_linear(const float *x, int64_t M, int64_t I, const float *w, const float *bias, int64_t O, float *y,
                   int64_t threads) {
    const int64_t blocks = O / R, units = blocks + O % R; /* R-row blocks, then single rows */
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t u = 0; u < units; ++u) {
        const int64_t o = u < blocks ? u * R : blocks * R + (u - blocks);
        const tile_fn *fns = u < blocks ? BLOCK : SINGLE;
        for (int64_t m = 0; m < M; m += MT) {
            const int64_t mt = M - m < MT ? M - m : MT;
            fns[mt](x + m * I, I, w + o * I, y + m * O + o, O);
        }
    }
    if (bias)
        for (int64_t m = 0; m < M; ++m)
            for (int64_t o = 0; o < O; ++o) y[m * O + o] += bias[o];
}
