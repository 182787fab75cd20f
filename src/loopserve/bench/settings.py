"""The run settings every benchmark JSON records next to its figures: timings depend on them."""

from __future__ import annotations

from ..threads import budget

__all__ = ["run_settings"]


def run_settings(engine) -> dict:
    """``dtype``: the engine's numerics (``float32``, ``bfloat16`` or ``bf16-prefill``), and
    ``threads`` (the process's thread budget)."""
    return {"dtype": engine.dtype, "threads": budget()}
