"""A per-thread float buffer the native kernels use as scratch, kept between calls: a fresh
tensor per call would page in new memory at every decode step or re-selection."""

from __future__ import annotations

import threading

import torch

_local = threading.local()


def scratch_buffer(n: int) -> torch.Tensor:
    """This thread's float32 buffer of at least n elements (its contents are garbage). Valid
    until the next call on the same thread: a kernel call uses it and is done with it."""
    buf = getattr(_local, "buf", None)
    if buf is None or buf.numel() < n:
        # float32 whatever torch's default dtype: the kernels write n floats into it.
        buf = _local.buf = torch.empty(max(n, 2 * (buf.numel() if buf is not None else 0)), dtype=torch.float32)
    return buf
