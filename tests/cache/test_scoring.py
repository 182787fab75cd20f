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
