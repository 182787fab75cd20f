"""Tests for line selection (probe rows, greedy coverage, pattern helpers)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loopserve.attention import (
    LinePattern,
    a_shape_pattern,
    attention_recall,
    greedy_cover,
    lines_from_topk,
    pattern_density,
    pattern_mask,
    probe_attention,
    probe_rows,
    select_lines,
)


def line_cells(kind: int, x: int, pos: torch.Tensor, N: int) -> torch.Tensor:
    """Brute-force (s, N) bool mask of the causal cells of one line."""
    cols = torch.arange(N)[None, :]
    causal = cols <= pos[:, None]
    if kind == 0:
        return causal & (cols == x)
    return causal & (cols == pos[:, None] - x)


def random_probe(s: int, N: int, seed: int, peaky: float = 3.0):
    """A probe-attention-like matrix: rows are causal softmaxes with some structure."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.randperm(N, generator=g)[:s].sort().values
    logits = torch.randn(s, N, generator=g) * peaky
    logits[:, torch.randperm(N, generator=g)[:3]] += 4.0  # a few strong columns
    cols = torch.arange(N)[None, :]
    logits = logits + 3.0 * ((pos[:, None] - cols) < 4)  # a local band
    logits = logits.masked_fill(cols > pos[:, None], -math.inf)
    return torch.softmax(logits, -1), pos


