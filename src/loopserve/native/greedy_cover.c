#include <math.h>  /* isnan, INFINITY */
#include <stdint.h>
#include <stdlib.h>

/* Greedy maximum coverage rounds of Phase 1 line selection: the C version of the numpy
   round loop in loopserve.attention.cover._greedy_cover, which it mirrors (the same lines
   in the same order, gains equal to rounding: sums are taken in another order). Built by loopserve.native.loader.

   gain (B, 2, N) fp64: marginal mass of vertical x (kind 0) / slash x (kind 1), -inf once
   taken; chosen (B, 2, N); A (B, s, N) fp32 probe attention; pos (s) row positions.
   Each round, per active head: the leading kind's lines with gain >= the other kind's
   best (and > tol), in gain order (ties: smaller index first, as numpy's stable sort),
   cut where the target or lines_left is reached; taking a line lowers the other kind's
   gains by the cells they share. Picks are appended to the log. Returns the number of
   rounds (the most runs any head took: heads are independent, so running them one after
   another takes the same lines as the numpy loop's rounds over all heads at once).

   Each head keeps one max-heap of (gain, line) per kind, updated lazily: gains only
   go down, so an entry whose stored gain is above the line's current gain is refreshed
   when it reaches the top, and the top, once fresh, is the kind's best line. A round then
   costs the lines it takes, not a scan of all 2N gains (hundreds of rounds a layer).
   heap: 4N doubles of scratch (two heaps of N (gain, line) entries). */

typedef struct {
    double g;
    int64_t x;
} entry;

/* a comes before b: larger gain, then smaller line index */
static inline int before(entry a, entry b) { return a.g > b.g || (a.g == b.g && a.x < b.x); }

static void sift_down(entry *h, int64_t n, int64_t i) {
    const entry e = h[i];
    for (;;) {
        int64_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && before(h[c + 1], h[c])) ++c;
        if (!before(h[c], e)) break;
        h[i] = h[c];
        i = c;
    }
    h[i] = e;
}

/* The heap of a kind's untaken lines; -1 if a gain is NaN (the numpy loop's max is then
   NaN and the head takes nothing). */
static int64_t build_heap(entry *h, const double *gain, int64_t N) {
    int64_t n = 0;
    for (int64_t x = 0; x < N; ++x) {
        if (isnan(gain[x])) return -1;
        if (gain[x] != -INFINITY) { h[n].g = gain[x]; h[n].x = x; ++n; }
    }
    for (int64_t i = n / 2 - 1; i >= 0; --i) sift_down(h, n, i);
    return n;
}

/* Drop taken lines and refresh stale gains at the top; the fresh top's gain (-inf: none).
   Only a lower gain is stale (gains only fall); a NaN one is returned, and stops the head. */
static double fresh_top(entry *h, int64_t *n, const double *gain) {
    while (*n > 0) {
        const double cur = gain[h[0].x];
        if (cur == -INFINITY) {
            h[0] = h[--*n];
            sift_down(h, *n, 0);
        } else if (cur < h[0].g) {
            h[0].g = cur;
            sift_down(h, *n, 0);
        } else {
            return cur;
        }
    }
    return -INFINITY;
}

int64_t greedy_rounds(double *gain, uint8_t *chosen, const float *A, const int64_t *pos, int64_t B, int64_t s,
                      int64_t N, double *covered, const double *target, const double *tol, int64_t *lines_left,
                      int64_t *log_b, int64_t *log_k, int64_t *log_x, double *log_g, int64_t *n_log,
                      double *heap) {
    int64_t rounds = 0, nl = *n_log;
    entry *heaps[2] = {(entry *)heap, (entry *)heap + N};
    for (int64_t b = 0; b < B; ++b) {
        double *gains[2] = {gain + (b * 2) * N, gain + (b * 2 + 1) * N};
        int64_t size[2] = {build_heap(heaps[0], gains[0], N), build_heap(heaps[1], gains[1], N)};
        if (size[0] < 0 || size[1] < 0) continue;
        const float *Ab = A + b * s * N;
        int64_t runs = 0;
        for (;;) {
            const double m0 = fresh_top(heaps[0], &size[0], gains[0]);
            const double m1 = fresh_top(heaps[1], &size[1], gains[1]);
            const int lead = m0 >= m1 ? 0 : 1;
            const double best = lead ? m1 : m0, bound = lead ? m0 : m1;
            if (!(covered[b] < target[b] && best > tol[b] && lines_left[b] > 0)) break;
            ++runs;
            entry *h = heaps[lead];
            double *cand = gains[lead], *other = gains[1 - lead];
            const double remaining = target[b] - covered[b];
            double taken_gain = 0.0;
            int64_t taken = 0;
            /* The leading kind's gains do not change during its run (taking its lines lowers
               only the other kind's), so its heap yields the run in order. */
            for (;;) {
                const double g = fresh_top(h, &size[lead], cand);
                if (!(g >= bound && g > tol[b])) break;
                if (!(taken_gain < remaining) || taken >= lines_left[b]) break;
                const int64_t x = h[0].x;
                h[0] = h[--size[lead]];
                sift_down(h, size[lead], 0);
                taken_gain += g;
                ++taken;
                const double gp = g > 0.0 ? g : 0.0;
                log_b[nl] = b; log_k[nl] = lead; log_x[nl] = x; log_g[nl] = gp; ++nl;
                covered[b] += gp;
                cand[x] = -INFINITY;
                chosen[(b * 2 + lead) * N + x] = 1;
                for (int64_t r = 0; r < s; ++r) {
                    const int64_t ox = pos[r] - x;
                    if (ox < 0) continue;
                    other[ox] -= (double)Ab[r * N + (lead == 0 ? x : ox)];
                }
            }
            lines_left[b] -= taken;
        }
        if (runs > rounds) rounds = runs;
    }
    *n_log = nl;
    return rounds;
}

/* The initial gains of greedy_rounds: gain[b, 0, x] = sum over rows r of A[b, r, x] (x <=
   pos[r]), gain[b, 1, o] = sum over r of A[b, r, pos[r] - o], in fp64, rows in order.
   gain must be zeroed by the caller. */
void greedy_line_mass(const float *A, const int64_t *pos, int64_t B, int64_t s, int64_t N, double *gain) {
    for (int64_t b = 0; b < B; ++b) {
        double *g0 = gain + (b * 2) * N, *g1 = g0 + N;
        for (int64_t r = 0; r < s; ++r) {
            const float *row = A + (b * s + r) * N;
            const int64_t p = pos[r];
            for (int64_t x = 0; x <= p; ++x) {
                const double a = (double)row[x];
                g0[x] += a;
                g1[p - x] += a;
            }
        }
    }
}
