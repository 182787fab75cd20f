"""Phase 2's re-selection, per layer: the 16 buffered queries of SmolLM2's 9 query heads score
every input key of its 3 KV heads (softmax per row, summed: ``attention_scores``), and each KV
head keeps the top 1,024 by max-pooled score plus 4 sinks and the last 32 input tokens
(``select_top``). Native kernels (``native/key_scores.c``) against the torch path
(``LOOPSERVE_NATIVE=0``), alternated in one process.

Each of the 30 layers has its own keys in a capacity buffer sliced to the input, as the
session cache holds them, so the keys come from memory as in a real re-selection. Median of
5 repetitions of the 30 layers, after one warm-up.

    python benchmarks/reselection.py --threads 2 --json > out.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from loopserve.cache.scoring import attention_scores, select_top
from loopserve.native import NATIVE_ENV, native_kernels, reset_native_kernels
from loopserve.threads import configure as configure_threads

H, H_KV, D, LAYERS, ROWS = 9, 3, 64, 30, 16
BUDGET, POOL, SINKS, RECENT = 1024, 7, 4, 32


def use_native(on: bool) -> None:
    """Switch the process between the native kernels and the torch paths (public switch)."""
    if on:
        os.environ.pop(NATIVE_ENV, None)
    else:
        os.environ[NATIVE_ENV] = "0"
    reset_native_kernels()
    if (native_kernels() is not None) != on:
        raise SystemExit("the native kernels are not available here (no C compiler?)")


def reselect(queries: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scores = attention_scores(queries, keys, D**-0.5)
    return scores, select_top(scores, BUDGET, pool=POOL, head=SINKS, tail=RECENT)


def measure(n: int, reps: int = 5) -> dict:
    keys = [torch.randn(1, H_KV, n + n // 2, D)[..., :n, :] for _ in range(LAYERS)]
    queries = [torch.randn(1, H, ROWS, D) for _ in range(LAYERS)]
    times = {"native": [], "torch": []}
    kept = {}
    for _ in range(reps + 1):
        for path in times:
            use_native(path == "native")
            t = time.perf_counter()
            for q, k in zip(queries, keys):
                reselect(q, k)
            times[path].append((time.perf_counter() - t) * 1e3 / LAYERS)
            kept[path] = reselect(queries[0], keys[0])
    med = {path: sorted(ts[1:])[reps // 2] for path, ts in times.items()}  # first round: warm-up
    (s_native, i_native), (s_torch, i_torch) = kept["native"], kept["torch"]
    common = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(i_native, i_torch))
    return {"keys": n, "native_ms_per_layer": round(med["native"], 3), "torch_ms_per_layer": round(med["torch"], 3),
            "speedup": round(med["torch"] / med["native"], 2),
            "max_abs_score_diff": float((s_native - s_torch).abs().max()),
            # the two paths' scores differ in the last bits, so a near-tie may keep another row
            "rows_in_common": round(common / i_torch.numel(), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--keys", default="2048,8192")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    threads = configure_threads(args.threads)
    rows = [measure(int(n)) for n in args.keys.split(",")]
    use_native(True)
    if args.json:
        print(json.dumps({"benchmark": "reselection", "layers": LAYERS, "rows_scored": ROWS * H // H_KV,
                          "threads": threads, "rows": rows}, indent=2))
        return
    print("| input keys | native, ms a layer | torch | speed-up | max abs score diff | kept rows in common |\n"
          "|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['keys']} | {r['native_ms_per_layer']} | {r['torch_ms_per_layer']} | {r['speedup']}x "
              f"| {r['max_abs_score_diff']:.1e} | {r['rows_in_common']} |")


if __name__ == "__main__":
    main()
