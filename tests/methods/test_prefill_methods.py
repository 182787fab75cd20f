"""The defining behaviour of each sparse prefill baseline, against masked dense attention."""

from __future__ import annotations

import pytest
import torch

from loopserve.attention.dense import dense_attention
from loopserve.attention.pattern import pattern_mask
from loopserve.engine import resolve_method
from loopserve.engine.hook import TurnContext

H, H_KV, D = 4, 2, 16
SCALE = D**-0.5


def _qkv(n, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, H, n, D, generator=g)
    k = torch.randn(1, H_KV, N, D, generator=g)
    v = torch.randn(1, H_KV, N, D, generator=g)
    return q, k, v


def _masked_attention(q, k, v, mask):
    """Reference: softmax over the cells of `mask` (H, n, N) only, per query head."""
    kr = k[0].repeat_interleave(H // H_KV, 0)
    vr = v[0].repeat_interleave(H // H_KV, 0)
    logits = torch.einsum("hqd,hkd->hqk", q[0], kr) * SCALE
    p = torch.softmax(logits.masked_fill(~mask, float("-inf")), -1)
    return torch.einsum("hqk,hkd->hqd", p, vr).unsqueeze(0)


def _attend(name, knobs, q, k, v):
    method = resolve_method(name, knobs).prefill
    ctx = TurnContext(None, method, None, num_layers=1)
    out = method.attend(q, k, v, layer_idx=0, scaling=SCALE, ctx=ctx)
    return out, ctx, method


def _a_shape_mask(n, N, sinks, local):
    pos = torch.arange(N - n, N)[:, None]
    j = torch.arange(N)[None, :]
    return ((j < sinks) | (pos - j < local)) & (j <= pos)


def test_ashape_attends_exactly_the_sinks_and_the_local_band():
    n, N, sinks, local = 150, 230, 4, 32  # with 80 tokens of history
    q, k, v = _qkv(n, N)
    out, ctx, _ = _attend("ashape", dict(sinks=sinks, local=local), q, k, v)
    mask = _a_shape_mask(n, N, sinks, local).expand(H, n, N)
    torch.testing.assert_close(out, _masked_attention(q, k, v, mask), rtol=1e-4, atol=1e-5)
    density = ctx.stats["prefill_density"][0]
    assert density == pytest.approx(mask[0].sum().item() / (torch.ones(n, N).tril(N - n).sum().item()))
    # A band wider than the context is plain dense attention.
    dense, ctx2, _ = _attend("ashape", dict(sinks=sinks, local=N), q, k, v)
    torch.testing.assert_close(dense, dense_attention(q, k, v, SCALE))
    assert ctx2.stats["prefill_density"] == [1.0]


def test_trishape_last_rows_equal_dense_attention():
    n, N, last = 160, 200, 24
    knobs = dict(sinks=4, local=16, dense_last=last)
    q, k, v = _qkv(n, N, seed=1)
    out, ctx, _ = _attend("trishape", knobs, q, k, v)
    dense = dense_attention(q, k, v, SCALE)
    torch.testing.assert_close(out[:, :, -last:], dense[:, :, -last:], rtol=1e-5, atol=1e-6)
    # The other rows are A-shape, which is not dense.
    mask = _a_shape_mask(n, N, 4, 16).expand(H, n, N)
    torch.testing.assert_close(out[:, :, :-last], _masked_attention(q, k, v, mask)[:, :, :-last], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out[:, :, :-last], dense[:, :, :-last], atol=1e-3)
    assert 0 < ctx.stats["prefill_density"][0] < 1


@pytest.mark.parametrize("per_query_head", [True, False])
def test_minference_lines_come_from_the_last_queries_with_forced_sinks_and_diagonals(per_query_head):
    n = N = 400
    last_q, sinks, local = 64, 30, 100
    knobs = dict(vertical_size=sinks + 2, slash_size=local + 4, last_q=last_q, sinks=sinks, local=local,
                 per_query_head=per_query_head)
    g = torch.Generator().manual_seed(2)
    u, w = torch.randn(2, D, generator=g)
    q, k, v = _qkv(n, N, seed=3)
    q = q * 0.2
    k[0, :, 200] = 6 * u  # attended by the last 64 rows
    k[0, :, 120] = 6 * w  # attended by every earlier row
    q[0, :, n - last_q :] += u
    q[0, :, : n - last_q] += w
    out, ctx, method = _attend("minference", knobs, q, k, v)
    pattern = method.pattern(q[0], k[0], SCALE)
    assert pattern.n_heads == (H if per_query_head else H_KV)
    for h in range(pattern.n_heads):
        vert, slash = set(pattern.vertical[h].tolist()), set(pattern.slash[h].tolist())
        assert set(range(sinks)) <= vert and set(range(local)) <= slash  # forced lines
        assert len(vert) == sinks + 2 and len(slash) == local + 4  # top-k sizes include the forced ones
        assert 200 in vert and 120 not in vert  # estimated from the last 64 queries only
    # Changing the rows before the last 64 does not change the pattern.
    q2 = q.clone()
    q2[0, :, : n - last_q] = torch.randn(H, n - last_q, D, generator=g)
    p2 = method.pattern(q2[0], k[0], SCALE)
    assert all(torch.equal(a, b) for a, b in zip(pattern.vertical + pattern.slash, p2.vertical + p2.slash))
    # The output is exact softmax attention over the pattern's cells.
    rows = torch.arange(n)
    masks = [pattern_mask(pattern, h if per_query_head else h // (H // H_KV), rows) for h in range(H)]
    torch.testing.assert_close(out, _masked_attention(q, k, v, torch.stack(masks)), rtol=1e-4, atol=1e-5)
    assert 0 < ctx.stats["prefill_density"][0] < 1


@pytest.mark.parametrize("first,last", [(0, 24), (24, 0), (16, 24)])
def test_loopserve_dense_first_and_last_rows_equal_dense_and_leave_the_rest_sparse(first, last):
    n, N = 160, 260  # with 100 tokens of history
    base = dict(min_keys=0, min_new=0, probe=16, alpha=0.3, local=8, spike_tau=0, dense_last=0)
    q, k, v = _qkv(n, N, seed=4)
    sparse, ctx0, _ = _attend("loopserve", base, q, k, v)
    out, ctx, _ = _attend("loopserve", dict(base, dense_first=first, dense_last=last), q, k, v)
    dense = dense_attention(q, k, v, SCALE)
    middle = slice(first, n - last)
    torch.testing.assert_close(out[:, :, :first], dense[:, :, :first], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[:, :, n - last:], dense[:, :, n - last:], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[:, :, middle], sparse[:, :, middle])  # the same selection elsewhere
    assert not torch.allclose(out[:, :, middle], dense[:, :, middle], atol=1e-3)
    assert ctx0.stats["prefill_density"][0] < ctx.stats["prefill_density"][0] < 1
    # Dense rows covering the whole input are dense attention.
    whole, ctx2, _ = _attend("loopserve", dict(base, dense_last=n), q, k, v)
    torch.testing.assert_close(whole, dense, rtol=1e-5, atol=1e-6)
    assert ctx2.stats["prefill_density"][0] == pytest.approx(1.0)


@pytest.mark.parametrize("N", [1, 7, 300])
def test_decode_row_equals_the_fp64_reference(N):
    """dense_attention's decode path (one query row, grouped per KV head on the CPU) is exact
    softmax attention over all N keys, as SDPA computes it."""
    import torch.nn.functional as F

    q, k, v = _qkv(1, N, seed=5)
    out = dense_attention(q, k, v, SCALE)
    mask = torch.ones(H, 1, N, dtype=torch.bool)
    ref = _masked_attention(q.double(), k.double(), v.double(), mask)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    sdpa = F.scaled_dot_product_attention(q, k, v, scale=SCALE, enable_gqa=True)
    torch.testing.assert_close(out, sdpa, rtol=1e-5, atol=1e-6)


def test_loopserve_dense_outliers_rows_equal_dense_and_the_rest_stay_sparse():
    from loopserve.attention.spikes import outlier_rows

    n, N, frac = 160, 260, 0.1
    base = dict(min_keys=0, min_new=0, probe=16, alpha=0.3, local=8, spike_tau=0, dense_last=0, spike_outliers=frac)
    q, k, v = _qkv(n, N, seed=6)
    sparse, ctx0, _ = _attend("loopserve", base, q, k, v)
    out, ctx, _ = _attend("loopserve", dict(base, dense_outliers=1), q, k, v)
    dense = dense_attention(q, k, v, SCALE)
    G = H // H_KV
    for h in range(H_KV):
        heads = slice(h * G, (h + 1) * G)
        rows = outlier_rows(q[0, heads], frac)
        assert len(rows) == 16
        torch.testing.assert_close(out[0, heads, rows], dense[0, heads, rows], rtol=1e-5, atol=1e-6)
        others = torch.ones(n, dtype=torch.bool)
        others[rows] = False
        torch.testing.assert_close(out[0, heads, others], sparse[0, heads, others])
    assert ctx0.stats["prefill_density"][0] < ctx.stats["prefill_density"][0] < 1