def qk(H=4, Hkv=2, n=96, N=96, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(H, n, D, generator=g), torch.randn(Hkv, N, D, generator=g)


# ---------------------------------------------------------------------------- probe rows


def test_probe_rows_spread_over_input_and_deterministic():
    n = 4000
    rows = probe_rows(n, seed=3)
    assert len(rows) == 80 + 8  # s = max(64, 2% of n) plus the last 8 rows
    assert rows.unique().numel() == len(rows)
    assert set(range(n - 8, n)) <= set(rows.tolist())
    random_part = rows[:-8]
    quartiles = torch.bincount(random_part * 4 // n, minlength=4)
    assert (quartiles >= 10).all(), quartiles  # uniform, not tail-only
    assert torch.equal(rows, probe_rows(n, seed=3))
    assert not torch.equal(rows, probe_rows(n, seed=4))


def test_probe_rows_small_input_uses_all_rows():
    assert torch.equal(probe_rows(50), torch.arange(50))
    assert torch.equal(probe_rows(72), torch.arange(72))  # n <= 64 + 8
    assert len(probe_rows(73)) == 72


def test_probe_attention_rows_are_causal_distributions():
    q, k = qk(n=40, N=100)
    rows = torch.tensor([0, 7, 39])
    A, pos = probe_attention(q, k, rows)
    assert A.shape == (2, 3, 100)
    assert torch.equal(pos, rows + 60)
    torch.testing.assert_close(A.sum(-1), torch.full((2, 3), 2.0))  # group of 2 summed
    assert (A[:, 0, 61:] == 0).all()
    Aq, _ = probe_attention(q, k, rows, per_query_head=True)
    torch.testing.assert_close(Aq.view(2, 2, 3, 100).sum(1), A)


# ---------------------------------------------------------------------------- greedy


@pytest.mark.parametrize("alpha", [0.5, 0.8, 0.9, 0.99])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_reaches_alpha_with_exact_greedy_choices(alpha, seed):
    s, N = 12, 40
    A, pos = random_probe(s, N, seed)
    A = torch.stack([A, random_probe(s, N, seed + 100)[0].roll(1, -1).tril(20)])  # 2 heads
    res = greedy_cover(A, pos, alpha=alpha, forced_vertical=[0], forced_slash=[0, 1])
    all_lines = torch.stack([line_cells(kind, x, pos, N) for kind in (0, 1) for x in range(N)])
    for b in range(2):
        total = A[b].masked_fill(torch.arange(N)[None, :] > pos[:, None], 0).sum()
        covered = torch.zeros(s, N, dtype=torch.bool)
        picks, gains = res.picks[b].tolist(), res.gains[b]
        n_forced = res.n_forced[b]
        assert n_forced == 3
        for t, (kind, x) in enumerate(picks):
            cells = line_cells(kind, x, pos, N)
            true_gain = (A[b].double() * (cells & ~covered)).sum()
            assert abs(true_gain - gains[t]) < 1e-6  # recorded gain is the true marginal gain
            if t >= n_forced:
                assert true_gain > 0, "a chosen line has zero marginal gain"
                # Exact greedy: no other line had a larger marginal gain at that moment.
                best = (A[b].double() * (all_lines & ~covered)).sum((1, 2)).max()
                assert true_gain >= best - 1e-6
            covered |= cells
        frac = float((A[b].double() * covered).sum() / total)
        assert frac >= alpha - 1e-9
        assert abs(frac - float(res.fraction[b])) < 1e-6
        # The mask output agrees with the pick log.
        assert res.vertical[b].sum() + res.slash[b].sum() == len(picks)


def test_greedy_stops_at_zero_gain_and_never_picks_zero_mass_lines():
    # Mass only in two columns: greedy covers everything with two verticals, then stops.
    s, N = 6, 10
    pos = torch.arange(4, 10)
    A = torch.zeros(s, N)
    A[:, 1] = 0.7
    A[:, 3] = 0.3
    res = greedy_cover(A, pos, alpha=1.0)
    assert res.vertical.nonzero().flatten().tolist() == [1, 3]
    assert not res.slash.any()
    assert float(res.fraction) == pytest.approx(1.0)


def test_greedy_cut_exactly_at_alpha():
    # Ten equal columns: alpha = 0.35 needs exactly four of them, not the whole run.
    pos = torch.tensor([20, 25])
    A = torch.zeros(2, 30)
    A[:, :10] = 0.1
    res = greedy_cover(A, pos, alpha=0.35)
    assert int(res.vertical.sum()) == 4
    assert int(res.slash.sum()) == 0


def test_max_lines_limits_greedy_lines():
    A, pos = random_probe(10, 30, 5)
    res = greedy_cover(A, pos, alpha=None, max_lines=7, forced_slash=[0])
    assert len(res.picks[0]) == 8


@settings(max_examples=60, deadline=None)
@given(
    s=st.integers(1, 5),
    N=st.integers(2, 8),
    k=st.integers(1, 3),
    data=st.data(),
)
def test_greedy_within_one_minus_one_over_e_of_optimum(s, N, k, data):
    s = min(s, N)
    pos = torch.tensor(sorted(data.draw(st.lists(st.integers(0, N - 1), min_size=s, max_size=s, unique=True))))
    values = data.draw(st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=s * N, max_size=s * N))
    A = torch.tensor(values, dtype=torch.float64).view(s, N)
    A = A.masked_fill(torch.arange(N)[None, :] > pos[:, None], 0.0)
    lines = [line_cells(kind, x, pos, N) for kind in (0, 1) for x in range(N)]
    best = 0.0
    for subset in itertools.combinations(range(len(lines)), min(k, len(lines))):
        mask = torch.zeros(s, N, dtype=torch.bool)
        for i in subset:
            mask |= lines[i]
        best = max(best, float((A * mask).sum()))
    res = greedy_cover(A, pos, alpha=None, max_lines=k)
    assert len(res.picks[0]) <= k
    assert float(res.covered[0]) >= (1 - 1 / math.e) * best - 1e-9


# ---------------------------------------------------------------------------- select_lines


def test_select_lines_pattern_structure_and_forced_lines():
    q, k = qk(H=6, Hkv=2, n=200, N=300, D=16)
    p = select_lines(q, k, alpha=0.8, sinks=4, local=16, seed=1)
    assert p.n_heads == 2 and p.n == 200 and p.N == 300 and not p.per_query_head
    for v, s in zip(p.vertical, p.slash):
        assert set(range(4)) <= set(v.tolist())
        assert set(range(16)) <= set(s.tolist())
        assert torch.equal(v, v.sort().values) and torch.equal(s, s.sort().values)
    assert (p.probe_mass >= 0.8 - 1e-6).all()
    assert len(p.probe_idx) == 72
    vp, vvalid, sp, svalid = p.padded()
    assert vp.shape[0] == 2 and (vp[~vvalid] == -1).all()
    assert torch.equal(vp[0][vvalid[0]], p.vertical[0])
    assert torch.equal(sp[1][svalid[1]], p.slash[1])


def test_density_does_not_decrease_with_alpha():
    q, k = qk(H=4, Hkv=2, n=160, N=256, D=16, seed=3)
    densities = [pattern_density(select_lines(q, k, alpha=a, local=8)) for a in (0.3, 0.5, 0.7, 0.9, 0.99, 1.0)]
    assert all(a <= b + 1e-12 for a, b in zip(densities, densities[1:])), densities
    assert densities[-1] > densities[0]


def test_history_column_is_selectable_as_vertical():
    H, Hkv, n, N, D = 4, 2, 32, 256, 16
    q, k = qk(H, Hkv, n, N, D, seed=7)
    direction = torch.randn(D)
    direction /= direction.norm()
    k[:, 50] = 6.0 * direction  # a key deep in the history everyone attends to
    q += 3.0 * direction
    p = select_lines(q, k, alpha=0.5, sinks=0, local=4)
    for v in p.vertical:
        assert 50 in v.tolist()


def test_per_query_head_patterns():
    q, k = qk(H=4, Hkv=2, n=64, N=64)
    p = select_lines(q, k, alpha=0.7, per_query_head=True, local=4)
    assert p.n_heads == 4 and p.per_query_head


def test_pattern_density_matches_brute_force():
    n, N = 40, 90
    g = torch.Generator().manual_seed(0)
    vs = [torch.randperm(N, generator=g)[:10], torch.tensor([0, 89])]
    ss = [torch.randperm(N, generator=g)[:12], torch.arange(5)]
    p = LinePattern.from_lines(vs, ss, n, N)
    causal = n * (N - n) + n * (n + 1) // 2
    brute = sum(int(pattern_mask(p, h, torch.arange(n)).sum()) for h in range(2)) / (2 * causal)
    assert pattern_density(p) == pytest.approx(brute)
    full = LinePattern.from_lines([torch.arange(N)], [torch.arange(N)], n, N)
    assert pattern_density(full) == pytest.approx(1.0)


def test_attention_recall():
    q, k = qk(H=4, Hkv=2, n=64, N=128)
    rows = torch.tensor([3, 17, 40])
    full = LinePattern.from_lines([torch.arange(128)] * 2, [[]] * 2, 64, 128)
    assert attention_recall(q, k, full, rows) == pytest.approx(1.0)
    p = select_lines(q, k, alpha=0.6, local=4)
    A, _ = probe_attention(q, k, rows, per_query_head=True)
    brute = sum(float((A[h] * pattern_mask(p, h // 2, rows)).sum() / A[h].sum()) for h in range(4)) / 4
    assert attention_recall(q, k, p, rows) == pytest.approx(brute)


def test_from_lines_cleans_and_baselines():
    p = LinePattern.from_lines([[5, 3, 3, -1, 99]], [[2, 0, 2]], 10, 20)
    assert p.vertical[0].tolist() == [3, 5] and p.slash[0].tolist() == [0, 2]
    a = a_shape_pattern(3, 50, 80, sinks=4, local=16)
    assert a.n_heads == 3 and a.vertical[0].tolist() == [0, 1, 2, 3] and len(a.slash[2]) == 16
    q, k = qk(H=4, Hkv=2, n=100, N=150)
    m = lines_from_topk(q, k, n_vertical=5, n_slash=7, last_q=16, sinks=3, local=10)
    assert [len(v) for v in m.vertical] == [8, 8] and [len(s) for s in m.slash] == [17, 17]


def test_native_greedy_rounds_match_numpy_rounds(monkeypatch):
    """The C greedy (used when the native kernel builds: its lazy heaps and its own sums of the
    line masses) takes the same lines, in the same order, with the same gains as the numpy
    loop; both ignore the cells above the causal diagonal."""
    from loopserve.attention import cover as cover_module

    if cover_module.native_kernels() is None:
        pytest.skip("no C compiler for the native kernels")
    g = torch.Generator().manual_seed(5)
    s, N, B = 24, 300, 3
    pos = torch.randperm(N, generator=g)[:s].sort().values
    A = torch.rand(B, s, N, generator=g) ** 6  # peaky, like real attention (non-causal cells left in)
    kwargs = dict(alpha=0.9, forced_vertical=[0, 1], forced_slash=range(4))
    native = greedy_cover(A, pos, **kwargs)
    monkeypatch.setattr(cover_module, "native_kernels", lambda: None)
    ref = greedy_cover(A, pos, **kwargs)
    assert native.rounds == ref.rounds > 1
    for b in range(B):
        assert torch.equal(native.picks[b], ref.picks[b])
        torch.testing.assert_close(native.gains[b], ref.gains[b], rtol=0, atol=1e-9)
    assert torch.equal(native.vertical, ref.vertical) and torch.equal(native.slash, ref.slash)
    torch.testing.assert_close(native.covered, ref.covered, rtol=0, atol=1e-9)


@pytest.mark.parametrize("kwargs", [dict(alpha=None, max_lines=40), dict(alpha=0.99, max_lines=7), dict(alpha=0.5)])
def test_native_greedy_matches_numpy_under_every_stop_rule(monkeypatch, kwargs):
    """Line caps, no mass target, and exact ties (quantised cells: equal gains everywhere)
    give the same picks in C as in numpy (ties: the smaller index first)."""
    from loopserve.attention import cover as cover_module

    if cover_module.native_kernels() is None:
        pytest.skip("no C compiler for the native kernels")
    g = torch.Generator().manual_seed(7)
    s, N, B = 16, 120, 2
    pos = torch.randperm(N, generator=g)[:s].sort().values
    A = (torch.rand(B, s, N, generator=g) * 4).floor() / 4  # many equal cells, so equal gains
    native = greedy_cover(A, pos, **kwargs)
    monkeypatch.setattr(cover_module, "native_kernels", lambda: None)
    ref = greedy_cover(A, pos, **kwargs)
    assert native.rounds == ref.rounds
    for b in range(B):
        assert torch.equal(native.picks[b], ref.picks[b])


def test_nan_attention_stops_the_greedy():
    """A NaN in the probe attention (a broken model) ends the greedy with the forced lines
    instead of looping: numpy's max is NaN there, and the C heaps refuse NaN gains."""
    A = torch.full((1, 4, 8), float("nan"))
    cover = greedy_cover(A, torch.arange(4, 8), alpha=0.9, forced_vertical=[0])
    assert cover.vertical[0].nonzero().flatten().tolist() == [0] and not cover.slash.any()


# -- per-row coverage floor and stratified probe rows -------------------------------------


def _one_row_apart(s=40, N=300):
    """Probe attention where every row attends to the sink and its own diagonal, except one
    row whose mass sits on a far column no other row uses (a question reaching back)."""
    pos = torch.arange(N - s, N)
    A = torch.zeros(1, s, N)
    A[0, :, 0] = 0.5
    A[0, torch.arange(s), pos] = 0.5
    A[0, 7, 0], A[0, 7, pos[7]], A[0, 7, 123] = 0.05, 0.05, 0.9
    return A, pos


def test_mean_coverage_can_starve_one_row_and_the_floor_repairs_it():
    from loopserve.attention.cover import greedy_cover, raise_row_floor, row_coverage

    A, pos = _one_row_apart()
    cover = greedy_cover(A, pos, alpha=0.9, causal_zero=True)
    frac = row_coverage(A, pos, cover.vertical, cover.slash)
    assert float(cover.fraction) >= 0.9 and float(frac[0, 7]) < 0.2  # the mean is met, row 7 is not
    raise_row_floor(A, pos, cover, 0.8)
    frac = row_coverage(A, pos, cover.vertical, cover.slash)
    assert float(frac.min()) >= 0.8 and bool(cover.vertical[0, 123])


def test_row_floor_on_real_shapes_covers_every_probe_row():
    torch.manual_seed(0)
    H, Hkv, n, N, D = 4, 2, 300, 700, 32
    q, k = torch.randn(H, n, D), torch.randn(Hkv, N, D) * 1.5
    base = select_lines(q, k, alpha=0.6, n_probe=32, sinks=4, local=8)
    floored = select_lines(q, k, alpha=0.6, n_probe=32, sinks=4, local=8, row_floor=0.7)
    from loopserve.attention.cover import row_coverage
    from loopserve.attention.probe import probe_attention

    A, pos = probe_attention(q, k, floored.probe_idx)
    def masks(p):
        v = torch.zeros(Hkv, N, dtype=torch.bool)
        sl = torch.zeros(Hkv, N, dtype=torch.bool)
        for h in range(Hkv):
            v[h, p.vertical[h]] = True
            sl[h, p.slash[h]] = True
        return v, sl
    assert float(row_coverage(A, pos, *masks(floored)).min()) >= 0.7 - 1e-5
    assert float(row_coverage(A, pos, *masks(base)).min()) < 0.7  # the floor had work to do
    for h in range(Hkv):  # the floor only adds lines
        assert set(base.vertical[h].tolist()) <= set(floored.vertical[h].tolist())
        assert set(base.slash[h].tolist()) <= set(floored.slash[h].tolist())


def test_stratified_probe_rows_leave_no_stratum_empty():
    n, s, n_last = 1000, 50, 8
    rows = probe_rows(n, n_probe=s, n_last=n_last, seed=3, stratified=True)
    head = rows[rows < n - n_last]
    assert len(head) == s and torch.equal(head, head.unique())
    edges = torch.tensor([i * (n - n_last) // s for i in range(s + 1)])
    assert torch.equal(torch.searchsorted(edges, head, right=True) - 1, torch.arange(s))  # one per stratum
    assert torch.equal(rows[-n_last:], torch.arange(n - n_last, n))
    assert not torch.equal(head, probe_rows(n, n_probe=s, n_last=n_last, seed=4, stratified=True)[:s])


def _spike_reference(q, k, tau, sinks, local, scale, rows):
    """Brute force: per KV head, columns outside sinks and the local window where one of
    ``rows`` of the group has exp(score - lse(sinks + window)) >= tau."""
    H, n, D = q.shape
    Hkv, N, _ = k.shape
    G = H // Hkv
    out = []
    for h in range(Hkv):
        cols = set()
        for g in range(G):
            S = (q[h * G + g].double() * scale) @ k[h].double().T
            for r in rows:
                p = N - n + r
                window = list(range(max(0, p - local + 1), p + 1))
                sink = [j for j in range(min(sinks, N)) if j < p - local + 1]
                lse = torch.logsumexp(S[r, window + sink], 0)
                for j in range(sinks, p - local + 1):
                    if S[r, j] - lse >= math.log(tau):
                        cols.add(j)
        out.append(cols)
    return out


def test_spike_outliers_and_dilation():
    """Outlier rows are tested without a grid (stride 0), and a found column brings its
    neighbours: the far-back key a lone unusual row reaches and the keys on either side."""
    from loopserve.attention.spikes import spike_columns, spike_rows

    assert spike_rows(10, 0).tolist() == [9]
    torch.manual_seed(3)
    n, N, D = 40, 120, 16
    q, k = torch.randn(1, n, D) * 0.1, torch.randn(1, N, D) * 0.1
    q[0, 7] = torch.randn(D) * 3.0  # one row unlike the others...
    k[0, 30] = q[0, 7] * 2.0  # ...that reaches far back to key 30
    none = spike_columns(q, k, tau=0.2, sinks=2, local=8, stride=0)
    found = spike_columns(q, k, tau=0.2, sinks=2, local=8, stride=0, outliers=0.05)
    wide = spike_columns(q, k, tau=0.2, sinks=2, local=8, stride=0, outliers=0.05, dilate=2)
    assert 30 not in none[0].tolist() and 30 in found[0].tolist()
    assert set(range(28, 33)) <= set(wide[0].tolist())
    assert set(wide[0].tolist()) == {c + d for c in found[0].tolist() for d in range(-2, 3) if 2 <= c + d < N}


@pytest.mark.parametrize("G, n, N, stride, offset", [(1, 40, 40, 1, 0), (2, 30, 150, 4, 1), (3, 25, 203, 3, 5)])
def test_spike_columns_match_brute_force(G, n, N, stride, offset):
    from loopserve.attention.spikes import spike_columns, spike_rows

    torch.manual_seed(G * 100 + n)
    Hkv, D = 2, 16
    q, k = torch.randn(Hkv * G, n, D) * 0.7, torch.randn(Hkv, N, D) * 0.7
    rows = spike_rows(n, stride, offset)
    assert rows[-1] == n - 1 and len(rows) >= n // stride
    far_row = int(rows[len(rows) // 2])
    k[0, 5] = q[0, far_row] * 3.0  # a tested row far from key 5 attends to it strongly
    want = _spike_reference(q, k, 0.2, 2, 8, D**-0.5, rows.tolist())
    # one block of columns, and blocks smaller than the sinks + window (sink block, causal skip)
    for col_block in (2048, 13, 1):
        got = spike_columns(q, k, tau=0.2, sinks=2, local=8, stride=stride, offset=offset, row_chunk=7,
                            col_block=col_block)
        assert [set(c.tolist()) for c in got] == want
    assert 5 in want[0]  # the planted far-back spike is among them


def _spike_reference_capped(q, k, tau, sinks, local, scale, rows, cap):
    """Brute force of ``row_cap``: per KV head and tested row, its spike columns (any query
    head of the group over the threshold); a row with more than ``cap`` of them gives only
    its ``cap`` strongest (by the group's best score over the threshold)."""
    H, n, D = q.shape
    Hkv, N, _ = k.shape
    G = H // Hkv
    few, top = [], []
    for h in range(Hkv):
        keep, best = set(), set()
        for r in rows:
            p = N - n + r
            over = {}
            for g in range(G):
                S = (q[h * G + g].double() * scale) @ k[h].double().T
                window = list(range(max(0, p - local + 1), p + 1))
                sink = [j for j in range(min(sinks, N)) if j < p - local + 1]
                lse = torch.logsumexp(S[r, window + sink], 0)
                for j in range(sinks, p - local + 1):
                    over[j] = max(over.get(j, -math.inf), float(S[r, j] - lse - math.log(tau)))
            hits = [j for j, x in over.items() if x >= 0]
            if len(hits) > cap:
                best |= set(sorted(hits, key=lambda j: -over[j])[:cap])
            else:
                keep |= set(hits)
        few.append(keep)
        top.append(best)
    return few, top


def test_spike_row_cap_keeps_a_diffuse_rows_strongest_columns_unwidened():
    from loopserve.attention.spikes import spike_columns, spike_rows

    torch.manual_seed(7)
    Hkv, G, n, N, D = 2, 2, 40, 120, 16
    q, k = torch.randn(Hkv * G, n, D) * 0.7, torch.randn(Hkv, N, D) * 0.7
    k[0, 10] = q[0, 39] * 3.0  # the last row reaches one far key: few spikes, widened
    q[2, 20] = k[1, 30:70].sum(0) * 0.6  # row 20 of head group 1 spreads over many keys: diffuse
    rows = spike_rows(n, 4, 1)
    scale = D**-0.5
    few, top = _spike_reference_capped(q, k, 0.2, 2, 8, scale, rows.tolist(), cap=6)
    assert any(top) and any(few) and 10 in few[0] | top[0]  # both kinds of row occur
    for col_block in (2048, 9):
        got = spike_columns(q, k, tau=0.2, sinks=2, local=8, stride=4, offset=1, row_cap=6, row_chunk=5,
                            col_block=col_block)
        assert [set(c.tolist()) for c in got] == [a | b for a, b in zip(few, top)]
    widened = spike_columns(q, k, tau=0.2, sinks=2, local=8, stride=4, offset=1, row_cap=6, dilate=1)
    for h in range(Hkv):
        grown = {j + d for j in few[h] for d in (-1, 0, 1) if 2 <= j + d < N}
        assert set(widened[h].tolist()) == grown | top[h]
    # without a cap, every row's columns count (and the diffuse row's are all there)
    plain = spike_columns(q, k, tau=0.2, sinks=2, local=8, stride=4, offset=1)
    assert [set(c.tolist()) for c in plain] == _spike_reference(q, k, 0.2, 2, 8, scale, rows.tolist())


def test_spike_history_only_tests_earlier_turns_keys_alone():
    """``history_only`` finds exactly the all-keys spike columns that lie before the new
    rows (dilation included, clipped there), and nothing when there is no history."""
    from loopserve.attention.spikes import spike_columns

    torch.manual_seed(5)
    Hkv, G, n, N, D = 2, 2, 30, 110, 16
    q, k = torch.randn(Hkv * G, n, D) * 0.7, torch.randn(Hkv, N, D) * 0.7
    k[0, 6] = q[0, 29] * 3.0  # a spike into the history (columns < 80)...
    k[1, 95] = q[2, 29] * 3.0  # ...and one into the new input
    every = spike_columns(q, k, tau=0.2, sinks=2, local=8, stride=1, dilate=1)
    hist = spike_columns(q, k, tau=0.2, sinks=2, local=8, stride=1, dilate=1, history_only=True)
    assert 6 in every[0].tolist() and 95 in every[1].tolist()
    assert [c.tolist() for c in hist] == [c[c < N - n].tolist() for c in every]
    assert 95 not in hist[1].tolist()
    first_turn = spike_columns(q[:, :, :], k[:, :n], tau=0.2, sinks=2, local=8, stride=1, history_only=True)
    assert all(len(c) == 0 for c in first_turn)


def test_spike_pass_catches_an_unprobed_row_reaching_far_back():
    """One new row (not a probe row) attends almost only to one old key. Mean probe
    coverage never sees it; with spike_tau its column joins the pattern and that row's
    sparse attention equals its dense attention."""
    torch.manual_seed(1)
    H, Hkv, n, N, D = 2, 1, 200, 600, 32
    u, w = torch.zeros(D), torch.zeros(D)
    u[0], w[1] = 1.0, 1.0
    q = u * 10.0 + torch.randn(H, n, D) * 0.05  # every row looks at the sink...
    k = torch.randn(Hkv, N, D) * 0.05
    k[0, 0] = u * 10.0
    probes = torch.arange(0, n, 10)
    row = 95  # ...except this one, which is not a probe row
    q[:, row] = w * 5.0
    k[0, 42] = w * 5.0
    base = select_lines(q, k, alpha=0.9, probe_idx=probes, sinks=4, local=16)
    spiky = select_lines(q, k, alpha=0.9, probe_idx=probes, sinks=4, local=16, spike_tau=0.05, spike_stride=5)
    assert 42 not in base.vertical[0].tolist() and 42 in spiky.vertical[0].tolist()
