"""One decode step's attention over 30 layers of KV (SmolLM2's shape: 9 query heads, 3 KV
heads, head size 64), PyTorch SDPA with ``enable_gqa`` against a grouped form: each KV head's
3 query rows in one ``bmm`` over its keys, softmax, one ``bmm`` over its values, so each key
and value is read once per KV head rather than once per query head.

Each layer has its own K/V in a capacity buffer sliced to the length, as the session cache
holds them, so the 30 layers' KV (94 MB at 2k tokens, 377 MB at 8k, fp32) comes from memory
as in a real step, not from the cache of a repeated call. Median of 5 repetitions of the 30
layers, after one warm-up; both forms in the same process, alternated.

    python benchmarks/decode_attention.py --threads 2 --json > out.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from loopserve.threads import configure as configure_threads

H, H_KV, D, LAYERS = 9, 3, 64, 30


def sdpa(q, k, v, scale):
    return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)


def grouped(q, k, v, scale):
    g = q.shape[1] // k.shape[1]
    scores = torch.bmm(q.view(k.shape[1], g, q.shape[-1]), k[0].transpose(1, 2)) * scale
    return torch.bmm(torch.softmax(scores, -1), v[0]).view(q.shape)


def measure(n: int, reps: int = 5) -> dict:
    cap = n + n // 2
    ks = [torch.randn(1, H_KV, cap, D)[..., :n, :] for _ in range(LAYERS)]
    vs = [torch.randn(1, H_KV, cap, D)[..., :n, :] for _ in range(LAYERS)]
    q, scale = torch.randn(1, H, 1, D), D**-0.5
    diff = max(float((sdpa(q, k, v, scale) - grouped(q, k, v, scale)).abs().max()) for k, v in zip(ks, vs))
    times = {"sdpa": [], "grouped": []}
    for _ in range(reps + 1):
        for name, fn in (("sdpa", sdpa), ("grouped", grouped)):
            t = time.perf_counter()
            for k, v in zip(ks, vs):
                fn(q, k, v, scale)
            times[name].append((time.perf_counter() - t) * 1e3)
    med = {name: sorted(ts[1:])[reps // 2] for name, ts in times.items()}  # first round: warm-up
    return {"tokens": n, "sdpa_ms": round(med["sdpa"], 2), "grouped_ms": round(med["grouped"], 2),
            "speedup": round(med["sdpa"] / med["grouped"], 2), "max_abs_diff": diff}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tokens", default="1024,2048,4096,8192")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    threads = configure_threads(args.threads)
    rows = [measure(int(n)) for n in args.tokens.split(",")]
    if args.json:
        print(json.dumps({"benchmark": "decode-attention", "layers": LAYERS, "threads": threads, "rows": rows}, indent=2))
        return
    print("| KV tokens | SDPA, ms per token | grouped bmm | speed-up | max abs diff |\n|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['tokens']} | {r['sdpa_ms']} | {r['grouped_ms']} | {r['speedup']}x | {r['max_abs_diff']:.1e} |")


if __name__ == "__main__":
    main()
