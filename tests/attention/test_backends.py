"""The sparse prefill dispatch: Triton for CUDA tensors, the CPU kernels for CPU tensors.

No GPU and no Triton needed: the choice is a function of the device, and the Triton call
is replaced by a recording stand-in.
"""

from __future__ import annotations

import pytest
import torch

from loopserve import kernels
from loopserve.attention import LinePattern, sparse_prefill_attention
from loopserve.attention import sparse as sparse_module
from tests.attention.test_sparse import inputs, masked_reference


def test_backend_follows_the_device():
    assert kernels.choose_backend(torch.device("cuda")) == "triton"
    assert kernels.choose_backend("cuda:1") == "triton"
    assert kernels.choose_backend(torch.device("cpu")) == "cpu"
    assert kernels.choose_backend("cpu", "triton") == "triton"  # the interpreter's way
    with pytest.raises(ValueError, match="cpu kernels take CPU tensors, got cuda tensors"):
        kernels.choose_backend("cuda", "cpu")
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'"):
        kernels.choose_backend("cpu", "cuda")


@pytest.fixture
def recorded_triton_calls(monkeypatch):
    """Replace the Triton call by a stand-in that records it and returns zeros."""
    calls = []

    def stand_in(q, k, v, pattern, scale):
        calls.append((q.shape, pattern, scale))
        return torch.zeros_like(q), torch.zeros(q.shape[:2])

    monkeypatch.setattr(sparse_module, "triton_sparse_prefill", stand_in)
    return calls


def test_cpu_tensors_take_the_cpu_kernels(recorded_triton_calls):
    q, k, v = inputs(4, 2, 20, 50, 16)
    pattern = LinePattern.from_lines([[0, 7]] * 2, [[0, 1, 30]] * 2, 20, 50)
    out = sparse_prefill_attention(q, k, v, pattern)
    assert not recorded_triton_calls
    torch.testing.assert_close(out.double(), masked_reference(q, k, v, pattern), rtol=1e-5, atol=1e-5)


def test_triton_backend_gets_the_pattern_and_scale(recorded_triton_calls):
    q, k, v = inputs(4, 2, 20, 50, 16)
    pattern = LinePattern.from_lines([[0]] * 2, [[0]] * 2, 20, 50)
    out = sparse_prefill_attention(q, k, v, pattern, backend="triton")
    assert recorded_triton_calls == [((4, 20, 16), pattern, 0.25)]
    assert (out == 0).all()
    with pytest.raises(ValueError, match="pattern is for n=20, N=50"):  # checked before dispatch
        sparse_prefill_attention(q[:, :10], k, v, pattern, backend="triton")


def test_missing_triton_names_the_extra(monkeypatch):
    monkeypatch.setattr(kernels, "triton_available", lambda: False)
    q, k, v = inputs(2, 1, 4, 8, 16)
    pattern = LinePattern.from_lines([[0]], [[0]], 4, 8)
    with pytest.raises(RuntimeError, match=r"sparse prefill kernel for cpu tensors needs Triton: install the optional extra: pip install 'loopserve\[gpu\]'"):
        sparse_prefill_attention(q, k, v, pattern, backend="triton")
