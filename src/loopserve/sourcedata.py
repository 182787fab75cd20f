"""Where the evaluation source data lives, and opening its files.

The package carries the files its demo, benchmarks and tests read (``loopserve/data``,
trimmed to the fields used and xz-compressed; see ``data/README.md``). ``$LOOPSERVE_DATA``
or an explicit folder overrides it with a full copy of the upstream files in the same
layout (``leval/``, ``ruler_sources/``). A file ``REL`` is read as ``REL`` when the folder
holds it, else as ``REL.xz``.
"""

from __future__ import annotations

import lzma
import os
from pathlib import Path
from typing import IO

__all__ = ["DATA_ENV", "PACKAGED_DATA_DIR", "DataDirError", "open_source", "resolve_data_dir", "source_file"]

DATA_ENV = "LOOPSERVE_DATA"
PACKAGED_DATA_DIR = Path(__file__).resolve().parent / "data"


class DataDirError(FileNotFoundError):
    """The evaluation data folder, or a file in it, could not be found."""


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding ``leval/`` and ``ruler_sources/``.

    The explicit argument, else ``$LOOPSERVE_DATA``, else the copy shipped in the package.
    A folder given either way must hold ``leval/``: a wrong override is an error, never
    silently replaced by the shipped copy.
    """
    if data_dir is not None:
        path, origin = Path(data_dir), "data_dir"
    elif os.environ.get(DATA_ENV):
        path, origin = Path(os.environ[DATA_ENV]), f"${DATA_ENV}"
    else:
        path, origin = PACKAGED_DATA_DIR, "the data shipped in the package"
    if (path / "leval").is_dir():
        return path.resolve()
    raise DataDirError(
        f"benchmark data directory not found: {path} (from {origin}) has no leval/ folder; point "
        f"${DATA_ENV} or data_dir= at a folder with leval/ and ruler_sources/, or unset ${DATA_ENV} "
        "to use the data shipped in the package"
    )


def source_file(data_dir: Path, rel: str) -> Path:
    """Path of source file ``rel`` in ``data_dir``: as is, or its ``.xz`` copy."""
    for path in (data_dir / rel, data_dir / f"{rel}.xz"):
        if path.is_file():
            return path
    raise DataDirError(f"source file {rel} not found in {data_dir} (nor {rel}.xz)")


def open_source(data_dir: Path, rel: str) -> IO[str]:
    """Open source file ``rel`` of ``data_dir`` as UTF-8 text, decompressing an ``.xz`` copy."""
    path = source_file(data_dir, rel)
    if path.suffix == ".xz":
        return lzma.open(path, "rt", encoding="utf-8")
    return path.open(encoding="utf-8")
