"""Microbenchmark: LoopServe Phase 1 (line selection + sparse prefill) vs dense SDPA.

Dense baseline: ``F.scaled_dot_product_attention`` on GQA-repeated K/V in its fused
CPU flash kernel (4-D inputs), ``is_causal=True`` without history, an explicit offset
causal mask with history (:func:`loopserve.attention.dense_prefill_attention`).

Inputs are synthetic but attention-shaped (:func:`synthetic_qkv`), in two regimes:

* ``banded``: sink columns, ~2% heavy key columns (delimiters, entities) and a local
  band from the fastest RoPE frequencies. Lines past the forced band are mostly
  verticals plus scattered slashes.
* ``periodic``: the shared direction spans all RoPE frequencies, which gives long-range
  periodic slash clusters (dozens of offset runs), the hardest case for the kernel.

Timings interleave dense / select / sparse runs so that load from other processes hits
all three alike; the median and the minimum over runs are both printed. On a machine
shared with other jobs, compare ``--threads 1`` too: when the cores are busy, the dense
baseline stops gaining from a second thread and the 2-thread ratio understates.
``LOOPSERVE_NATIVE=0`` measures the pure-torch slash path (no C compiler).

Usage::

    python benchmarks/prefill_attention_kernel.py                       # n=N=8192 and n=2048, N=8192
    python benchmarks/prefill_attention_kernel.py --n 8192 --regime banded --repeat 7
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from loopserve.attention import (
    attention_recall,
    dense_prefill_attention,
    pattern_density,
    select_lines,
    sparse_prefill_attention,
)
from loopserve.cli_options import thread_count
from loopserve.native import native_kernels
from loopserve.threads import configure as configure_threads

REGIMES = {
    "banded": dict(local=12.0, heavy_frac=0.02, heavy=8.0, sink=10.0, noise=0.3, local_pairs=8),
    "periodic": dict(local=12.0, heavy_frac=0.01, heavy=6.0, sink=10.0, noise=0.3, local_pairs=None),
}


def rope(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary embedding (half-split convention, as in Llama)."""
    D = x.shape[-1]
    inv = base ** (-torch.arange(0, D, 2, dtype=torch.float32) / D)
    ang = positions[:, None].float() * inv[None, :]
    cos, sin = ang.cos().repeat(1, 2), ang.sin().repeat(1, 2)
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def synthetic_qkv(
    H: int = 9,
    Hkv: int = 3,
    n: int = 8192,
    N: int = 8192,
    D: int = 64,
    *,
    seed: int = 0,
    local: float = 3.0,
    heavy_frac: float = 0.01,
    heavy: float = 2.5,
    sink: float = 5.0,
    noise: float = 1.0,
    local_pairs: int | None = None,
    dtype: torch.dtype = torch.float32,
):
    """q (H, n, D), k/v (Hkv, N, D) whose attention has sinks, heavy columns and diagonals.

    A per-KV-head direction added to q and k before RoPE makes the score depend on the
    offset (diagonals); ``local_pairs`` keeps it in the fastest-rotating pairs only (a
    local band) instead of all pairs (long-range periodic slashes). Heavy keys share a
    content direction every query looks at (vertical lines). ``noise`` is the content
    part that spreads the rest of the mass.
    """
    g = torch.Generator().manual_seed(seed)
    G = H // Hkv
    shared = torch.randn(Hkv, 1, D, generator=g)
    if local_pairs is not None:
        keep = torch.zeros(D, dtype=torch.bool)
        keep[:local_pairs] = True
        keep[D // 2 : D // 2 + local_pairs] = True
        shared = shared * keep
    shared = shared / shared.norm(dim=-1, keepdim=True) * local**0.5 * D**0.25
    k = rope(torch.randn(Hkv, N, D, generator=g) * noise + shared, torch.arange(N))
    u = torch.randn(Hkv, 1, D, generator=g)
    u = u / u.norm(dim=-1, keepdim=True) * D**0.25
    strength = torch.zeros(N)
    heavy_keys = torch.randperm(N, generator=g)[: int(heavy_frac * N)]
    strength[heavy_keys] = heavy * torch.rand(len(heavy_keys), generator=g)
    strength[:4] = sink
    k = k + strength[None, :, None] * u
    q = torch.randn(Hkv, G, n, D, generator=g) * noise
    q = rope(q + shared[:, None], torch.arange(N - n, N)) + u[:, None]
    v = torch.randn(Hkv, N, D, generator=g)
    return q.reshape(H, n, D).to(dtype), k.to(dtype), v.to(dtype)


def run(n: int, N: int, regime: str, alpha: float, repeat: int, threads: int, dtype: torch.dtype) -> dict:
    configure_threads(threads)
    q, k, v = synthetic_qkv(n=n, N=N, dtype=dtype, **REGIMES[regime])
    fns = {
        "dense": lambda: dense_prefill_attention(q, k, v),
        "select": lambda: select_lines(q, k, alpha=alpha),
    }
    pattern = fns["select"]()
    fns["sparse"] = lambda: sparse_prefill_attention(q, k, v, pattern)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for name, fn in fns.items():  # warm-up (allocator, thread pool)
        fn()
    for _ in range(repeat):  # interleaved
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    ref, out = fns["dense"](), fns["sparse"]()
    probe = set(pattern.probe_idx.tolist())
    held_out = torch.tensor([r for r in range(0, n, max(1, n // 96)) if r not in probe])
    med = {name: statistics.median(t) for name, t in times.items()}
    low = {name: min(t) for name, t in times.items()}
    return {
        "n": n,
        "N": N,
        "regime": regime,
        "median": med,
        "min": low,
        "speedup_median": med["dense"] / (med["select"] + med["sparse"]),
        "speedup_min": low["dense"] / (low["select"] + low["sparse"]),
        "density": pattern_density(pattern),
        "probe_mass": pattern.probe_mass.mean().item(),
        "recall_heldout": attention_recall(q, k, pattern, held_out),
        "lines_v": [len(x) for x in pattern.vertical],
        "lines_s": [len(x) for x in pattern.slash],
        "rounds": pattern.meta["rounds"],
        "rel_err_vs_dense": ((out.float() - ref.float()).norm() / ref.float().norm()).item(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="*", default=None, help="new rows (default: N and N/4)")
    ap.add_argument("--N", type=int, default=8192, help="total keys")
    ap.add_argument("--regime", nargs="*", default=list(REGIMES), choices=list(REGIMES))
    ap.add_argument("--alpha", type=float, default=0.9)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=thread_count, default=2)
    ap.add_argument("--bf16", action="store_true")
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    print(f"native slash kernel: {'yes' if native_kernels() is not None else 'no (pure torch)'}", flush=True)
    for regime in args.regime:
        for n in args.n or [args.N, args.N // 4]:
            r = run(n, args.N, regime, args.alpha, args.repeat, args.threads, dtype)
            md, mn = r["median"], r["min"]
            print(
                f"[{regime}] n={n} N={args.N} alpha={args.alpha} threads={args.threads}: "
                f"dense {md['dense']:.0f} ms | select {md['select']:.0f} ms + sparse {md['sparse']:.0f} ms "
                f"| speedup {r['speedup_median']:.2f}x (median), {r['speedup_min']:.2f}x (min: "
                f"{mn['dense']:.0f} / {mn['select']:.0f} + {mn['sparse']:.0f}) | density {r['density']:.3f} "
                f"| probe mass {r['probe_mass']:.3f} | held-out recall {r['recall_heldout']:.3f} "
                f"| rel err vs dense {r['rel_err_vs_dense']:.3f} | lines v={r['lines_v']} s={r['lines_s']} "
                f"| greedy rounds {r['rounds']}",
                flush=True,
            )


if __name__ == "__main__":
    main()
