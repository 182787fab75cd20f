"""Key scoring (cache.scoring): the attention mass each key receives, against fp64 brute force."""

from __future__ import annotations

import pytest
import torch

from loopserve.cache.scoring import attention_scores


def _brute_force(q, k, scaling, q_pos=None, k_pos=None):
    """Per query head and row: softmax over the keys it may see; summed over rows and over
    each KV head's query heads."""
    _, H, w, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    G = H // Hkv
    out = torch.zeros(Hkv, N, dtype=torch.float64)
    for h in range(H):
        logits = (q[0, h].double() @ k[0, h // G].double().T) * scaling  # (w, N)
        if q_pos is not None:
            kp = k_pos[h // G] if k_pos.dim() == 2 else k_pos
            logits = logits.masked_fill(kp[None, :] > q_pos[:, None], float("-inf"))
        out[h // G] += torch.softmax(logits, -1).sum(0)
    return out


@pytest.mark.parametrize("H, Hkv, w, N", [(4, 2, 5, 37), (3, 1, 1, 200), (6, 3, 16, 64)])
def test_attention_scores_are_summed_softmax_rows(H, Hkv, w, N):
    torch.manual_seed(H * 100 + N)
    q, k = torch.randn(1, H, w, 16) * 2, torch.randn(1, Hkv, N, 16) * 2
    got = attention_scores(q, k, 0.25, backend="cpu")
    torch.testing.assert_close(got.double(), _brute_force(q, k, 0.25), rtol=1e-5, atol=1e-6)
    # every row's mass sums to one: each KV head gets G * w in all
    torch.testing.assert_close(got.sum(1), torch.full((Hkv,), float(H // Hkv * w)), rtol=1e-5, atol=1e-5)


def test_attention_scores_with_positions_see_only_earlier_keys():
    torch.manual_seed(1)
    H, Hkv, w, N = 4, 2, 6, 40
    q, k = torch.randn(1, H, w, 16), torch.randn(1, Hkv, N, 16)
    q_pos = torch.tensor([3, 10, 17, 25, 33, 39])
    per_head = torch.stack([torch.arange(N), torch.arange(N).flip(0)])  # (H_kv, N) positions
    for k_pos in (torch.arange(N), per_head):
        got = attention_scores(q, k, 0.25, q_pos, k_pos, backend="cpu")
        want = _brute_force(q, k, 0.25, q_pos, k_pos)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    early = attention_scores(q[:, :, :2], k, 0.25, q_pos[:2], torch.arange(N), backend="cpu")  # rows at 3 and 10
    assert bool((early[:, 11:] == 0).all()) and bool((early[:, :11] > 0).all())


def test_query_buffer_releases_first_then_every_in_order():
    from loopserve.cache.scoring import QueryBuffer

    buf = QueryBuffer(num_layers=2, every=3, first=2)
    qs = [torch.randn(1, 4, 1, 8) for _ in range(8)]
    released = []
    other = torch.randn(1, 4, 1, 8)
    assert buf.push(0, other) is None  # another layer keeps its own count
    for i, q in enumerate(qs):
        out = buf.push(1, q)
        if out is not None:
            released.append((i, out.clone()))
    # after 2 pushes, then every 3: at pushes 2 and 5 (1-based), with 2 pending after
    assert [i for i, _ in released] == [1, 4, 7]
    torch.testing.assert_close(released[0][1], torch.cat(qs[0:2], dim=2))
    torch.testing.assert_close(released[1][1], torch.cat(qs[2:5], dim=2))
    torch.testing.assert_close(released[2][1], torch.cat(qs[5:8], dim=2))
    assert buf.pending(1) is None
    buf.push(1, qs[0])
    torch.testing.assert_close(buf.pending(1), qs[0])
    torch.testing.assert_close(buf.pending(0), other)


# -- the native re-selection (native/key_scores.c) and its torch fallback ----------------

from loopserve.cache import scoring as scoring_module  # noqa: E402
from loopserve.cache.scoring import max_pool, select_top, top_rows, topk_with_forced  # noqa: E402
from loopserve.native import native_kernels  # noqa: E402
from loopserve.threads import intra_op_threads  # noqa: E402

native_only = pytest.mark.skipif(native_kernels() is None, reason="no native kernels (no C compiler)")


@pytest.fixture(params=["native", "torch"])
def path(request, monkeypatch):
    """Run a test on the native kernels and again on the torch fallback."""
    if request.param == "native":
        if native_kernels() is None:
            pytest.skip("no native kernels (no C compiler)")
    else:
        monkeypatch.setattr(scoring_module, "native_kernels", lambda: None)
    return request.param


# (H, H_kv, w, N, D): SmolLM2's re-selection (48 rows, three vectors), one row, rows padded
# to a vector, 64 rows (the most the kernel takes), chunk edges (256), a head size of 24.
SCORE_SHAPES = [(9, 3, 16, 2000, 64), (3, 1, 1, 200, 16), (4, 2, 5, 37, 16), (32, 8, 16, 257, 128),
                (6, 3, 16, 512, 24), (5, 5, 3, 17, 24)]


@pytest.mark.parametrize("H, Hkv, w, N, D", SCORE_SHAPES)
def test_key_scores_match_fp64_on_either_path(path, H, Hkv, w, N, D):
    torch.manual_seed(N + D)
    q = torch.randn(1, H, w, D) * 2
    k = torch.randn(1, Hkv, N + 9, D)[:, :, :N] * 2  # a store's slice: head stride > N * D
    got = attention_scores(q, k, D**-0.5, backend="cpu")
    assert got.shape == (Hkv, N) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _brute_force(q, k, D**-0.5), rtol=1e-5, atol=2e-6)


@native_only
def test_native_key_scores_run_and_do_not_depend_on_the_thread_count(monkeypatch):
    kernels = native_kernels()
    calls = []
    spy = type(kernels)(**{**kernels.__dict__, "key_scores": lambda *a: calls.append(a[-1]) or kernels.key_scores(*a)})
    monkeypatch.setattr(scoring_module, "native_kernels", lambda: spy)
    torch.manual_seed(0)
    q, k = torch.randn(1, 9, 16, 64), torch.randn(1, 3, 3000, 64)
    outs = []
    for threads in (1, 2, 3):
        with intra_op_threads(threads):
            outs.append(attention_scores(q, k, 0.125, backend="cpu"))
    assert calls == [1, 2, 3]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    # With positions (a prefill's probe rows) or more than 64 rows, the torch path scores.
    attention_scores(q, k, 0.125, torch.arange(2990, 3006), torch.arange(3000), backend="cpu")
    attention_scores(torch.randn(1, 9, 32, 64), k, 0.125, backend="cpu")  # 3 x 32 = 96 rows a KV head
    assert calls == [1, 2, 3]


def test_top_rows_takes_the_largest_in_index_order_with_ties_to_the_lower_index(path):
    v = torch.tensor([[1.0, 3, 3, 2, 3, 0], [5, 5, 5, 5, 5, 5], [float("-inf"), -1, float("inf"), -0.0, 0.0, -2]])
    assert top_rows(v, 2).tolist() == [[1, 2], [0, 1], [2, 3]]  # -0.0 ties with 0.0
    assert top_rows(v, 4).tolist() == [[1, 2, 3, 4], [0, 1, 2, 3], [1, 2, 3, 4]]
    assert top_rows(v, 0).shape == (3, 0) and top_rows(v, 6).tolist() == [list(range(6))] * 3
    torch.manual_seed(1)
    x = torch.randn(4, 3001)
    assert torch.equal(top_rows(x, 1100), x.topk(1100, dim=1).indices.sort(dim=1).values)
    nan = float("nan")
    y = torch.tensor([[1.0, -nan, 3.0, 2.0, nan, float("inf")]])  # NaN of either sign ranks first
    assert top_rows(y, 3).tolist() == [[1, 4, 5]]
    with pytest.raises(ValueError, match="k=-1"):
        top_rows(v, -1)
    with pytest.raises(ValueError, match="k=7"):
        top_rows(v, 7)
    with pytest.raises(ValueError, match="budget"):
        select_top(v, -3, head=2)
    with pytest.raises(ValueError, match="budget"):
        topk_with_forced(v, -1, torch.zeros(6, dtype=torch.bool))


@pytest.mark.parametrize("n, budget, pool, head, tail", [(2000, 1024, 7, 4, 32), (50, 10, 1, 0, 0), (50, 10, 4, 3, 0),
                                                         (30, 100, 7, 4, 32), (12, 3, 3, 5, 9), (40, 0, 5, 2, 2)])
def test_select_top_is_forced_rows_plus_the_pooled_top_budget(path, n, budget, pool, head, tail):
    torch.manual_seed(n + budget)
    scores = torch.rand(3, n)
    forced = torch.zeros(n, dtype=torch.bool)
    forced[:head] = True
    if tail:
        forced[-tail:] = True
    want = topk_with_forced(max_pool(scores, pool), budget, forced)
    got = select_top(scores, budget, pool=pool, head=head, tail=tail)
    # Pooled scores repeat (a window's maximum), so only the tie-free part must agree exactly:
    # every kept row ranks at least as high as every dropped one.
    assert got.shape == want.shape and got.dtype == torch.long
    pooled = max_pool(scores, pool).masked_fill(forced, float("inf"))
    for h in range(3):
        kept = torch.zeros(n, dtype=torch.bool)
        kept[got[h]] = True
        assert bool(forced[kept].sum() == forced.sum())  # every forced row is in
        assert bool(torch.all(got[h][1:] > got[h][:-1]))  # ascending, no duplicates
        if (~kept).any() and kept.any():
            assert float(pooled[h][kept].min()) >= float(pooled[h][~kept].max())


def test_select_top_native_and_torch_agree_row_for_row(monkeypatch):
    if native_kernels() is None:
        pytest.skip("no native kernels (no C compiler)")
    torch.manual_seed(3)
    scores = torch.rand(3, 2000) ** 4
    native = select_top(scores, 1024, pool=7, head=4, tail=32)
    monkeypatch.setattr(scoring_module, "native_kernels", lambda: None)
    assert torch.equal(native, select_top(scores, 1024, pool=7, head=4, tail=32))  # ties too: the lower index


@native_only
def test_long_inputs_score_a_few_heads_per_call_with_the_same_bits(monkeypatch):
    torch.manual_seed(5)
    q, k = torch.randn(1, 8, 16, 64), torch.randn(1, 4, 700, 64)
    whole = attention_scores(q, k, 0.125, backend="cpu")
    monkeypatch.setattr(scoring_module, "_SCORES_SCRATCH_FLOATS", 1)  # one head per call
    assert torch.equal(attention_scores(q, k, 0.125, backend="cpu"), whole)
    torch.testing.assert_close(whole.double(), _brute_force(q, k, 0.125), rtol=1e-5, atol=2e-6)


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@native_only
@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 4), n=st.integers(1, 300), budget=st.integers(0, 320), pool=st.integers(0, 9),
       head=st.integers(0, 40), tail=st.integers(0, 40), levels=st.sampled_from([3, 50, 0]), seed=st.integers(0, 2**16))
def test_native_selection_equals_the_torch_path_on_any_shape_and_ties(h, n, budget, pool, head, tail, levels, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(h, n, generator=g)
    if levels:  # few distinct values: ties everywhere, pooled plateaus
        scores = (scores * levels).floor()
    native = select_top(scores, budget, pool=pool, head=head, tail=tail)
    k = min(n, 1 + budget)
    top = top_rows(scores, k)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(scoring_module, "native_kernels", lambda: None)
        assert torch.equal(native, select_top(scores, budget, pool=pool, head=head, tail=tail))
        assert torch.equal(top, top_rows(scores, k))


@native_only
@settings(max_examples=25, deadline=None)
@given(hkv=st.integers(1, 3), g=st.integers(1, 4), w=st.integers(1, 16), n=st.integers(1, 600),
       d=st.sampled_from([8, 16, 24, 64]), seed=st.integers(0, 2**16))
def test_native_key_scores_match_fp64_on_any_shape(hkv, g, w, n, d, seed):
    if g * w > 64:  # more rows than the kernel takes: the torch path's, tested above
        w = 64 // g
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, hkv * g, w, d, generator=gen) * 2
    k = torch.randn(1, hkv, n + 3, d, generator=gen)[:, :, :n] * 2
    got = attention_scores(q, k, d**-0.5, backend="cpu")
    torch.testing.assert_close(got.double(), _brute_force(q, k, d**-0.5), rtol=1e-5, atol=2e-6)


def test_the_native_scratch_is_float32_whatever_the_default_dtype():
    from loopserve.native import scratch_buffer

    n = scratch_buffer(1).numel() + 1  # larger than the buffer held: a fresh one
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        buf = scratch_buffer(n)
    finally:
        torch.set_default_dtype(previous)
    assert buf.dtype == torch.float32 and buf.numel() >= n
