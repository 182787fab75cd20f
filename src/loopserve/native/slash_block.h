/* One block function of the slash attention kernel, specialised at compile time.

   Included once per specialisation by slash_attention.c (no include guard, on purpose),
   after defining BLK_G (query heads per KV head), BLK_D (head dimension), BLK_TT (score
   tile) and BLK_DT (value tile). With compile-time sizes the score and value tiles
   (G x TT and G x DT vectors) live in registers. Defines blk_<G>_<D>. */

#define BLK_PASTE(g, d) blk_##g##_##d
#define BLK_NAME(g, d) BLK_PASTE(g, d)
static void BLK_NAME(BLK_G, BLK_D)(
           const float *qT, int64_t Rq, const float *KT, const float *VT, const float *bias, int64_t ldk,
           const int64_t *offsets, int64_t m, const float *kv, const float *vv, const int64_t *vkey, int64_t nv,
           int64_t p0, int64_t pad, int64_t r, float *S, float *acc, float *out, float *lse) {
    enum { G = BLK_G, D = BLK_D, TT = BLK_TT, DT = BLK_DT };
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

#undef BLK_NAME
#undef BLK_PASTE
#undef BLK_G
#undef BLK_D
#undef BLK_TT
#undef BLK_DT
