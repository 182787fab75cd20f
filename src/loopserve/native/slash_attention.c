/* Sparse prefill attention over vertical and slash lines: the native kernel behind
   loopserve.attention.sparse (see its module docstring for the design and the torch path
   that gives the same result without a compiler).

   A slash cell reads a different key for every row, so it has no matmul form: each cell
   is one D-long dot product and one D-long axpy. In torch ops that costs ~30-40 ns per
   cell; here 16 rows sit in the lanes of a vector register (their keys at one offset are
   contiguous), ~4 ns per (query head, cell), verticals included. Built by
   loopserve.native.loader with the system C compiler (-O3 -march=native), called
   through ctypes (which releases the GIL, so row ranges run on several Python threads). */

#include <stdint.h>
#include <string.h>

#include "slash_vector.h"

/* One block function per (G, D): (G, score tile TT, value tile DT). G*TT and G*DT
   accumulators stay within ~24 of the 32 vector registers; DT must divide D. */
#define BLK_G 1
#define BLK_D 64
#define BLK_TT 8
#define BLK_DT 16
#include "slash_block.h"

#define BLK_G 2
#define BLK_D 64
#define BLK_TT 8
#define BLK_DT 8
#include "slash_block.h"

#define BLK_G 3
#define BLK_D 64
#define BLK_TT 8
#define BLK_DT 8
#include "slash_block.h"

#define BLK_G 4
#define BLK_D 64
#define BLK_TT 6
#define BLK_DT 4
#include "slash_block.h"

#define BLK_G 5
#define BLK_D 64
#define BLK_TT 4
#define BLK_DT 4
#include "slash_block.h"

#define BLK_G 6
#define BLK_D 64
#define BLK_TT 4
#define BLK_DT 4
#include "slash_block.h"

#define BLK_G 7
#define BLK_D 64
#define BLK_TT 3
#define BLK_DT 2
#include "slash_block.h"

#define BLK_G 8
#define BLK_D 64
#define BLK_TT 3
#define BLK_DT 2
#include "slash_block.h"

#define BLK_G 1
#define BLK_D 128
#define BLK_TT 8
#define BLK_DT 16
#include "slash_block.h"

#define BLK_G 2
#define BLK_D 128
#define BLK_TT 8
#define BLK_DT 8
#include "slash_block.h"

#define BLK_G 3
#define BLK_D 128
#define BLK_TT 8
#define BLK_DT 8
#include "slash_block.h"

#define BLK_G 4
#define BLK_D 128
#define BLK_TT 6
#define BLK_DT 4
#include "slash_block.h"

#define BLK_G 5
#define BLK_D 128
#define BLK_TT 4
#define BLK_DT 4
#include "slash_block.h"

#define BLK_G 6
#define BLK_D 128
#define BLK_TT 4
#define BLK_DT 4
#include "slash_block.h"

#define BLK_G 7
#define BLK_D 128
#define BLK_TT 3
#define BLK_DT 2
#include "slash_block.h"

#define BLK_G 8
#define BLK_D 128
#define BLK_TT 3
#define BLK_DT 2
#include "slash_block.h"

typedef void (*blk_fn)(const float *, int64_t, const float *, const float *, const float *, int64_t,
                       const int64_t *, int64_t, const float *, const float *, const int64_t *, int64_t, int64_t,
                       int64_t, int64_t, int64_t, float *, float *, float *, float *);
static const blk_fn table64[8] = {blk_1_64, blk_2_64, blk_3_64, blk_4_64, blk_5_64, blk_6_64, blk_7_64, blk_8_64};
static const blk_fn table128[8] = {blk_1_128, blk_2_128, blk_3_128, blk_4_128,
                                   blk_5_128, blk_6_128, blk_7_128, blk_8_128};

/* Whether a (G query heads, head dimension D) shape has a specialisation. */
int slash_supported(int64_t G, int64_t D) { return G >= 1 && G <= 8 && (D == 64 || D == 128); }

/* Floats of scratch memory one call of slash_attention needs for G query heads of dimension D:
   the score tile, and a sweep's per-block accumulators, running maxima and sums. */
int64_t slash_scratch_floats(int64_t G, int64_t D) { return G * (TC + 8) * W + SWEEP * (G * D * W + 2 * G * W); }

/* Rows [r0, r1) (multiples of 16) of one KV head, over its verticals and slashes.
   qT (G, D, Rq) pre-scaled queries, transposed (Rq a multiple of 16); KT, VT (D, ldk):
   K/V transposed with `pad` zero keys in front (key j at column pad + j) and >= 16 zero
   keys behind; bias (ldk): 0 for keys a slash may use, -inf for the front padding and
   for vertical keys (a vertical/slash intersection belongs to the vertical);
   offsets ascending (m), pad >= the largest; kv, vv (nv, D): the K/V rows of the
   verticals, keys vkey ascending (nv); row r sits at position p0 + r.
   scratch: slash_scratch_floats(G, D) floats. Writes out (G, Rq, D) and lse (G, Rq) (-inf for
   rows without a cell). */
void slash_attention(const float *qT, int64_t Rq, const float *KT, const float *VT, const float *bias,
                     int64_t ldk, const int64_t *offsets, int64_t m, const float *kv, const float *vv,
                     const int64_t *vkey, int64_t nv, int64_t G, int64_t D, int64_t p0,
                     int64_t pad, int64_t r0, int64_t r1, float *scratch, float *out, float *lse) {
    blk_fn f = (D == 64 ? table64 : table128)[G - 1];
    f(qT, Rq, KT, VT, bias, ldk, offsets, m, kv, vv, vkey, nv, p0, pad, r0, r1, scratch, scratch + G * (TC + 8) * W,
      out, lse);
}
