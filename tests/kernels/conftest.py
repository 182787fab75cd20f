"""The Triton kernels run under Triton's interpreter on CPU tensors (no GPU needed).

``TRITON_INTERPRET`` is read when a kernel is defined, so it is set here, before any test
imports a kernel module. Without Triton installed the tests skip, except under CI
(``CI`` set), where the ``gpu`` extra is installed and a skip would hide a failure.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")


def need_triton() -> None:
    from loopserve.kernels import GPU_EXTRA_HINT, triton_available

    if not triton_available():
        msg = f"Triton is not installed: {GPU_EXTRA_HINT}"
        if os.environ.get("CI"):
            pytest.fail(msg)  # CI installs the extra: never skip there
        pytest.skip(msg)


@pytest.fixture
def vertical_slash_attention():
    """The Triton sparse prefill kernel, defined under the interpreter."""
    need_triton()
    from loopserve.kernels import vertical_slash

    assert vertical_slash.INTERPRETED, (
        "the Triton kernels were defined before TRITON_INTERPRET=1 was set: they cannot run on CPU tensors"
    )
    return vertical_slash.vertical_slash_attention
