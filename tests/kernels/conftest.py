"""The Triton kernels run under Triton's interpreter on CPU tensors (no GPU needed).

``TRITON_INTERPRET=1`` must be set before Triton is first imported (tests/conftest.py sets
it). Without Triton installed the tests skip, except under CI (``CI`` set), where the
``gpu`` extra is installed and a skip would hide a failure.
"""

from __future__ import annotations

import os

import pytest


def need_triton() -> None:
    from loopserve.kernels import GPU_EXTRA_HINT, triton_available

    if not triton_available():
        msg = f"Triton is not installed: {GPU_EXTRA_HINT}"
        if os.environ.get("CI"):
            pytest.fail(msg)  # CI installs the extra: never skip there
        pytest.skip(msg)


def interpreted_kernel(module_name: str, name: str):
    """``loopserve.kernels.<module_name>.<name>``, checked to be defined under the interpreter."""
    need_triton()
    import importlib

    import triton.language as tl

    from loopserve.kernels.launch import interpreted

    module = importlib.import_module(f"loopserve.kernels.{module_name}")
    assert module.INTERPRETED and interpreted(tl.zeros), (
        "Triton was imported before TRITON_INTERPRET=1 was set (tests/conftest.py sets it first): "
        "its kernels cannot run on CPU tensors"
    )
    return getattr(module, name)


@pytest.fixture
def vertical_slash_attention():
    return interpreted_kernel("vertical_slash", "vertical_slash_attention")


@pytest.fixture
def view_decode_attention():
    return interpreted_kernel("view_decode", "view_decode_attention")


@pytest.fixture
def key_attention_mass():
    return interpreted_kernel("key_scores", "key_attention_mass")
