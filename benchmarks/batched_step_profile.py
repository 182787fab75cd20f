"""Where one batched decode step's time goes (issue 13): N conversations of ~`--context`
tokens decoding together through the Scheduler, one forward per step.

A dense history of ~`--context` tokens of essay text is prefilled once and forked N times;
each fork's last 32 prompt tokens are prefilled through the scheduler, and then every step
carries one decode token of each conversation. Reports the median and mean step time over
32 steps (no profiler), the same for one conversation alone, and, from 6 profiled steps, their mean
wall time split into the time inside torch ops (the profiler's self CPU time) and the rest:
the native kernels (decode attention, the linear layers' few rows: ctypes calls the
profiler does not see) and Python.

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


def step_times(engine, base, ids, method: str, n: int, steps: int = 32, profiled: int = 6) -> dict:
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
    # The mean counts Phase 2's re-selection steps (every n_d tokens), which the median skips.
    out = {"sessions": n, "step_ms": round(sorted(times)[len(times) // 2], 1), "mean_step_ms": round(sum(times) / len(times), 1)}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        for _ in range(profiled):
            sched.step()
        wall_ms = (time.perf_counter() - t) * 1e3 / profiled
    torch_ms = sum(e.self_cpu_time_total for e in prof.key_averages()) / profiled / 1e3
    out |= {"profiled_step_ms": round(wall_ms, 1), "torch_ops_ms": round(torch_ms, 1),
            "native_and_python_ms": round(wall_ms - torch_ms, 1)}
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
              "step_ratio": round(rows[0]["step_ms"] / rows[1]["step_ms"], 2),
              # tokens per second batched over alone, from the mean steps: the decode-only speed-up
              "decode_speedup": round(rows[0]["sessions"] * rows[1]["mean_step_ms"] / rows[0]["mean_step_ms"], 2)}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print("| sessions | step ms (median) | mean | profiled step | torch ops | native kernels and Python |\n"
          "|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['sessions']} | {r['step_ms']} | {r['mean_step_ms']} | {r['profiled_step_ms']} | {r['torch_ops_ms']} "
              f"| {r['native_and_python_ms']} |")


if __name__ == "__main__":
    main()
