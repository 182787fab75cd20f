"""The process's thread budget: validation, what configure() applies, the default."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import torch

from loopserve import threads
from loopserve.attention import LinePattern, sparse_prefill_attention
from loopserve.attention import sparse as sparse_module

ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS", "TOKENIZERS_PARALLELISM")


@pytest.fixture
def restore_budget(monkeypatch):
    """The environment configure() writes is restored after the test (conftest restores the budget)."""
    for var in ENV:  # registers the current values with monkeypatch, which restores them
        if var in os.environ:
            monkeypatch.setenv(var, os.environ[var])
        else:
            monkeypatch.delenv(var, raising=False)


def test_configure_applies_one_budget_everywhere(restore_budget, monkeypatch):
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    assert threads.configure(3) == 3
    assert torch.get_num_threads() == 3 and threads.budget() == 3
    assert os.environ["OMP_NUM_THREADS"] == os.environ["MKL_NUM_THREADS"] == os.environ["RAYON_NUM_THREADS"] == "3"
    assert threads.configure("1") == 1  # the CLI's text form
    assert torch.get_num_threads() == 1 and os.environ["TOKENIZERS_PARALLELISM"] == "false"


def test_bad_thread_counts_are_rejected_and_change_nothing(restore_budget):
    assert threads.check_threads(np.int64(3)) == 3 and threads.check_threads(" 4 ") == 4
    threads.configure(2)
    for bad in (0, -1, "0", "-3", "two", "1.5", 1.5, True, None, ""):
        with pytest.raises(ValueError, match="threads must be"):
            threads.check_threads(bad)
        if bad is not None:
            with pytest.raises(ValueError, match="threads must be"):
                threads.configure(bad)
    assert torch.get_num_threads() == 2 and threads.budget() == 2 and os.environ["OMP_NUM_THREADS"] == "2"


def test_default_is_the_physical_cores(restore_budget):
    assert threads.configure() == threads.physical_cores() == torch.get_num_threads()
    assert 1 <= threads.physical_cores() <= (os.cpu_count() or 1)


@pytest.mark.parametrize("cpus,cores,usable,expected", [
    (8, 4, 8, 4),  # SMT machine, all CPUs usable: the cores
    (8, 4, 2, 1),  # restricted to one core's two siblings
    (4, 4, 3, 3),  # no SMT, restricted to 3 CPUs
    (4, None, 3, 3),  # psutil cannot tell: the usable logical CPUs
])
def test_physical_cores_follow_the_cpus_this_process_may_use(monkeypatch, cpus, cores, usable, expected):
    monkeypatch.setattr(threads.psutil, "cpu_count", lambda logical=True: cpus if logical else cores)
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(usable)), raising=False)
    assert threads.physical_cores() == expected


def test_intra_op_threads_scope_restores_the_count(restore_budget):
    threads.configure(2)
    with threads.intra_op_threads(1):
        assert torch.get_num_threads() == 1
        assert threads.budget() == 2  # the budget the native kernels use is unchanged
    assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError):
        with threads.intra_op_threads(1):
            raise RuntimeError("boom")
    assert torch.get_num_threads() == 2


@pytest.mark.skipif("OpenMP" not in torch.__config__.parallel_info(), reason="per-thread counts are OpenMP's")
def test_intra_op_scope_leaves_other_running_threads_alone(restore_budget):
    """The single-thread scope of one thread (a server's model thread) does not narrow
    the torch threads of another thread that already uses torch. (A thread whose first
    torch use falls inside the scope starts with the narrowed count: see threads.py.)"""
    threads.configure(2)
    running, inside, seen = threading.Event(), threading.Event(), {}

    def other() -> None:
        seen["before"] = torch.get_num_threads()  # torch's per-thread setup (any parallel op does it)
        running.set()
        inside.wait()
        seen["count"] = torch.get_num_threads()

    t = threading.Thread(target=other)
    t.start()
    running.wait()
    with threads.intra_op_threads(1):
        inside.set()
        t.join()
    assert seen == {"before": 2, "count": 2}


@pytest.mark.skipif(not sparse_module._native_usable(64, 2), reason="no C compiler for the native kernel")
def test_native_kernel_workers_come_from_the_budget_not_the_scoped_count(restore_budget, monkeypatch):
    """sparse_prefill_attention runs its bookkeeping on one torch thread; the native
    kernel's row ranges still spread over the whole budget."""
    sizes = []
    real = threads._worker_pool
    monkeypatch.setattr(threads, "_worker_pool", lambda size: sizes.append(size) or real(size))
    n = N = 256
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, n, 64, generator=g), torch.randn(1, N, 64, generator=g), torch.randn(1, N, 64, generator=g)
    pattern = LinePattern.from_lines([[0, 1, 100]], [[0, 1, 2, 50]], n, N)
    threads.configure(2)
    with threads.intra_op_threads(1):  # as inside select_lines / a caller's own scope
        out = sparse_prefill_attention(q, k, v, pattern, native=True)
    assert sizes and set(sizes) == {2}
    torch.testing.assert_close(out, sparse_prefill_attention(q, k, v, pattern, native=False), rtol=1e-5, atol=1e-5)


def test_engine_takes_threads(restore_budget, tiny_models):
    from loopserve.engine import Engine

    Engine(tiny_models["tiny-llama"], threads=3)
    assert torch.get_num_threads() == 3 and threads.budget() == 3
    Engine(tiny_models["tiny-llama"])  # None keeps the configured budget
    assert threads.budget() == 3
    with pytest.raises(ValueError, match="threads must be at least 1, got 0"):
        Engine(tiny_models["tiny-llama"], threads=0)
    assert threads.budget() == 3


def test_parallel_map_keeps_order_mode_and_errors(restore_budget):
    """Results in the items' order, computed on the pool's threads with one intra-op thread
    each and the caller's inference mode (an in-place write to an inference tensor from a
    worker would fail without it); an item's exception reaches the caller."""
    threads.configure(2)
    names, counts = set(), set()

    def square(x):
        names.add(threading.current_thread().name)
        counts.add(torch.get_num_threads())
        return x * x

    assert threads.parallel_map(square, list(range(20))) == [x * x for x in range(20)]
    assert any(name.startswith("loopserve-compute") for name in names) and counts == {1}
    with torch.inference_mode():
        out = torch.zeros(4)
        threads.parallel_map(lambda i: out[i : i + 1].fill_(i), range(4))
    assert out.tolist() == [0, 1, 2, 3]

    def boom(x):
        if x == 3:
            raise ValueError("item 3")
        return x

    with pytest.raises(ValueError, match="item 3"):
        threads.parallel_map(boom, range(6))
    assert threads.parallel_map(square, [3], workers=4) == [9]  # one item: in the caller's thread
    # an item that maps again runs its items itself (the pool could be all busy waiting)
    nested = threads.parallel_map(lambda x: sum(threads.parallel_map(square, range(x))), list(range(8)))
    assert nested == [sum(i * i for i in range(x)) for x in range(8)]
