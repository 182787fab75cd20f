"""Host-side helpers of the Triton kernels: input checks and the flags a launch needs."""

from __future__ import annotations

import torch
from triton.runtime.interpreter import InterpretedFunction

__all__ = ["SUPPORTED_HEAD_DIMS", "check_attention_inputs", "check_blocks", "dot_flags", "interpreted", "next_pow2", "num_warps"]

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)


def next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def num_warps(rows: int, head_dim: int) -> int:
    """Warps of a program whose fp32 accumulator is ``rows x head_dim``: 8 above 8K floats
    (64 registers a thread at 4 warps), so the accumulator does not spill."""
    return 8 if rows * head_dim > 8192 else 4


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """q ``(H, rows, D)``, k and v ``(H_kv, N, D)``: one dtype, one device, a supported D."""
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"expected q (H, rows, D) and k, v (H_kv, N, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[2] != q.shape[2] or q.shape[0] % k.shape[0]:
        raise ValueError(f"incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}: need equal D and H % H_kv == 0")
    if q.shape[2] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim {q.shape[2]} not supported by the Triton kernels (supported: {SUPPORTED_HEAD_DIMS})")
    if not q.dtype == k.dtype == v.dtype or q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"q, k, v must share one dtype among fp32, bf16, fp16; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")


def check_blocks(**sizes: int) -> None:
    """Tile sizes must be powers of two >= 16 (tl.arange and tl.dot need them)."""
    for name, size in sizes.items():
        if size < 16 or size & (size - 1):
            raise ValueError(f"{name}={size}: must be a power of two >= 16")


def interpreted(kernel) -> bool:
    """Whether ``kernel`` was defined under Triton's interpreter (``TRITON_INTERPRET=1``)."""
    return isinstance(kernel, InterpretedFunction)


def dot_flags(kernel, dtype: torch.dtype) -> dict[str, bool]:
    """The ``UPCAST`` and ``SPLIT_P`` constants of :func:`~loopserve.kernels.online_softmax.online_softmax_step`.

    fp32 inputs: IEEE fp32 dots (no TF32). bf16/fp16: low-precision dots with P split in
    two terms -- except under the interpreter, which (triton 3.9) multiplies bf16 dot
    operands as their raw 16-bit patterns: there the operands are upcast first, which
    gives the GPU's result (bf16 products are exact in fp32).
    """
    return {"UPCAST": dtype == torch.float32 or interpreted(kernel), "SPLIT_P": dtype != torch.float32}
