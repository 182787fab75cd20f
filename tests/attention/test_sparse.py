"""Tests for the sparse prefill attention kernel."""

from __future__ import annotations

import math

import pytest
import torch

from loopserve.attention import (
    LinePattern,
    dense_prefill_attention,
    pattern_mask,
    select_lines,
    sparse_prefill_attention,
)
from loopserve.attention import sparse as sparse_module
from loopserve.attention.sparse import _plan_head, _split_slashes

NATIVE = sparse_module._native_usable(64)


def inputs(H, Hkv, n, N, D, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(H, n, D, generator=g)
    k = torch.randn(Hkv, N, D, generator=g)
    v = torch.randn(Hkv, N, D, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def masked_reference(q, k, v, pattern):
    """Brute force: fp64 softmax over exactly the pattern's cells (rows without cells -> 0)."""
    H, n, D = q.shape
    Hkv, N, _ = k.shape
    G = H // Hkv
    out = torch.empty(H, n, D, dtype=torch.float64)
    for h in range(H):
        mask = pattern_mask(pattern, h if pattern.per_query_head else h // G, torch.arange(n))
        s = (q[h].double() @ k[h // G].double().T) * D**-0.5
        p = torch.softmax(s.masked_fill(~mask, -math.inf), -1).nan_to_num(0.0)
        out[h] = p @ v[h // G].double()
    return out


def naive_dense(q, k, v):
    H, n, D = q.shape
    Hkv, N, _ = k.shape
    mask = torch.ones(n, N, dtype=torch.bool).tril(N - n)
    kr, vr = k.repeat_interleave(H // Hkv, 0).double(), v.repeat_interleave(H // Hkv, 0).double()
    s = (q.double() @ kr.transpose(1, 2)) * D**-0.5
    return torch.softmax(s.masked_fill(~mask, -math.inf), -1) @ vr


@pytest.mark.parametrize(
    "H,Hkv,n,N,D",
    [(4, 2, 96, 96, 16), (6, 2, 50, 170, 8), (3, 3, 130, 130, 16), (2, 1, 33, 300, 32)],
)
def test_dense_reference_matches_naive(H, Hkv, n, N, D):
    q, k, v = inputs(H, Hkv, n, N, D)
    torch.testing.assert_close(dense_prefill_attention(q, k, v).double(), naive_dense(q, k, v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "H,Hkv,n,N,D",
    [(4, 2, 96, 96, 16), (6, 2, 50, 170, 8), (3, 3, 130, 130, 16), (2, 1, 33, 300, 32)],
)
@pytest.mark.parametrize("per_query_head", [False, True])
def test_alpha_one_equals_dense(H, Hkv, n, N, D, per_query_head):
    q, k, v = inputs(H, Hkv, n, N, D, seed=n)
    # With n <= 72 every row is a probe row, so alpha = 1 must cover every causal cell;
    # for larger n pass all rows as probe rows explicitly.
    pattern = select_lines(q, k, alpha=1.0, per_query_head=per_query_head, probe_idx=torch.arange(n), local=8)
    out = sparse_prefill_attention(q, k, v, pattern, block=64, chunk=16)
    torch.testing.assert_close(out, dense_prefill_attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_all_lines_equals_dense_any_split():
    """All verticals, all slashes, or both (every cell then appears twice): still dense."""
    q, k, v = inputs(6, 3, 70, 150, 16)
    dense = dense_prefill_attention(q, k, v)
    every = torch.arange(150)
    for vs, ss in [(every, []), ([], every), (every, every), (every[::2], every[:90])]:
        pattern = LinePattern.from_lines([vs] * 3, [ss] * 3, 70, 150)
        if len(ss) == 90:  # even columns + first 90 diagonals do not cover all: compare to brute force
            torch.testing.assert_close(
                sparse_prefill_attention(q, k, v, pattern).double(), masked_reference(q, k, v, pattern), rtol=1e-5, atol=1e-5
            )
            continue
        torch.testing.assert_close(sparse_prefill_attention(q, k, v, pattern), dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("chunk,block", [(8, 32), (16, 1024), (64, 64)])
def test_random_pattern_equals_masked_softmax(seed, chunk, block):
    g = torch.Generator().manual_seed(seed)
    H, Hkv, D = 6, 3, 16
    N = int(torch.randint(40, 260, (1,), generator=g))
    n = int(torch.randint(1, N + 1, (1,), generator=g))
    q, k, v = inputs(H, Hkv, n, N, D, seed=seed)
    vs, ss = [], []
    for _ in range(Hkv):
        vs.append(torch.randperm(N, generator=g)[: int(torch.randint(0, N // 3, (1,), generator=g))])
        # A mix of a local run, clustered offsets and isolated far offsets.
        clustered = torch.arange(int(torch.randint(0, 20, (1,), generator=g)))
        spread = torch.randperm(N, generator=g)[: int(torch.randint(1, N // 4, (1,), generator=g))]
        ss.append(torch.cat([clustered, spread]))
    pattern = LinePattern.from_lines(vs, ss, n, N)
    out = sparse_prefill_attention(q, k, v, pattern, chunk=chunk, block=block)
    torch.testing.assert_close(out.double(), masked_reference(q, k, v, pattern), rtol=1e-5, atol=1e-5)


def test_both_slash_paths_are_exercised():
    plan = _plan_head(torch.tensor([0, 5]), torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 300, 900]), 1000, 16)
    assert plan.windows == [(0, 7)]
    assert plan.sliced == [300, 900]
    assert plan.is_slash[300] and not plan.is_slash[299]


def test_rows_without_cells_give_zero():
    q, k, v = inputs(2, 1, 20, 20, 8)
    pattern = LinePattern.from_lines([[10]], [[]], 20, 20)  # rows 0..9 see no cell
    out = sparse_prefill_attention(q, k, v, pattern)
    assert (out[:, :10] == 0).all()
    torch.testing.assert_close(out[:, 10:], v[0, 10].expand(2, 10, 8))


def test_bf16_inputs():
    q, k, v = inputs(6, 2, 120, 200, 32, seed=1, dtype=torch.bfloat16)
    pattern = select_lines(q, k, alpha=0.9, local=16)
    out = sparse_prefill_attention(q, k, v, pattern, chunk=16, block=64)
    assert out.dtype == torch.bfloat16 and out.shape == (6, 120, 32)
    ref = masked_reference(q.float(), k.float(), v.float(), pattern)
    torch.testing.assert_close(out.double(), ref, rtol=0.0, atol=3e-2)
    full = LinePattern.from_lines([torch.arange(200)] * 2, [[]] * 2, 120, 200)
    torch.testing.assert_close(
        sparse_prefill_attention(q, k, v, full).float(), dense_prefill_attention(q, k, v).float(), rtol=0.0, atol=3e-2
    )


def test_shape_checks():
    q, k, v = inputs(4, 2, 10, 20, 8)
    with pytest.raises(ValueError):
        sparse_prefill_attention(q, k, v, LinePattern.from_lines([[0]] * 2, [[0]] * 2, 10, 21))
    with pytest.raises(ValueError):
        sparse_prefill_attention(q, k, v, LinePattern.from_lines([[0]] * 3, [[0]] * 3, 10, 20))


def test_split_slashes_cost_model():
    band = list(range(64))
    windows, sliced = _split_slashes(band + [200, 500, 502], chunk=32, slice_cost=8.0)
    assert windows == [(0, 63)] and sliced == [200, 500, 502]
    # Two offsets 2 apart: a 34-column window beats slicing only if slicing is dear.
    assert _split_slashes([500, 502], chunk=32, slice_cost=30.0) == ([(500, 502)], [])
    assert _split_slashes([], chunk=32, slice_cost=8.0) == ([], [])


def random_isolated_pattern(Hkv, n, N, seed):
    g = torch.Generator().manual_seed(seed)
    vs = [torch.randperm(N, generator=g)[: N // 8] for _ in range(Hkv)]
    ss = [torch.cat([torch.arange(6), torch.randperm(N, generator=g)[: N // 6]]) for _ in range(Hkv)]
    return LinePattern.from_lines(vs, ss, n, N)


@pytest.mark.skipif(not NATIVE, reason="no C compiler for the native slash kernel")
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("block", [64, 256])
def test_native_and_torch_slash_paths_match_masked_softmax(seed, block):
    H, Hkv, D = 6, 3, 64
    n, N = (150, 400) if seed else (300, 300)
    q, k, v = inputs(H, Hkv, n, N, D, seed=seed)
    pattern = random_isolated_pattern(Hkv, n, N, seed)
    assert _plan_head(pattern.vertical[0], pattern.slash[0], N, 16, native=True).sliced
    ref = masked_reference(q, k, v, pattern)
    for native in (True, False):
        out = sparse_prefill_attention(q, k, v, pattern, chunk=16, block=block, native=native)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not NATIVE, reason="no C compiler for the native slash kernel")
def test_native_path_alpha_one_and_bf16():
    q, k, v = inputs(6, 2, 90, 160, 64, seed=4)
    pattern = select_lines(q, k, alpha=1.0, local=8)
    torch.testing.assert_close(
        sparse_prefill_attention(q, k, v, pattern, native=True), dense_prefill_attention(q, k, v), rtol=1e-5, atol=1e-5
    )
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    pattern = random_isolated_pattern(2, 90, 160, 4)
    out = sparse_prefill_attention(qb, kb, vb, pattern, native=True)
    assert out.dtype == torch.bfloat16
    ref = masked_reference(qb.float(), kb.float(), vb.float(), pattern)
    torch.testing.assert_close(out.double(), ref, rtol=0.0, atol=3e-2)


@pytest.mark.parametrize("native", [True, False] if NATIVE else [False])
def test_wide_band_windows_mixed_with_sliced_offsets(native):
    """A wide local band is windowed on the torch path (the native kernel runs every
    offset, and the verticals, in one pass); mixed with sliced offsets and verticals
    inside the band, every cell must still count once."""
    H, Hkv, n, N, D = 4, 2, 160, 260, 64
    q, k, v = inputs(H, Hkv, n, N, D, seed=9)
    band = torch.arange(120)
    vs = [torch.tensor([0, 1, 150, 200, 250]), torch.arange(0, N, 7)]
    ss = [torch.cat([band, torch.tensor([170, 230])]), torch.cat([band, torch.tensor([140])])]
    pattern = LinePattern.from_lines(vs, ss, n, N)
    plan = _plan_head(pattern.vertical[0], pattern.slash[0], N, 16, native=native and NATIVE)
    if plan.native:
        assert not plan.windows and plan.sliced == list(range(120)) + [170, 230]
    else:
        assert plan.windows and plan.windows[0] == (0, 119) and plan.sliced == [170, 230]
    out = sparse_prefill_attention(q, k, v, pattern, chunk=16, block=64, native=native)
    torch.testing.assert_close(out.double(), masked_reference(q, k, v, pattern), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not NATIVE, reason="no C compiler for the native slash kernel")
@pytest.mark.parametrize("H,Hkv,D,per_query_head", [(4, 1, 128, False), (4, 2, 64, True), (8, 1, 64, False)])
def test_native_one_pass_other_group_sizes(H, Hkv, D, per_query_head):
    """Verticals and slashes in one native pass, for other (G, D) specialisations;
    more verticals than one online-softmax chunk, rows not a multiple of 16."""
    n, N = 75, 230
    q, k, v = inputs(H, Hkv, n, N, D, seed=H + D)
    heads = H if per_query_head else Hkv
    pattern = random_isolated_pattern(heads, n, N, seed=D)
    pattern.per_query_head = per_query_head
    assert sparse_module._native_usable(D, 1 if per_query_head else H // Hkv)
    out = sparse_prefill_attention(q, k, v, pattern, chunk=16, block=64, native=True)
    torch.testing.assert_close(out.double(), masked_reference(q, k, v, pattern), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not NATIVE, reason="no C compiler for the native slash kernel")
@pytest.mark.parametrize("n, N", [(400, 400), (350, 700)])
@pytest.mark.parametrize("threads", [1, 2])
def test_native_sweeps_of_row_blocks(n, N, threads):
    """The native kernel takes rows in sweeps of several 16-row blocks (each chunk of lines
    for every block of the sweep in turn): over several sweeps, a partial last one, row
    ranges split over threads, and lines that become causal inside a sweep (no history),
    every row still gets exactly its own cells."""
    from loopserve.threads import budget, configure

    H, Hkv, D = 6, 2, 64
    q, k, v = inputs(H, Hkv, n, N, D, seed=n + threads)
    pattern = random_isolated_pattern(Hkv, n, N, seed=N)
    previous = budget()
    configure(threads)
    try:
        out = sparse_prefill_attention(q, k, v, pattern, native=True)
    finally:
        configure(previous)
    torch.testing.assert_close(out.double(), masked_reference(q, k, v, pattern), rtol=1e-5, atol=1e-5)
