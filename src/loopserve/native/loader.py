"""Build, cache and load the native kernels (the C sources next to this file).

The first call of :func:`native_kernels` in a process compiles ``slash_attention.c``,
``greedy_cover.c``, ``decode_attention.c``, ``skinny_linear.c`` and ``key_scores.c`` with the system C
compiler (``$CC``, else
``cc``, ``gcc`` or ``clang``; ``-O3 -march=native -fopenmp``, a few seconds, no torch
headers) into one shared library under
``$LOOPSERVE_CACHE/kernels`` (see :mod:`loopserve.paths`), or loads the one built before.
The file name carries a hash of the sources, the compile command and the CPU's features
(``-march=native`` code only runs where it was built), so a changed source, flag,
compiler or machine builds anew. Concurrent builders are harmless: each compiles into a
private temporary folder and renames the result into place.

When no library can be had (no compiler, a compile error, a library that does not
load), the reason is logged once as a warning and :func:`native_kernels` returns None:
the callers then run their pure-PyTorch paths, which give the same results.
``LOOPSERVE_NATIVE=0`` skips the native kernels without a warning.

OpenMP: the decode attention, skinny linear and key scoring kernels run on OpenMP threads. The library
asks for ``libgomp.so.1``, the soname of the OpenMP runtime torch ships and has already
loaded, so the dynamic loader binds it to torch's copy: one runtime and one thread pool
for torch's ops and ours, never two pools competing for the cores. A compiler without
OpenMP gets a second build without ``-fopenmp``, whose kernels run on one thread.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..paths import cache_root

__all__ = [
    "NATIVE_ENV",
    "BuildError",
    "NativeKernels",
    "build_key",
    "build_library",
    "native_kernels",
    "reset_native_kernels",
]

log = logging.getLogger(__name__)

NATIVE_ENV = "LOOPSERVE_NATIVE"
SOURCES = ("slash_attention.c", "greedy_cover.c", "decode_attention.c", "skinny_linear.c", "key_scores.c")  # compiled, in this order
HEADERS = ("slash_vector.h", "slash_block.h")  # included by the sources: part of the cache key
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC")
OPENMP_FLAGS = ("-fopenmp",)
LIBS = ("-lm",)
BUILD_TIMEOUT_S = 300


class BuildError(RuntimeError):
    """The native library could not be built; the message says why."""


@dataclass(frozen=True)
class NativeKernels:
    """Entry points of the loaded library (ctypes functions: calls release the GIL).

    See the C sources for the arguments. ``slash_supported(G, D)`` says whether the slash
    kernel has a specialisation for G query heads per KV head and head dimension D;
    ``slash_scratch_floats(G, D)`` is the scratch size one ``slash_attention`` call needs;
    ``decode_attention_supported(G, D)`` and ``decode_attention_scratch_floats(S, lens,
    H_kv, G, D, threads)`` likewise for ``decode_attention``. ``skinny_linear`` is y = x W^T (+ b)
    for a few rows of x. ``key_scores`` (with ``key_scores_supported(R, D)`` and
    ``key_scores_scratch_floats(H_kv, n, R, D)``) is Phase 2's attention mass per key, and
    ``top_rows`` the K largest values' indices per head, ascending (``pooled_top_rows``:
    of the max-pooled values, the first and last few forced in).
    """

    path: Path
    slash_attention: Callable[..., None]
    slash_supported: Callable[[int, int], int]
    slash_scratch_floats: Callable[[int, int], int]
    greedy_rounds: Callable[..., int]
    greedy_line_mass: Callable[..., None]
    decode_attention: Callable[..., None]
    decode_attention_supported: Callable[[int, int], int]
    decode_attention_scratch_floats: Callable[..., int]
    skinny_linear: Callable[..., None]
    key_scores: Callable[..., None]
    key_scores_supported: Callable[[int, int], int]
    key_scores_scratch_floats: Callable[[int, int, int, int], int]
    top_rows: Callable[..., None]
    pooled_top_rows: Callable[..., None]


_lock = threading.Lock()
_loaded: dict[str, NativeKernels | None] = {}


def native_kernels() -> NativeKernels | None:
    """The native kernels, built or loaded on first use; None where unavailable (logged once)."""
    with _lock:
        if "kernels" not in _loaded:
            _loaded["kernels"] = _load()
        return _loaded["kernels"]


def reset_native_kernels() -> None:
    """Forget the loaded (or failed) library: the next :func:`native_kernels` call tries again,
    with the environment of that moment (``CC``, ``$LOOPSERVE_CACHE``, ``$LOOPSERVE_NATIVE``)."""
    with _lock:
        _loaded.clear()


def _load() -> NativeKernels | None:
    if os.environ.get(NATIVE_ENV, "1") == "0":
        log.info("native kernels disabled by %s=0: using the pure-PyTorch paths", NATIVE_ENV)
        return None
    try:
        path = build_library()
        return _bind(ctypes.CDLL(str(path)), path)
    except BuildError as exc:
        reason = str(exc)
    except OSError as exc:  # the library exists but does not load
        reason = f"cannot load the compiled library: {exc}"
    log.warning("native kernels unavailable, using the slower pure-PyTorch paths: %s", reason)
    return None


def _bind(lib: ctypes.CDLL, path: Path) -> NativeKernels:
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    slash = lib.slash_attention
    slash.restype = None
    slash.argtypes = [ptr, i64, ptr, ptr, ptr, i64, ptr, i64, ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, i64, ptr, ptr, ptr]
    supported = lib.slash_supported
    supported.restype, supported.argtypes = ctypes.c_int, [i64, i64]
    scratch = lib.slash_scratch_floats
    scratch.restype, scratch.argtypes = i64, [i64, i64]
    greedy = lib.greedy_rounds
    greedy.restype = i64
    greedy.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr]
    mass = lib.greedy_line_mass
    mass.restype, mass.argtypes = None, [ptr, ptr, i64, i64, i64, ptr]
    decode = lib.decode_attention
    decode.restype = None
    decode.argtypes = [i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, ctypes.c_float, ptr, i64]
    decode_supported = lib.decode_attention_supported
    decode_supported.restype, decode_supported.argtypes = ctypes.c_int, [i64, i64]
    decode_scratch = lib.decode_attention_scratch_floats
    decode_scratch.restype, decode_scratch.argtypes = i64, [i64, ptr, i64, i64, i64, i64]
    linear = lib.skinny_linear
    linear.restype, linear.argtypes = None, [ptr, i64, i64, ptr, ptr, i64, ptr, i64]
    scores = lib.key_scores
    scores.restype, scores.argtypes = None, [ptr, ptr, i64, i64, i64, i64, i64, ptr, ptr, i64]
    scores_supported = lib.key_scores_supported
    scores_supported.restype, scores_supported.argtypes = ctypes.c_int, [i64, i64]
    scores_scratch = lib.key_scores_scratch_floats
    scores_scratch.restype, scores_scratch.argtypes = i64, [i64, i64, i64, i64]
    top = lib.top_rows
    top.restype, top.argtypes = None, [ptr, i64, i64, i64, ptr]
    pooled_top = lib.pooled_top_rows
    pooled_top.restype, pooled_top.argtypes = None, [ptr, i64, i64, i64, i64, i64, i64, ptr, ptr]
    return NativeKernels(path, slash, supported, scratch, greedy, mass, decode, decode_supported, decode_scratch, linear,
                         scores, scores_supported, scores_scratch, top, pooled_top)


def source_dir() -> Path:
    """The folder holding the C sources (package data, installed with the package)."""
    return Path(__file__).resolve().parent


def compiler() -> list[str] | None:
    """The C compiler command: ``$CC`` (which may carry arguments, e.g. ``ccache gcc``),
    else ``cc``, ``gcc`` or ``clang`` from PATH; None if there is none."""
    cc = os.environ.get("CC", "").strip()
    if cc:
        return shlex.split(cc)
    found = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    return [found] if found else None


def cpu_signature() -> str:
    """The CPU features ``-march=native`` compiles for (architecture and feature flags)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.strip() for line in f if line.startswith("flags")), "")
    except OSError:  # not Linux: the architecture alone
        flags = ""
    return f"{platform.machine()} {flags}"


