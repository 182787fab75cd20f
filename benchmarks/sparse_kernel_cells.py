"""Cost per cell of the sparse prefill kernel, by kind of line: nanoseconds per (query head,
cell) on synthetic line patterns of one shape (SmolLM2's 9 query heads over 3 KV heads,
D = 64; 2,048 new rows onto 8,192 keys), median of ``--runs``.

- ``band``: the first 600 diagonals (a slash's keys for one row block are next to the
  previous offset's: they stay in cache);
- ``spread``: 600 diagonals spread over 6,000 offsets (every offset's keys are elsewhere in
  memory: how far the kernel is from bound by memory traffic shows here);
- ``verticals``: 1,500 columns spread over the keys plus the 64-diagonal local band (one key
  for all rows of a block: the cheapest cells);
- ``local``: the local band and 4 sink columns alone (68 lines: what is fixed per call,
  K/V copies and the output, shows here).

Inputs are random; the kernel's cost does not depend on the values. Run it on an idle
machine, with the thread count recorded (``--threads``, default 1).

    python benchmarks/sparse_kernel_cells.py --threads 1 --runs 7 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from loopserve.attention import LinePattern, sparse_prefill_attention
from loopserve.threads import configure as configure_threads

H, HKV, D = 9, 3, 64


def patterns(N: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(verticals, slashes) per pattern name, the same for every KV head."""
    return {
        "band": (torch.arange(4), torch.arange(600)),
        "spread": (torch.arange(4), torch.linspace(0, 6000, 600).long().unique()),
        "verticals": (torch.linspace(4, N - 2048, 1500).long().unique(), torch.arange(64)),
        "local": (torch.arange(4), torch.arange(64)),
    }


def cells(n: int, N: int, vertical: torch.Tensor, slash: torch.Tensor) -> int:
    """Causal cells of one head: each row's verticals and diagonals at or before it, a
    vertical/diagonal intersection counted once."""
    pos = torch.arange(N - n, N)
    on_slash = torch.zeros(N, dtype=torch.bool)
    on_slash[slash] = True
    slash_cells = int((slash[None, :] <= pos[:, None]).sum())
    offset = pos[:, None] - vertical[None, :]  # (n, V)
    vert_cells = int(((offset >= 0) & ~on_slash[offset.clamp(0, N - 1)]).sum())
    return slash_cells + vert_cells


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--new", type=int, default=2048, help="new rows")
    ap.add_argument("--keys", type=int, default=8192, help="keys (history + new rows)")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    threads = configure_threads(args.threads)
    n, N = args.new, args.keys
    torch.manual_seed(0)
    q, k, v = torch.randn(H, n, D), torch.randn(HKV, N, D), torch.randn(HKV, N, D)
    results = {}
    for name, (vertical, slash) in patterns(N).items():
        pattern = LinePattern.from_lines([vertical] * HKV, [slash] * HKV, n, N)
        sparse_prefill_attention(q, k, v, pattern)  # warm-up (and the kernel build)
        times = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            sparse_prefill_attention(q, k, v, pattern)
            times.append(time.perf_counter() - t0)
        ms = statistics.median(times) * 1e3
        head_cells = H * cells(n, N, vertical, slash)
        results[name] = {"ms": round(ms, 2), "ns_per_head_cell": round(ms * 1e6 / head_cells, 2),
                         "head_cells": head_cells}
    out = {"benchmark": "sparse-kernel-cells", "threads": threads, "new_rows": n, "keys": N, "heads": H,
           "kv_heads": HKV, "head_dim": D, "runs": args.runs, "torch": torch.__version__, "patterns": results}
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"| pattern ({n} rows onto {N} keys, {threads} thread(s)) | ms | ns per (query head, cell) |")
    print("|---|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['ms']} | {r['ns_per_head_cell']} |")


if __name__ == "__main__":
    main()
