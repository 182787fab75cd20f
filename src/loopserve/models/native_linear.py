"""Linear layers that run decode steps' few rows through the native skinny kernel.

A decode step multiplies one row per conversation by every weight matrix. On a CPU that is
bound by reading the weights, and BLAS sgemm, which packs the weights before multiplying,
makes a few rows cost far more than one; ``loopserve/native/skinny_linear.c`` reads each
weight once for all rows (``benchmarks/skinny_linear.py`` measures both), which is what
lets the scheduler batch decode steps of many conversations for little more than one.
Its sums also do not depend on how many rows a call has, so a conversation's logits in
a batch are the same bits as alone.

:func:`use_native_linears` swaps a model's ``nn.Linear`` modules for :class:`NativeLinear`
through the public module API (the weights are the same parameters, not copies). A call
with at most :data:`MAX_ROWS` rows of fp32 on the CPU, outside autograd, uses the kernel;
anything else (prefill, other dtypes or devices, no compiler) is ``F.linear`` as before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..native import native_kernels

__all__ = ["MAX_ROWS", "NativeLinear", "use_native_linears"]

# Rows up to which the kernel is used (a decode batch); more rows are prefill, where
# sgemm's packing pays off.
MAX_ROWS = 16


class NativeLinear(nn.Linear):
    """An ``nn.Linear`` (same parameters) whose calls with few rows run the native kernel."""

    def __init__(self, linear: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features if self.in_features else 0
        w, b = self.weight, self.bias
        if not (0 < rows <= MAX_ROWS and x.dtype == w.dtype == torch.float32 and x.device.type == "cpu"
                and (b is None or b.dtype == torch.float32)):
            return F.linear(x, w, b)
        if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
            return F.linear(x, w, b)
        kernels = native_kernels()
        if kernels is None or not w.is_contiguous():
            return F.linear(x, w, b)
        x = x.contiguous()
        b = b.contiguous() if b is not None else None
        y = x.new_empty(*x.shape[:-1], self.out_features)
        kernels.skinny_linear(x.data_ptr(), rows, self.in_features, w.data_ptr(),
                              b.data_ptr() if b is not None else None, self.out_features, y.data_ptr(),
                              torch.get_num_threads())  # as many as torch's ops would use here
        return y


def use_native_linears(model: nn.Module) -> int:
    """Replace every ``nn.Linear`` of ``model`` by a :class:`NativeLinear` sharing its
    parameters (idempotent); returns how many were replaced."""
    swaps = [(name, module) for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and not isinstance(module, NativeLinear)]
    for name, module in swaps:
        model.set_submodule(name, NativeLinear(module))
    return len(swaps)
