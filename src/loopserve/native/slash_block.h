/* The block functions of the slash attention kernel, specialised at compile time.

   Included once per specialisation by slash_attention.c (no include guard, on purpose),
   after defining BLK_G (query heads per KV head), BLK_D (head dimension), BLK_TT (score
   tile) and BLK_DT (value tile). With compile-time sizes the score and value tiles
   (G x TT and G x DT vectors) live in registers. Defines step_<G>_<D> (one chunk of lines
   for one 16-row block) and blk_<G>_<D> (a range of rows). */

#define BLK_PASTE(a, g, d) a##_##g##_##d
#define BLK_NAME(a, g, d) BLK_PASTE(a, g, d)
#define BLK_STEP BLK_NAME(step, BLK_G, BLK_D)

/* One chunk of nc lines for the 16-row block at row r: verticals (vert: kv, vv rows c0 ..,
   one key for all lanes) or slashes (offsets[c0 ..], a contiguous key vector each). Scores,
   then the online softmax update of the block's running max and sum (ml: G vectors each)
   and of its accumulator acc (G*D*W). S: G*(TC+8)*W scratch. */
static inline void BLK_STEP(const float *qT, int64_t Rq, const float *KT, const float *VT, const float *bias,
                            int64_t ldk, const int64_t *offsets, const float *kv, const float *vv,
                            const int64_t *vkey, int64_t base, vi lane_pos, int vert, int64_t c0, int64_t nc,
                            int64_t r, float *S, float *acc, float *ml) {
    enum { G = BLK_G, D = BLK_D, TT = BLK_TT, DT = BLK_DT };
    vf mrun[G], lrun[G];
    for (int g = 0; g < G; ++g) { mrun[g] = ld(ml + g * W); lrun[g] = ld(ml + (G + g) * W); }
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
            for (int u = 0; u < TT; ++u) kb[u] = base - offsets[c0 + t + (u < tt_n ? u : 0)];
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
                const int64_t vb = base - offsets[c0 + u];
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
    for (int g = 0; g < G; ++g) { st(ml + g * W, mrun[g]); st(ml + (G + g) * W, lrun[g]); }
}

/* Rows [r0, r1) (multiples of 16), in sweeps of up to SWEEP 16-row blocks. In a sweep the
   loop over chunks of lines is outside the loop over blocks: the blocks read a chunk's keys
   one after another (a slash's keys for the next block follow its keys for this one), so
   they come from cache instead of memory. (Verticals, the same keys for every block, go
   block by block.) Each block still takes its causal lines in the
   same chunks and order as alone (verticals, then slashes): the same online softmax.
   state: SWEEP * (G*D*W + 2*G*W) floats. */
static void BLK_NAME(blk, BLK_G, BLK_D)(
           const float *qT, int64_t Rq, const float *KT, const float *VT, const float *bias, int64_t ldk,
           const int64_t *offsets, int64_t m, const float *kv, const float *vv, const int64_t *vkey, int64_t nv,
           int64_t p0, int64_t pad, int64_t r0, int64_t r1, float *S, float *state, float *out, float *lse) {
    enum { G = BLK_G, D = BLK_D, STATE = G * D * W + 2 * G * W };
    for (int64_t rs = r0; rs < r1; rs += SWEEP * W) {
        const int64_t nb = (r1 - rs < SWEEP * W ? r1 - rs : SWEEP * W) / W;
        int64_t nvt[SWEEP], mt[SWEEP];
        int64_t cv = 0, cs = 0; /* the causal lines of a block: a prefix of each sorted list */
        for (int64_t b = 0; b < nb; ++b) {
            const int64_t last = p0 + rs + b * W + W - 1;
            while (cs < m && offsets[cs] <= last) ++cs;
            while (cv < nv && vkey[cv] <= last) ++cv;
            nvt[b] = cv;
            mt[b] = cs;
            float *st_b = state + b * STATE;
            memset(st_b, 0, sizeof(float) * G * D * W);
            for (int g = 0; g < G; ++g) {
                st(st_b + G * D * W + g * W, splat(-INFINITY));
                st(st_b + G * D * W + (G + g) * W, splat(0.0f));
            }
        }
        /* Verticals block by block (their keys are the same for every block, and a
           block's accumulator stays in L1 over them), then slashes chunk by chunk. */
        for (int64_t b = 0; b < nb; ++b) {
            const int64_t r = rs + b * W, pos0 = p0 + r;
            float *st_b = state + b * STATE;
            for (int64_t c0 = 0; c0 < nvt[b]; c0 += TC) {
                const int64_t e = nvt[b] < c0 + TC ? nvt[b] : c0 + TC;
                BLK_STEP(qT, Rq, KT, VT, bias, ldk, offsets, kv, vv, vkey, pad + pos0, lanes(pos0), 1, c0, e - c0, r,
                         S, st_b, st_b + G * D * W);
            }
        }
        for (int64_t c0 = 0; c0 < mt[nb - 1]; c0 += TC) {
            for (int64_t b = 0; b < nb; ++b) {
                const int64_t e = mt[b] < c0 + TC ? mt[b] : c0 + TC;
                if (e <= c0) continue;
                const int64_t r = rs + b * W, pos0 = p0 + r;
                float *st_b = state + b * STATE;
                BLK_STEP(qT, Rq, KT, VT, bias, ldk, offsets, kv, vv, vkey, pad + pos0, lanes(pos0), 0, c0, e - c0, r,
                         S, st_b, st_b + G * D * W);
            }
        }
        for (int64_t b = 0; b < nb; ++b) {
            const int64_t r = rs + b * W;
            const float *st_b = state + b * STATE;
            for (int g = 0; g < G; ++g) {
                float lv[W], mv[W], inv[W];
                st(lv, ld(st_b + G * D * W + (G + g) * W));
                st(mv, ld(st_b + G * D * W + g * W));
                for (int i = 0; i < W; ++i) {
                    inv[i] = lv[i] > 0.0f ? 1.0f / lv[i] : 0.0f;
                    lse[(int64_t)g * Rq + r + i] = lv[i] > 0.0f ? mv[i] + logf(lv[i]) : -INFINITY;
                }
                const float *ag = st_b + (int64_t)g * D * W;
                float *og = out + ((int64_t)g * Rq + r) * D;
                for (int i = 0; i < W; ++i)
                    for (int d = 0; d < D; ++d) og[i * D + d] = ag[d * W + i] * inv[i];
            }
        }
    }
}

#undef BLK_STEP
#undef BLK_NAME
#undef BLK_PASTE
#undef BLK_G
#undef BLK_D
#undef BLK_TT
#undef BLK_DT
