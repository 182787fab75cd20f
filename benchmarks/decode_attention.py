"""One decode step's attention over 30 layers of KV (SmolLM2's shape: 9 query heads, 3 KV
heads, head size 64), PyTorch SDPA with ``enable_gqa`` against a grouped form: each KV head's
3 query rows in one ``bmm`` over its keys, softmax, one ``bmm`` over its values, so each key
and value is read once per KV head rather than once per query head; and the native kernel
LoopServe decodes with (``loopserve.attention.decode``), for one conversation and for a
batch of ``--batch`` conversations (one call per layer, against a loop of grouped calls).

With Phase 2's selection (``--budget`` keys a KV head, chosen as LoopServe chooses them:
max-pooled scores, sinks and recent tokens, here from random scores), the batch also runs
over an index view (the kernel reads the selected rows from the store, what LoopServe's
caches do) and over the same rows copied into compact buffers.

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

from loopserve.attention.decode import decode_attention, view_indices
from loopserve.cache.scoring import select_top
from loopserve.threads import configure as configure_threads

H, H_KV, D, LAYERS = 9, 3, 64, 30


def sdpa(q, k, v, scale):
    return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)


def grouped(q, k, v, scale):
    g = q.shape[1] // k.shape[1]
    scores = torch.bmm(q.view(k.shape[1], g, q.shape[-1]), k[0].transpose(1, 2)) * scale
    return torch.bmm(torch.softmax(scores, -1), v[0]).view(q.shape)


def native(q, k, v, scale):
    return decode_attention([q], [k], [v], scale)[0]


def view_of(n: int, budget: int, generated: int = 16) -> tuple[torch.Tensor, int]:
    """A Phase 2 selection of an n-token store whose last `generated` tokens are this turn's:
    (rows, tail) as a cache's index view holds it."""
    n_in = n - generated
    return select_top(torch.rand(H_KV, n_in) ** 8, budget, pool=7, head=4, tail=32), n_in


def copied(x: torch.Tensor, view: tuple[torch.Tensor, int]) -> torch.Tensor:
    idx = view_indices(*view, x.shape[2])
    return torch.stack([x[0, h].index_select(0, idx[h]) for h in range(H_KV)]).unsqueeze(0)


def measure(n: int, batch: int, budget: int, reps: int = 5) -> dict:
    cap = n + n // 2
    ks = [[torch.randn(1, H_KV, cap, D)[..., :n, :] for _ in range(batch)] for _ in range(LAYERS)]
    vs = [[torch.randn(1, H_KV, cap, D)[..., :n, :] for _ in range(batch)] for _ in range(LAYERS)]
    qs, scale = [torch.randn(1, H, 1, D) for _ in range(batch)], D**-0.5
    views = [[view_of(n, budget) for _ in range(batch)] for _ in range(LAYERS)]
    kc = [[copied(k, view) for k, view in zip(kl, vl)] for kl, vl in zip(ks, views)]
    vc = [[copied(v, view) for v, view in zip(vl_, vl)] for vl_, vl in zip(vs, views)]
    by_index = decode_attention(qs, ks[0], vs[0], scale, views[0])
    assert all(torch.equal(a, b) for a, b in zip(by_index, decode_attention(qs, kc[0], vc[0], scale)))
    q = qs[0]
    diff = max(float((sdpa(q, k[0], v[0], scale) - grouped(q, k[0], v[0], scale)).abs().max()) for k, v in zip(ks, vs))
    diff_native = max(float((native(q, k[0], v[0], scale) - grouped(q, k[0], v[0], scale)).abs().max()) for k, v in zip(ks, vs))
    single = {"sdpa": sdpa, "grouped": grouped, "native": native}
    times = {name: [] for name in [*single, "grouped_batch", "native_batch", "view_batch", "copied_view_batch"]}
    for _ in range(reps + 1):
        for name, fn in single.items():
            t = time.perf_counter()
            for k, v in zip(ks, vs):
                fn(q, k[0], v[0], scale)
            times[name].append((time.perf_counter() - t) * 1e3)
        t = time.perf_counter()
        for k, v in zip(ks, vs):
            for i in range(batch):
                grouped(qs[i], k[i], v[i], scale)
        times["grouped_batch"].append((time.perf_counter() - t) * 1e3)
        t = time.perf_counter()
        for k, v in zip(ks, vs):
            decode_attention(qs, k, v, scale)
        times["native_batch"].append((time.perf_counter() - t) * 1e3)
        t = time.perf_counter()
        for k, v, view in zip(ks, vs, views):
            decode_attention(qs, k, v, scale, view)
        times["view_batch"].append((time.perf_counter() - t) * 1e3)
        t = time.perf_counter()
        for k, v in zip(kc, vc):
            decode_attention(qs, k, v, scale)
        times["copied_view_batch"].append((time.perf_counter() - t) * 1e3)
    med = {name: sorted(ts[1:])[reps // 2] for name, ts in times.items()}  # first round: warm-up
    return {"tokens": n, "sdpa_ms": round(med["sdpa"], 2), "grouped_ms": round(med["grouped"], 2),
            "native_ms": round(med["native"], 2), "speedup": round(med["sdpa"] / med["grouped"], 2),
            "native_speedup_vs_grouped": round(med["grouped"] / med["native"], 2),
            "batch": batch, "grouped_batch_ms": round(med["grouped_batch"], 2),
            "native_batch_ms": round(med["native_batch"], 2),
            "native_batch_speedup": round(med["grouped_batch"] / med["native_batch"], 2),
            "view_keys": int(kc[0][0].shape[2]), "view_batch_ms": round(med["view_batch"], 2),
            "copied_view_batch_ms": round(med["copied_view_batch"], 2),
            "max_abs_diff": diff, "native_max_abs_diff": diff_native}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tokens", default="1024,2048,4096,8192")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--budget", type=int, default=1024, help="Phase 2's selected keys a KV head (the view rows)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    threads = configure_threads(args.threads)
    rows = [measure(int(n), args.batch, args.budget) for n in args.tokens.split(",")]
    if args.json:
        print(json.dumps({"benchmark": "decode-attention", "layers": LAYERS, "threads": threads, "rows": rows}, indent=2))
        return
    print("| KV tokens | SDPA, ms per token | grouped bmm | native | batch: grouped | batch: native "
          "| view keys | batch: index view | batch: copied view | max abs diff |\n"
          "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['tokens']} | {r['sdpa_ms']} | {r['grouped_ms']} | {r['native_ms']} | {r['grouped_batch_ms']} "
              f"| {r['native_batch_ms']} | {r['view_keys']} | {r['view_batch_ms']} | {r['copied_view_batch_ms']} "
              f"| {r['native_max_abs_diff']:.1e} |")


if __name__ == "__main__":
    main()
