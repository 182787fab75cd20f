"""The Triton key-scoring kernels against cache.scoring.attention_scores' torch path
(fp32 targets as elsewhere: <= 1e-5 per key mass)."""

from __future__ import annotations

import pytest
import torch

from loopserve.cache.scoring import attention_scores
from tests.kernels.test_vertical_slash import FP32_TARGET


def scoring_inputs(H, Hkv, w, N, D, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, H, w, D, generator=g).to(dtype)
    k = torch.randn(1, Hkv, N, D, generator=g).to(dtype)
    return q, k


# (D, G, H_kv, w, N): D 64/128, GQA groups 1-8, decode buffers (w = n_d-like) and probe rows.
SHAPES = [(64, 1, 2, 16, 150), (64, 3, 1, 5, 90), (64, 8, 1, 16, 200), (128, 2, 2, 9, 70), (128, 4, 1, 16, 130)]


@pytest.mark.parametrize("D,G,Hkv,w,N", SHAPES)
def test_matches_torch_scoring(key_attention_mass, D, G, Hkv, w, N):
    q, k = scoring_inputs(G * Hkv, Hkv, w, N, D, seed=D + G + w)
    ref = attention_scores(q.double(), k.double(), 0.1, backend="cpu")
    mass = key_attention_mass(q[0], k[0], 0.1, block_rows=16, block_keys=32)
    assert mass.shape == (Hkv, N) and mass.dtype == torch.float32
    assert (mass.double() - ref).abs().max() <= FP32_TARGET
    torch.testing.assert_close(mass.sum(-1), torch.full((Hkv,), float(G * w)), rtol=1e-5, atol=0.0)
    qb, kb = q.bfloat16(), k.bfloat16()
    ref_b = attention_scores(qb.double(), kb.double(), 0.1, backend="cpu")
    assert (key_attention_mass(qb[0], kb[0], 0.1).double() - ref_b).abs().max() <= FP32_TARGET


@pytest.mark.parametrize("per_head_positions", [False, True])
def test_causal_positions(key_attention_mass, per_head_positions):
    """Probe rows inside the input: a row only scores keys at or before its position (the
    row at position 3 sees 4 keys, or 2 of head 1's, whose positions start at 2)."""
    H, Hkv, w, N, D = 4, 2, 6, 80, 64
    q, k = scoring_inputs(H, Hkv, w, N, D, seed=1)
    q_pos = torch.tensor([3, 10, 40, 41, 79, 60])
    k_pos = torch.arange(N) if not per_head_positions else torch.stack([torch.arange(N), torch.arange(N) + 2])
    ref = attention_scores(q.double(), k.double(), 0.125, q_pos, k_pos, backend="cpu")
    mass = key_attention_mass(q[0], k[0], 0.125, q_pos, k_pos, block_rows=16, block_keys=16)
    assert (mass.double() - ref).abs().max() <= FP32_TARGET
    if per_head_positions:
        assert (mass[1, 78:] == 0).all() and (mass[0, 78:] > 0).all()  # head 1's at positions 80, 81: after every row


def test_dispatch_runs_triton_kernel_on_request(key_attention_mass):
    q, k = scoring_inputs(8, 2, 16, 120, 64, seed=4)
    torch.testing.assert_close(
        attention_scores(q, k, 0.125, backend="triton"), attention_scores(q, k, 0.125), rtol=0.0, atol=FP32_TARGET
    )
