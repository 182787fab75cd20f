#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* Greedy maximum coverage rounds of Phase 1 line selection: the C version of the numpy
   round loop in loopserve.attention.lines._greedy_cover, which it mirrors exactly (the
   same lines in the same order with the same gains). Built by loopserve.native.loader.

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
