"""Linear layers for decode steps' few rows (models/native_linear.py): exact against fp64,
the same bits for a row whatever the batch, and the swap keeps the model's parameters."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from loopserve.models import native_linear as native_linear_module
from loopserve.models import tiny_model
from loopserve.models.native_linear import MAX_ROWS, NativeLinear, use_native_linears
from loopserve.native import native_kernels
from loopserve.threads import intra_op_threads

HAVE_NATIVE = native_kernels() is not None
native_only = pytest.mark.skipif(not HAVE_NATIVE, reason="no native kernels (no C compiler)")


def layer(in_f, out_f, bias, seed=0):
    torch.manual_seed(seed)
    return NativeLinear(nn.Linear(in_f, out_f, bias=bias))


# in/out features: vector-width multiples (SmolLM2's 576 -> 1536), a remainder on both
# sides, and fewer outputs than one block of weight rows.
SIZES = [(576, 1536), (70, 45), (16, 3)]


@pytest.mark.parametrize("in_f,out_f", SIZES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 8, MAX_ROWS])
def test_matches_fp64_reference(in_f, out_f, bias, rows):
    lin = layer(in_f, out_f, bias)
    x = torch.randn(1, rows, in_f)
    with torch.inference_mode():
        y = lin(x)
    ref = x.double() @ lin.weight.double().T + (lin.bias.double() if bias else 0)
    assert y.shape == (1, rows, out_f) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref, rtol=0.0, atol=1e-5 * in_f**0.5)


@pytest.mark.parametrize("in_f,out_f", SIZES)
def test_a_row_gets_the_same_bits_in_any_batch(in_f, out_f):
    lin = layer(in_f, out_f, bias=True)
    x = torch.randn(MAX_ROWS, in_f)
    with torch.inference_mode():
        whole = lin(x)
        for rows in (1, 2, 5, 9):
            for start in range(0, MAX_ROWS - rows + 1, rows):
                assert torch.equal(lin(x[start : start + rows]), whole[start : start + rows])
        for threads in (1, 3):  # nor on the thread count
            with intra_op_threads(threads):
                assert torch.equal(lin(x), whole)


@native_only
def test_kernel_serves_few_rows_and_sgemm_the_rest(monkeypatch):
    lin = layer(64, 32, bias=False)
    kernels = native_kernels()
    calls = []
    spy = dataclasses.replace(kernels, skinny_linear=lambda *a: calls.append(a[1]) or kernels.skinny_linear(*a))
    monkeypatch.setattr(native_linear_module, "native_kernels", lambda: spy)
    with torch.inference_mode():
        lin(torch.randn(MAX_ROWS, 64))
        assert len(calls) == 1
        many = torch.randn(MAX_ROWS + 1, 64)
        assert torch.equal(lin(many), nn.functional.linear(many, lin.weight))
        assert len(calls) == 1
        lin(torch.randn(2, 64, dtype=torch.float64).float())
        assert calls == [MAX_ROWS, 2]  # the kernel ran with those rows; the 17 went to sgemm


def test_autograd_and_other_dtypes_use_f_linear():
    lin = layer(32, 8, bias=True)
    x = torch.randn(2, 32, requires_grad=True)
    lin(x).sum().backward()  # the kernel has no backward: autograd goes through F.linear
    assert x.grad is not None and lin.weight.grad is not None
    lin_bf16 = layer(32, 8, bias=False).to(torch.bfloat16)
    xb = torch.randn(2, 32, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(lin_bf16(xb), nn.functional.linear(xb, lin_bf16.weight))


def test_swap_keeps_parameters_ties_and_outputs():
    model = tiny_model("tiny-llama")
    params = {name: p for name, p in model.named_parameters()}
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.inference_mode():
        before = model(input_ids=ids).logits
    replaced = use_native_linears(model)
    assert replaced == sum(isinstance(m, nn.Linear) for m in model.modules())
    assert all(isinstance(m, NativeLinear) for m in model.modules() if isinstance(m, nn.Linear))
    assert use_native_linears(model) == 0  # idempotent
    assert {name: p for name, p in model.named_parameters()} == params  # the same tensors, no copies
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.get_input_embeddings().weight
    with torch.inference_mode():
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=0.0, atol=1e-5)
