"""Validation shared by every method's knobs: one error format, naming the knob."""

from __future__ import annotations


def check_int_knob(obj, knob: str, low: int) -> None:
    """Raise ValueError unless `obj.<knob>` is an integer (not a bool) >= `low`."""
    v = getattr(obj, knob)
    if not isinstance(v, int) or isinstance(v, bool) or v < low:
        raise ValueError(f"invalid knob {knob}={v!r}: must be an integer >= {low}")