def build_key(sources: dict[str, bytes], command: Sequence[str], cpu: str) -> str:
    """Cache key of a build: changes with any source or header text, the compile command
    (compiler, flags, libraries) and the CPU signature."""
    h = hashlib.sha256()
    for name in sorted(sources):
        h.update(name.encode() + b"\0" + sources[name] + b"\0")
    h.update("\0".join(command).encode() + b"\0" + cpu.encode())
    return h.hexdigest()[:20]


def build_library(cache_dir: Path | None = None) -> Path:
    """Path of the compiled library in ``cache_dir`` (default ``$LOOPSERVE_CACHE/kernels``),
    compiling it first unless a build with the same key is there. Raises :class:`BuildError`."""
    cc = compiler()
    if cc is None:
        raise BuildError("no C compiler found: install cc (gcc or clang) or set CC")
    folder = source_dir()
    try:
        texts = {name: (folder / name).read_bytes() for name in SOURCES + HEADERS}
    except OSError as exc:
        raise BuildError(f"kernel sources missing from the installed package: {exc}") from None
    cache = _writable_dir(cache_dir if cache_dir is not None else cache_root() / "kernels")
    try:
        return _build(cc, [*cc, *FLAGS, *OPENMP_FLAGS], texts, folder, cache)
    except BuildError as with_openmp:
        try:
            return _build(cc, [*cc, *FLAGS], texts, folder, cache)
        except BuildError:
            raise with_openmp from None


def _build(cc: list[str], command: list[str], texts: dict[str, bytes], folder: Path, cache: Path) -> Path:
    key = build_key(texts, [*command, *LIBS], cpu_signature())
    target = cache / f"loopserve_kernels_{key}.so"
    if target.exists():
        return target
    with tempfile.TemporaryDirectory(dir=cache, prefix=".build-") as tmp:
        out = Path(tmp) / target.name
        argv = [*command, "-o", str(out), *(str(folder / name) for name in SOURCES), *LIBS]
        _compile(argv, shlex.join(cc))
        if not out.exists():
            raise BuildError(f"`{shlex.join(cc)}` exited successfully but wrote no library")
        os.replace(out, target)  # atomic: a concurrent builder's identical file is replaced whole
    return target


def _compile(argv: list[str], cc: str) -> None:
    try:
        subprocess.run(argv, check=True, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    except subprocess.CalledProcessError as exc:
        detail = (exc.stderr or exc.stdout or "").strip()
        detail = f":\n{detail[-2000:]}" if detail else " (no output)"
        raise BuildError(f"`{cc}` failed with exit status {exc.returncode}{detail}") from None
    except subprocess.TimeoutExpired:
        raise BuildError(f"`{cc}` did not finish within {BUILD_TIMEOUT_S} s") from None
    except OSError as exc:  # not found, not executable
        raise BuildError(f"cannot run the C compiler `{cc}`: {exc}") from None


def _writable_dir(path: Path) -> Path:
    """``path``, created; a private temporary folder if it cannot be written (read-only cache)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        if os.access(path, os.W_OK):
            return path
    except OSError:
        pass
    fallback = Path(tempfile.mkdtemp(prefix="loopserve-kernels-"))
    log.info("kernel cache %s is not writable: building in %s for this process", path, fallback)
    return fallback
