"""The run settings every benchmark JSON records next to its figures: timings depend on them."""

from __future__ import annotations

from ..threads import budget

__all__ = ["run_settings"]


def run_settings(engine) -> dict:
    """``dtype`` of the engine's weights (e.g. ``"float32"``) and ``threads`` (the process's thread budget)."""
    return {"dtype": str(engine.model.dtype).removeprefix("torch."), "threads": budget()}
