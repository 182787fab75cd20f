"""GPU kernels written in Triton (optional extra ``loopserve[gpu]``), and the device dispatch.

- :mod:`loopserve.kernels.vertical_slash`: Phase 1's sparse prefill attention over
  vertical and slash lines, n new rows against N cached + new keys, GQA-shared patterns,
  output and log-sum-exp;
- :mod:`loopserve.kernels.view_decode`: Phase 2's decode attention over the selected
  view, reading the chosen rows of the KV store directly (gather and attention fused);
- :mod:`loopserve.kernels.key_scores`: Phase 2's key scoring (the attention mass each key
  receives from the buffered query rows) without materialising rows x N probabilities;
- :mod:`loopserve.kernels.online_softmax` (device functions) and
  :mod:`loopserve.kernels.launch` (input checks, launch flags), shared by them.

The kernels run on CUDA tensors; under ``TRITON_INTERPRET=1`` Triton's interpreter runs
them on CPU tensors, which is how the tests prove them correct on machines without a GPU
(``TRITON_INTERPRET`` must be set before Triton is first imported -- torch imports it
too, from torch._dynamo -- since Triton reads it when its own library and these kernels
are defined). The kernel modules import Triton at load time, so
callers import them only after :func:`require_triton`, and pick them with
:func:`choose_backend`: Triton for CUDA tensors, the CPU kernels for CPU tensors.
"""

from __future__ import annotations

import importlib.util

import torch

__all__ = ["BACKENDS", "GPU_EXTRA_HINT", "choose_backend", "require_triton", "triton_available"]

BACKENDS = ("cpu", "triton")
GPU_EXTRA_HINT = "install the optional extra: pip install 'loopserve[gpu]'"


def triton_available() -> bool:
    """Whether Triton is installed (the kernels here can be imported)."""
    return importlib.util.find_spec("triton") is not None


def require_triton(what: str, device: torch.device | str) -> None:
    """Raise a clear error when ``what`` needs the Triton kernels and Triton is missing."""
    if not triton_available():
        raise RuntimeError(f"{what} for {torch.device(device).type} tensors needs Triton: {GPU_EXTRA_HINT}")


def choose_backend(device: torch.device | str, backend: str | None = None) -> str:
    """The kernels for tensors on ``device``: ``"triton"`` on CUDA, else ``"cpu"``.

    An explicit ``backend`` is checked and returned: ``"cpu"`` cannot take CUDA tensors;
    ``"triton"`` on CPU tensors is the interpreter's way (tests).
    """
    device = torch.device(device)
    if backend is None:
        return "triton" if device.type == "cuda" else "cpu"
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}: expected one of {BACKENDS}")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"the cpu kernels take CPU tensors, got {device.type} tensors: use backend='triton'")
    return backend
