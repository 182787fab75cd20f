"""Decode attention over a selected view: the CPU path against an fp64 reference, and the
device dispatch (no GPU, no Triton needed: the Triton call is replaced by a stand-in)."""

from __future__ import annotations

import pytest
import torch

from loopserve import kernels
from loopserve.cache import view_attention
from loopserve.cache.view_attention import view_decode_attention


def view_inputs(H, Hkv, T, N, L, D, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, H, T, D, generator=g).to(dtype)
    k = torch.randn(1, Hkv, N, D, generator=g).to(dtype)
    v = torch.randn(1, Hkv, N, D, generator=g).to(dtype)
    idx = torch.stack([torch.randperm(N, generator=g)[:L].sort().values for _ in range(Hkv)])
    return q, k, v, idx


def view_reference(q, k, v, idx, scale):
    """fp64: each query head attends its KV head's rows idx, all of them."""
    H, Hkv = q.shape[1], k.shape[1]
    out = torch.empty(q.shape[1:], dtype=torch.float64)
    for h in range(H):
        kvh = h // (H // Hkv)
        kv, vv = k[0, kvh, idx[kvh]].double(), v[0, kvh, idx[kvh]].double()
        out[h] = torch.softmax(q[0, h].double() @ kv.T * scale, -1) @ vv
    return out


@pytest.mark.parametrize("H,Hkv,T", [(4, 4, 1), (8, 2, 1), (6, 2, 3)])
def test_cpu_path_matches_reference(H, Hkv, T):
    q, k, v, idx = view_inputs(H, Hkv, T, 90, 37, 32, seed=H)
    out = view_decode_attention(q, k, v, idx, 0.2)
    assert out.shape == (1, H, T, 32)
    torch.testing.assert_close(out[0].double(), view_reference(q, k, v, idx, 0.2), rtol=0.0, atol=1e-5)


def test_dispatch_by_device(monkeypatch):
    calls = []

    def stand_in(what, device):
        calls.append((what, torch.device(device).type))
        raise RuntimeError("stand-in: the Triton path was chosen")

    monkeypatch.setattr(view_attention, "require_triton", stand_in)
    q, k, v, idx = view_inputs(2, 1, 1, 20, 5, 16)
    view_decode_attention(q, k, v, idx, 0.25)  # CPU tensors: the CPU path
    assert not calls
    with pytest.raises(RuntimeError, match="stand-in"):
        view_decode_attention(q, k, v, idx, 0.25, backend="triton")
    assert calls == [("decode attention over the view", "cpu")]
    assert kernels.choose_backend("cuda") == "triton"


def test_missing_triton_names_the_extra(monkeypatch):
    monkeypatch.setattr(kernels, "triton_available", lambda: False)
    q, k, v, idx = view_inputs(2, 1, 1, 20, 5, 16)
    with pytest.raises(RuntimeError, match=r"decode attention over the view for cpu tensors needs Triton: .*loopserve\[gpu\]"):
        view_decode_attention(q, k, v, idx, 0.25, backend="triton")
