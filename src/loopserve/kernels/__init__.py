"""GPU kernels written in Triton (optional extra ``loopserve[gpu]``).

- :mod:`loopserve.kernels.vertical_slash`: Phase 1's sparse prefill attention over
  vertical and slash lines, n new rows against N cached + new keys, GQA-shared patterns,
  output and log-sum-exp.

The kernels run on CUDA tensors; under ``TRITON_INTERPRET=1`` Triton's interpreter runs
them on CPU tensors, which is how the tests prove them correct on machines without a GPU
(``TRITON_INTERPRET`` must be set before the kernel module is first imported: Triton
reads it when the kernels are defined). The modules here import Triton at load time, so
import them only after :func:`triton_available`; callers pick between these kernels and
the CPU ones (:func:`loopserve.attention.sparse.prefill_backend`).
"""

from __future__ import annotations

import importlib.util

__all__ = ["GPU_EXTRA_HINT", "triton_available"]

GPU_EXTRA_HINT = "install the optional extra: pip install 'loopserve[gpu]'"


def triton_available() -> bool:
    """Whether Triton is installed (the kernels here can be imported)."""
    return importlib.util.find_spec("triton") is not None
