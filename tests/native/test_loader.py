"""The native kernels' loader: build into the cache, reuse it, fall back (logged once) when
no library can be built."""

from __future__ import annotations

import logging

import pytest
import torch

from loopserve.attention import LinePattern, select_lines, sparse_prefill_attention
from loopserve.attention import sparse as sparse_module
from loopserve.models import model_cache_dir
from loopserve.native import loader, native_kernels, reset_native_kernels
from loopserve.native.loader import build_key
from loopserve.paths import cache_root

HAVE_COMPILER = loader.compiler() is not None


@pytest.fixture
def fresh_loader(monkeypatch, tmp_path):
    """An empty kernel cache and a loader that has loaded nothing yet; afterwards the
    loader forgets this test's library (the real one loads again on next use)."""
    monkeypatch.setenv("LOOPSERVE_CACHE", str(tmp_path))
    monkeypatch.delenv("LOOPSERVE_NATIVE", raising=False)
    reset_native_kernels()
    yield tmp_path
    reset_native_kernels()


def loader_warnings(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == loader.__name__ and r.levelno >= logging.WARNING]


def problem(seed=0):
    """Query/key/value of 2 KV heads (G = 3) and a pattern with isolated slashes and verticals."""
    g = torch.Generator().manual_seed(seed)
    H, Hkv, n, N, D = 6, 2, 70, 150, 64
    q, k, v = (torch.randn(h, m, D, generator=g) for h, m in ((H, n), (Hkv, N), (Hkv, N)))
    vs = [torch.tensor([0, 1, 40, 90]), torch.arange(0, N, 11)]
    ss = [torch.tensor([0, 1, 2, 17, 60]), torch.tensor([0, 5, 33, 100])]
    return q, k, v, LinePattern.from_lines(vs, ss, n, N)


def test_broken_compiler_logs_one_warning_and_falls_back_to_the_same_result(fresh_loader, monkeypatch, caplog):
    q, k, v, pattern = problem()
    torch_path = sparse_prefill_attention(q, k, v, pattern, native=False)
    monkeypatch.setenv("CC", "false")  # a "compiler" that fails at once, without output
    with caplog.at_level(logging.INFO, logger=loader.__name__):
        first = sparse_prefill_attention(q, k, v, pattern)  # tries the build, falls back
        again = sparse_prefill_attention(q, k, v, pattern, native=True)  # asked for, not available
        select_lines(q, k, alpha=0.9)  # the greedy rounds fall back to numpy
    assert native_kernels() is None
    (warning,) = loader_warnings(caplog)
    assert "`false` failed with exit status 1" in warning.getMessage()
    assert "pure-PyTorch" in warning.getMessage()
    assert torch.equal(first, torch_path) and torch.equal(again, torch_path)
    assert not list(fresh_loader.rglob("*.so"))


def test_missing_compiler_is_named_in_the_warning(fresh_loader, monkeypatch, caplog):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(fresh_loader))  # no cc, gcc or clang here
    with caplog.at_level(logging.WARNING, logger=loader.__name__):
        assert native_kernels() is None
        assert not sparse_module._native_usable(64)
    (warning,) = loader_warnings(caplog)
    assert "no C compiler found" in warning.getMessage()


def test_native_zero_disables_without_a_warning(fresh_loader, monkeypatch, caplog):
    monkeypatch.setenv("LOOPSERVE_NATIVE", "0")
    with caplog.at_level(logging.WARNING, logger=loader.__name__):
        assert native_kernels() is None
        assert not sparse_module._native_usable(64)
    assert not loader_warnings(caplog)


def test_build_key_changes_with_sources_command_and_cpu():
    sources = {"a.c": b"int f(void) { return 1; }", "a.h": b"#define X 1"}
    command = ["cc", "-O3", "-march=native", "-shared", "-fPIC", "-lm"]
    key = build_key(sources, command, "x86_64 avx2")
    assert build_key(dict(sources), list(command), "x86_64 avx2") == key  # deterministic
    assert build_key({**sources, "a.h": b"#define X 2"}, command, "x86_64 avx2") != key  # a header
    assert build_key(sources, [*command[:1], "-O2", *command[2:]], "x86_64 avx2") != key  # a flag
    assert build_key(sources, ["clang", *command[1:]], "x86_64 avx2") != key  # the compiler
    assert build_key(sources, command, "x86_64 avx512f") != key  # the CPU


def test_models_and_kernels_share_one_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("LOOPSERVE_CACHE", str(tmp_path))
    assert cache_root() == model_cache_dir() == tmp_path
    monkeypatch.setenv("LOOPSERVE_CACHE", "")  # empty counts as unset
    assert cache_root().parts[-2:] == (".cache", "loopserve")


@pytest.mark.skipif(not HAVE_COMPILER, reason="no C compiler")
def test_library_is_built_into_the_cache_once_and_reused(fresh_loader, monkeypatch):
    kernels = native_kernels()
    assert kernels is not None
    assert kernels.path.parent == fresh_loader / "kernels"
    assert kernels.slash_supported(3, 64) and not kernels.slash_supported(9, 64)
    assert not kernels.slash_supported(1, 96)

    def no_compiling(*args):
        raise AssertionError("compiled again although the cache holds the library")

    monkeypatch.setattr(loader, "_compile", no_compiling)
    reset_native_kernels()
    assert native_kernels().path == kernels.path


@pytest.mark.skipif(not HAVE_COMPILER, reason="no C compiler")
def test_compiler_without_openmp_gets_a_build_without_it(fresh_loader, monkeypatch):
    """The OpenMP kernels then run on one thread, with the same results."""
    from loopserve.attention.decode import decode_attention, torch_decode_attention

    real = " ".join(loader.compiler())
    wrapper = fresh_loader / "cc-without-openmp"
    wrapper.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && exit 1; done\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("CC", str(wrapper))
    kernels = native_kernels()
    assert kernels is not None and kernels.decode_attention_supported(3, 64)
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 6, 1, 64, generator=g), torch.randn(1, 2, 300, 64, generator=g), torch.randn(1, 2, 300, 64, generator=g)
    (out,) = decode_attention([q], [k], [v], 0.125)
    torch.testing.assert_close(out, torch_decode_attention(q, k, v, 0.125), rtol=0.0, atol=2e-6)
