"""Where LoopServe keeps files between runs: one cache root for everything.

The default model's converted weights, the compiled native kernels and the server's
conversation store all live under :func:`cache_root`.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CACHE_ENV", "cache_root"]

CACHE_ENV = "LOOPSERVE_CACHE"


def cache_root() -> Path:
    """``$LOOPSERVE_CACHE``, or ``~/.cache/loopserve`` when it is unset or empty (not created here)."""
    value = os.environ.get(CACHE_ENV)
    return Path(value).expanduser() if value else Path.home() / ".cache" / "loopserve"
