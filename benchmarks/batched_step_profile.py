"""Where one batched decode step's time goes (issue 13): N conversations of ~`--context`
tokens decoding together through the Scheduler, one forward per step.

A dense history of ~`--context` tokens of essay text is prefilled once and forked N times;
each fork's last 32 prompt tokens are prefilled through the scheduler, and then every step
carries one decode token of each conversation. Reports the median step time over 12 steps
(no profiler), the same for one conversation alone, and, from 6 profiled steps, the time per
step inside SDPA (attention, one call per conversation and layer), inside `mm` (the linear
layers: the weights, read once for the whole batch) and everything else.

    python benchmarks/batched_step_profile.py --sessions 8 --context 2000 --threads 2 --method dense --json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile

from loopserve.bench.decode import long_prompt
from loopserve.engine import Engine, SamplingParams, Scheduler
from loopserve.models import load_model


def step_times(engine, base, ids, method: str, n: int, steps: int = 12, profiled: int = 6) -> dict:
    sched = Scheduler(engine, chunk_tokens=1 << 20, max_running=n)
    for _ in range(n):
        sched.submit(base.fork(method=method), list(ids),
                     SamplingParams(max_new_tokens=3 + steps + profiled + 2, ignore_eos=True))
    for _ in range(3):  # the prompts' last tokens, then every sequence is decoding
        sched.step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        sched.step()
        times.append((time.perf_counter() - t) * 1e3)
    out = {"sessions": n, "step_ms": round(sorted(times)[len(times) // 2], 1)}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(profiled):
            sched.step()
    self_us = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    total = sum(self_us.values())
    sdpa = sum(v for k, v in self_us.items() if "scaled_dot_product" in k)
    mm = self_us.get("aten::mm", 0.0)
    out |= {"profiled_step_ms": round(total / profiled / 1e3, 1), "sdpa_ms": round(sdpa / profiled / 1e3, 1),
            "mm_ms": round(mm / profiled / 1e3, 1), "other_ops_ms": round((total - sdpa - mm) / profiled / 1e3, 1)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--context", type=int, default=2000)
    ap.add_argument("--method", default="dense")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    engine = Engine(load_model("smollm2"), method="dense", threads=args.threads)
    ids = long_prompt(engine, args.context)
    base = engine.new_session(method="dense")
    base.prefill(ids[:-32])
    rows = [step_times(engine, base, ids, args.method, n) for n in (args.sessions, 1)]
    result = {"benchmark": "batched-step-profile", "method": args.method, "context_tokens": len(ids),
              "threads": torch.get_num_threads(), "batched": rows[0], "alone": rows[1],
              "step_ratio": round(rows[0]["step_ms"] / rows[1]["step_ms"], 2)}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print("| sessions | step ms | profiled step | SDPA | mm (weights) | other |\n|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['sessions']} | {r['step_ms']} | {r['profiled_step_ms']} | {r['sdpa_ms']} | {r['mm_ms']} | {r['other_ops_ms']} |")


if __name__ == "__main__":
    main()
