"""One thread budget for the process, shared by everything that runs in parallel.

:func:`configure` sets it (``--threads N`` on every command, ``Engine(..., threads=N)``),
by default to the physical cores this process may use. The budget goes to

- torch's intra-op threads (``torch.set_num_threads``);
- the worker threads of :func:`parallel_map` (the native kernels, Phase 1's selection);
- the Hugging Face tokenizers' Rust thread pool (``RAYON_NUM_THREADS``; with a budget of
  one thread ``TOKENIZERS_PARALLELISM=false``);
- subprocesses, through ``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS``.

So nothing oversubscribes the cores: on a busy machine oversubscribed OpenMP barriers
wait whole scheduler ticks (issue 17 measured a 4x slower time to first token).

:func:`intra_op_threads` narrows torch's count for a block and restores it. With
torch's OpenMP backend the setting is per OS thread for threads that already use torch
(OpenMP and MKL keep it per thread), but a thread whose first torch use falls inside the
block starts with the narrowed count. That is why the native kernels get their worker
count from :func:`budget`, never from ``torch.get_num_threads()`` inside such a block.
"""

from __future__ import annotations

import numbers
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager

import psutil
import torch

__all__ = ["budget", "check_threads", "configure", "ensure_configured", "intra_op_threads", "parallel_map", "physical_cores"]

_SUBPROCESS_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
_RAYON_VAR = "RAYON_NUM_THREADS"  # the tokenizers' thread pool (read when it starts)
_TOKENIZERS_VAR = "TOKENIZERS_PARALLELISM"
_UNSET = object()

_budget: int | None = None
_user_tokenizers_setting: object = _UNSET  # TOKENIZERS_PARALLELISM before configure() first changed it


def physical_cores() -> int:
    """Physical cores this process may run on (the default budget).

    psutil counts the machine's physical cores; when the process is restricted to fewer
    CPUs (``taskset``, a container's cpuset), the count is scaled by the fraction of
    logical CPUs it may use (assuming SMT siblings are granted together). Falls back to
    the usable logical CPUs where psutil cannot tell. CPU quotas (cgroup ``cpu.max``)
    are not seen: pass ``--threads`` there.
    """
    logical = psutil.cpu_count(logical=True) or os.cpu_count() or 1
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else logical
    cores = psutil.cpu_count(logical=False)
    if not cores:
        return max(1, usable)
    return max(1, min(cores, round(usable * cores / logical)))


def check_threads(value) -> int:
    """``value`` as a thread count (a positive integer, or a string of one); ValueError otherwise."""
    if isinstance(value, str):
        text = value.strip()
        if not text.lstrip("+-").isdigit():
            raise ValueError(f"threads must be a positive integer, got {value!r}")
        value = int(text)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"threads must be a positive integer, got {value!r}")
    value = int(value)
    if value < 1:
        raise ValueError(f"threads must be at least 1, got {value}")
    return value


def configure(threads: int | str | None = None) -> int:
    """Set the process's thread budget (default: :func:`physical_cores`); returns it.

    Validates first: a bad value raises ValueError and changes nothing.
    """
    global _budget, _user_tokenizers_setting
    n = physical_cores() if threads is None else check_threads(threads)
    torch.set_num_threads(n)
    for var in _SUBPROCESS_VARS:
        os.environ[var] = str(n)
    os.environ[_RAYON_VAR] = str(n)
    if _user_tokenizers_setting is _UNSET:
        _user_tokenizers_setting = os.environ.get(_TOKENIZERS_VAR)
    if n == 1:
        os.environ[_TOKENIZERS_VAR] = "false"
    elif _user_tokenizers_setting is None:
        # tokenizers' own default: parallel, but off in forked children (no fork deadlocks)
        os.environ.pop(_TOKENIZERS_VAR, None)
    else:
        os.environ[_TOKENIZERS_VAR] = str(_user_tokenizers_setting)
    _budget = n
    return n


def ensure_configured() -> int:
    """The budget, configured with the default first if nothing configured it yet."""
    return _budget if _budget is not None else configure()


def budget() -> int:
    """The configured budget; before any :func:`configure`, torch's current thread count."""
    return _budget if _budget is not None else torch.get_num_threads()


@contextmanager
def intra_op_threads(n: int):
    """Run a block with ``n`` torch intra-op threads in this thread, then restore the count.

    Long sequences of small tensor ops (the greedy rounds, the sparse kernel's
    bookkeeping) are faster on one thread: on several, every op ends in an OpenMP
    barrier, and on a loaded machine each barrier can wait a scheduler tick for a
    descheduled thread (measured 3-5x slower). The few large ops re-enter the budget
    explicitly. Toggling costs ~0.1 us.
    """
    previous = torch.get_num_threads()
    if n == previous:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_in_worker = threading.local()  # set while a pool thread runs parallel_map items


def _worker_pool(size: int) -> ThreadPoolExecutor:
    """The process's worker pool, ``size`` threads; rebuilt when the size changes."""
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size != size:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=size, thread_name_prefix="loopserve-compute")
            _pool_size = size
        return _pool


def parallel_map(fn: Callable, items: Sequence, workers: int | None = None) -> list:
    """``[fn(x) for x in items]``, on up to ``workers`` (default: the budget) threads of one
    shared pool; the results keep the items' order.

    For work that releases the GIL (ctypes calls, torch ops) split into several items per
    worker: each worker takes the next item when it is free, so if another process holds
    a core, the other workers pick up the rest instead of everyone waiting for it. Items
    run with one torch intra-op thread each (the parallelism is across items; threads
    inside them would only add OpenMP barriers) and the caller's autograd mode (inference
    or no-grad: thread-local in torch). Exceptions propagate.
    """
    n = len(items)
    workers = min(budget() if workers is None else workers, n)
    if workers <= 1 or getattr(_in_worker, "active", False):  # nested: the pool may be all busy waiting
        with intra_op_threads(1):
            return [fn(x) for x in items]
    results: list = [None] * n
    pending = iter(range(n))  # shared: next() on a range iterator is atomic under the GIL
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    def drain() -> None:
        _in_worker.active = True
        try:
            with torch.inference_mode(inference), torch.set_grad_enabled(grad), intra_op_threads(1):
                for i in pending:
                    results[i] = fn(items[i])
        finally:
            _in_worker.active = False

    # The pool keeps the budget's size (a call with fewer items uses fewer of its threads):
    # rebuilt only when the budget changes, not per call.
    pool = _worker_pool(max(budget(), workers))
    futures = [pool.submit(drain) for _ in range(workers)]
    wait(futures)  # all of them, even after a failure: none may still write when this returns
    for done in futures:
        done.result()  # the first exception, if any
    return results
