"""Microbenchmark: LoopServe Phase 1 (line selection + sparse prefill) vs dense SDPA.

Synthetic but attention-shaped inputs (see :func:`synthetic_qkv`): RoPE-rotated
queries/keys sharing a per-head direction give local diagonals whose strength decays
with the offset; a few "heavy" keys (sinks, delimiters) give vertical lines; the rest is
content noise. Dense baseline: ``F.scaled_dot_product_attention`` on GQA-repeated K/V,
``is_causal=True`` without history, an explicit offset causal mask with history.

Usage::

    python benchmarks/prefill_attention_kernel.py                 # n=N=8192 and n=2048,N=8192
    python benchmarks/prefill_attention_kernel.py --n 8192 --N 8192 --alpha 0.9 --repeat 5
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
    """q (H, n, D), k/v (Hkv, N, D) whose attention has sinks, heavy columns and local diagonals."""
    g = torch.Generator().manual_seed(seed)
    G = H // Hkv
    pos_k = torch.arange(N)
    pos_q = torch.arange(N - n, N)
    shared = torch.randn(Hkv, 1, D, generator=g)  # per-head direction -> offset-dependent score
    if local_pairs is not None:
        # Only the fastest-rotating RoPE pairs: the score decays quickly with the offset
        # (a local band) instead of producing long-range periodic slashes.
        keep = torch.zeros(D, dtype=torch.bool)
        keep[:local_pairs] = True
        keep[D // 2 : D // 2 + local_pairs] = True
        shared = shared * keep
    shared = shared / shared.norm(dim=-1, keepdim=True) * local**0.5 * D**0.25
    k = torch.randn(Hkv, N, D, generator=g) * noise + shared
    k = rope(k, pos_k)
    # Heavy keys: a content direction all queries look at (sinks, punctuation, ...).
    u = torch.randn(Hkv, 1, D, generator=g)
    u = u / u.norm(dim=-1, keepdim=True) * D**0.25
    heavy_keys = torch.randperm(N, generator=g)[: int(heavy_frac * N)]
    strength = torch.zeros(N)
    strength[heavy_keys] = heavy * torch.rand(len(heavy_keys), generator=g)
    strength[:4] = sink
    k = k + strength[None, :, None] * u
    q = torch.randn(Hkv, G, n, D, generator=g) * noise
    q = rope(q + shared[:, None], pos_q) + u[:, None]
    v = torch.randn(Hkv, N, D, generator=g)
    return q.reshape(H, n, D).to(dtype), k.to(dtype), v.to(dtype)


def timed(fn, repeat: int):
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, out


def run(n: int, N: int, alpha: float, repeat: int, threads: int, dtype: torch.dtype, **synth) -> dict:
    torch.set_num_threads(threads)
    q, k, v = synthetic_qkv(n=n, N=N, dtype=dtype, **synth)
    dense_ms, ref = timed(lambda: dense_prefill_attention(q, k, v), repeat)
    select_ms, pattern = timed(lambda: select_lines(q, k, alpha=alpha), repeat)
    sparse_ms, out = timed(lambda: sparse_prefill_attention(q, k, v, pattern), repeat)
    held_out = torch.tensor(sorted(set(range(0, n, max(1, n // 64))) - set(pattern.probe_idx.tolist())))
    result = {
        "n": n,
        "N": N,
        "alpha": alpha,
        "dense_ms": dense_ms,
        "select_ms": select_ms,
        "sparse_ms": sparse_ms,
        "speedup": dense_ms / (select_ms + sparse_ms),
        "density": pattern_density(pattern),
        "probe_mass": pattern.probe_mass.mean().item(),
        "recall_heldout": attention_recall(q, k, pattern, held_out),
        "lines_v": [len(x) for x in pattern.vertical],
        "lines_s": [len(x) for x in pattern.slash],
        "rounds": pattern.meta["rounds"],
        "rel_err": ((out.float() - ref.float()).norm() / ref.float().norm()).item(),
    }
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="*", default=None, help="new rows (default: 8192 and 2048)")
    ap.add_argument("--N", type=int, default=8192, help="total keys")
    ap.add_argument("--alpha", type=float, default=0.9)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bf16", action="store_true")
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    for n in args.n or [args.N, args.N // 4]:
        r = run(n, args.N, args.alpha, args.repeat, args.threads, dtype)
        print(
            f"n={r['n']} N={r['N']} alpha={r['alpha']}: dense {r['dense_ms']:.1f} ms | "
            f"select {r['select_ms']:.1f} ms + sparse {r['sparse_ms']:.1f} ms | "
            f"speedup {r['speedup']:.2f}x | density {r['density']:.3f} | "
            f"probe mass {r['probe_mass']:.3f} | held-out recall {r['recall_heldout']:.3f} | "
            f"rel err {r['rel_err']:.3f} | lines v={r['lines_v']} s={r['lines_s']} | rounds {r['rounds']}"
        )


if __name__ == "__main__":
    main()
