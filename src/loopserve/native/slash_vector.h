/* Vector helpers of the native kernels (slash_attention.c with slash_block.h,
   decode_attention.c, skinny_linear.c): 16-float vectors, loads, exp, lane sums.

   The slash kernel is row-vectorised: W = 16 consecutive rows share one vector register
   lane each: for offset o, their keys are the contiguous keys pos_0 - o .. pos_0 - o + 15,
   so with K, V stored transposed (d-major) every load is one contiguous vector and the
   dot products, softmax and value sums are plain vertical vector arithmetic (no
   horizontal reductions). The G query heads of a KV head share every K/V load. */

#ifndef LOOPSERVE_SLASH_VECTOR_H
#define LOOPSERVE_SLASH_VECTOR_H

#include <math.h>
#include <stdint.h>

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

/* The sum of a vector's lanes, in a fixed order (a tree of shuffles). */
static inline float hsum(vf a) {
    a = a + __builtin_shuffle(a, (vi){8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
    a = a + __builtin_shuffle(a, (vi){4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
    a = a + __builtin_shuffle(a, (vi){2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
    a = a + __builtin_shuffle(a, (vi){1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
    return a[0];
}

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

/* The positions of a 16-row block starting at pos0, one per lane. */
static inline vi lanes(int64_t pos0) {
    vi v;
    for (int i = 0; i < W; ++i) v[i] = (int32_t)(pos0 + i);
    return v;
}

#define TC 32 /* offsets per online-softmax chunk */
#define SWEEP 8 /* 16-row blocks that take each chunk of lines in turn */

#endif
