"""The linear layers of one decode step for 1-16 rows (one per conversation in the batch):
``F.linear`` (MKL sgemm) against ``NativeLinear`` (loopserve/native/skinny_linear.c).

The 211 weight matrices of SmolLM2-135M (30 layers of q, k, v, o, gate, up, down, plus the
tied 49152 x 576 output head), each its own tensor, so the 540 MB of fp32 weights come from
memory as in a real step. Median of 5 passes over all of them after a warm-up; both forms
in the same process, alternated.

    python benchmarks/skinny_linear.py --threads 2 --json > out.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import nn

from loopserve.models.native_linear import MAX_ROWS, NativeLinear
from loopserve.threads import configure as configure_threads

HIDDEN, INTER, KV, LAYERS, VOCAB = 576, 1536, 192, 30, 49152
SHAPES = [(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN), (INTER, HIDDEN), (INTER, HIDDEN), (HIDDEN, INTER)]


def measure(layers: list[NativeLinear], rows: int, reps: int = 5) -> dict:
    xs = {n: torch.randn(rows, n) for n in (HIDDEN, INTER)}
    forms = {"sgemm": lambda lin, x: F.linear(x, lin.weight), "native": lambda lin, x: lin(x)}
    times = {name: [] for name in forms}
    with torch.inference_mode():
        for _ in range(reps + 1):
            for name, fn in forms.items():
                t = time.perf_counter()
                for lin in layers:
                    fn(lin, xs[lin.in_features])
                times[name].append((time.perf_counter() - t) * 1e3)
    med = {name: sorted(ts[1:])[reps // 2] for name, ts in times.items()}  # first round: warm-up
    return {"rows": rows, "sgemm_ms": round(med["sgemm"], 2), "native_ms": round(med["native"], 2),
            "speedup": round(med["sgemm"] / med["native"], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rows", default=f"1,2,4,8,{MAX_ROWS}")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    threads = configure_threads(args.threads)
    layers = [NativeLinear(nn.Linear(i, o, bias=False)) for _ in range(LAYERS) for o, i in SHAPES]
    layers.append(NativeLinear(nn.Linear(HIDDEN, VOCAB, bias=False)))
    rows = [measure(layers, int(n)) for n in args.rows.split(",")]
    if args.json:
        print(json.dumps({"benchmark": "skinny-linear", "matrices": len(layers), "threads": threads, "rows": rows}, indent=2))
        return
    print("| rows | sgemm, ms per step | native | speed-up |\n|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['rows']} | {r['sgemm_ms']} | {r['native_ms']} | {r['speedup']}x |")


if __name__ == "__main__":
    main()
