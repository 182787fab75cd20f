"""Where one batched decode step's time goes (issue 13): N conversations of ~`--context`
tokens decoding together through the Scheduler, one forward per step.

A dense history of ~`--context` tokens of essay text is prefilled once and forked N times;
each fork's last 32 prompt tokens are prefilled through the scheduler, and then every step
carries one decode token of each conversation. Reports the median and mean step time over
56 steps (no profiler), and for a method that re-selects (LoopServe's Phase 2) the median of
each kind of step: before the first re-selection (LoopServe's dense first interval), steps
that re-select, and steps over the selected views; the same for one conversation alone; and,
from 6 profiled steps, their mean
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


def median(xs: list[float]) -> float | None:
    return round(sorted(xs)[len(xs) // 2], 1) if xs else None


def reselections(sessions) -> int:
    """Re-selections made so far by the sessions' decode methods (0 for those that make none)."""
    return sum(getattr(s.method.decode, "reselections", 0) for s in sessions)


def step_times(engine, base, ids, method: str, n: int, steps: int = 56, profiled: int = 6) -> dict:
    sched = Scheduler(engine, chunk_tokens=1 << 20, max_running=n)
    sessions = [base.fork(method=method) for _ in range(n)]
    for session in sessions:
        sched.submit(session, list(ids), SamplingParams(max_new_tokens=1 + steps + profiled + 2, ignore_eos=True))
    sched.step()  # the prompts' last tokens and the first token: from here every sequence decodes
    times, kinds = [], []
    for _ in range(steps):
        before = reselections(sessions)
        t = time.perf_counter()
        sched.step()
        times.append((time.perf_counter() - t) * 1e3)
        after = reselections(sessions)
        kinds.append("reselect" if after > before else "view" if after else "before")
    # The mean counts Phase 2's re-selection steps (every n_d tokens), which the median skips.
    out = {"sessions": n, "step_ms": median(times), "mean_step_ms": round(sum(times) / len(times), 1),
           "phase_median_ms": {kind: median([t for t, k in zip(times, kinds) if k == kind]) for kind in ("before", "reselect", "view")},
           "phase_steps": {kind: kinds.count(kind) for kind in ("before", "reselect", "view")},
           "step_times_ms": [round(t, 2) for t in times]}  # step i generates token i + 2 of each conversation
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
    print("| sessions | step ms (median) | mean | before the first re-selection | re-selecting | over the views "
          "| profiled step | torch ops | native kernels and Python |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        p = r["phase_median_ms"]
        print(f"| {r['sessions']} | {r['step_ms']} | {r['mean_step_ms']} | {p['before']} | {p['reselect']} | {p['view']} "
              f"| {r['profiled_step_ms']} | {r['torch_ops_ms']} | {r['native_and_python_ms']} |")


if __name__ == "__main__":
    main()
