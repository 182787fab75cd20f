"""The Triton decode-over-view kernel against the fp64 reference (targets as in
test_vertical_slash: 1e-5 fp32, 2e-3 bf16 plus the bf16 output's own rounding)."""

from __future__ import annotations

import pytest
import torch

from loopserve.cache.view_attention import view_decode_attention as dispatched_view_decode
from tests.cache.test_view_attention import view_inputs, view_reference
from tests.kernels.test_vertical_slash import BF16_HALF_ULP, BF16_TARGET, FP32_TARGET


# (D, G, H_kv, T, N, L, splits): D 64/128, GQA groups 1-8 (3 padded), one or a few query
# rows, one split or several (the last one short), views shorter and longer than a block.
SHAPES = [
    (64, 1, 2, 1, 200, 70, None),
    (64, 2, 2, 1, 150, 150, 3),
    (64, 3, 1, 2, 90, 40, 2),
    (64, 8, 1, 1, 300, 130, None),
    (128, 1, 1, 3, 100, 17, None),
    (128, 4, 2, 1, 250, 100, 4),
    (128, 8, 1, 2, 120, 64, 1),
]


@pytest.mark.parametrize("D,G,Hkv,T,N,L,splits", SHAPES)
def test_matches_reference_fp32_and_bf16(view_decode_attention, D, G, Hkv, T, N, L, splits):
    H = G * Hkv
    q, k, v, idx = view_inputs(H, Hkv, T, N, L, D, seed=D + G + L)
    scale = D**-0.5
    out, lse = view_decode_attention(q[0], k[0], v[0], idx, splits=splits, block_keys=16)
    assert out.shape == (H, T, D) and lse.shape == (H, T)
    assert (out.double() - view_reference(q, k, v, idx, scale)).abs().max() <= FP32_TARGET
    kr = torch.stack([k[0, h // G, idx[h // G]] for h in range(H)]).double()
    ref_lse = torch.logsumexp(q[0].double() @ kr.transpose(1, 2) * scale, -1)
    assert (lse.double() - ref_lse).abs().max() <= FP32_TARGET

    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    ref = view_reference(qb.float(), kb.float(), vb.float(), idx, scale)
    out_b, _ = view_decode_attention(qb[0], kb[0], vb[0], idx, splits=splits, block_keys=16)
    assert out_b.dtype == torch.bfloat16
    assert ((out_b.double() - ref).abs() <= BF16_TARGET + BF16_HALF_ULP * ref.abs()).all()


def test_dispatch_runs_triton_kernel_on_request(view_decode_attention):
    """The cache-side dispatch with backend="triton" gives the CPU path's result."""
    q, k, v, idx = view_inputs(8, 2, 1, 160, 50, 64, seed=7)
    triton_out = dispatched_view_decode(q, k, v, idx, 0.1, backend="triton")
    torch.testing.assert_close(triton_out, dispatched_view_decode(q, k, v, idx, 0.1), rtol=0.0, atol=FP32_TARGET)


def test_clear_errors(view_decode_attention):
    q, k, v, idx = view_inputs(4, 2, 1, 20, 5, 64)
    with pytest.raises(ValueError, match=r"idx must be \(H_kv=2, L >= 1\)"):
        view_decode_attention(q[0], k[0], v[0], idx[:1])
    with pytest.raises(ValueError, match="block_keys=8"):
        view_decode_attention(q[0], k[0], v[0], idx, block_keys=8)
