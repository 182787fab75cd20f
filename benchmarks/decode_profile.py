"""Where a decode step's time goes at long context (issue 17): weights, attention, Phase 2
re-selection, everything else, and Python between the ops.

The same set-up as `loopserve bench decode`: a ~`--context`-token prompt minus its last
32 tokens is prefilled densely once; each run forks that session, prefills the last 32
tokens (the new turn) and decodes `--tokens` tokens greedily. For dense and for LoopServe
Phase 2 (`dense+loopserve`, budget B, re-selection every n_d tokens):

- TPOT without the profiler (median of `--runs`);
- one profiled run (torch.profiler, Python stacks): each aten op's own time is charged to
  the innermost calling frame that names a category: `cache/loopserve.py` (Phase 2 scoring and
  re-selection), `view_attention.py` / `attention/` / `sdpa` (attention), `nn/modules/linear.py`
  (linear layers: the weights), else "other ops" (norms, RoPE, embedding, sampling);
  "Python and dispatch" is the profiled decode time not spent inside any op.

    python benchmarks/decode_profile.py --context 8000 --threads 2 --out runs/decode-profile.json

Prints a markdown table; the JSON holds the shares and the slowest ops of each category.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from loopserve.bench.decode import long_prompt
from loopserve.engine import Engine, SamplingParams
from loopserve.models import load_model

CATEGORIES = (
    ("phase2 selection", ("cache/loopserve.py", "cache/scoring.py")),
    ("attention", ("view_attention.py", "attention/", "sdpa_attention", "scaled_dot_product")),
    ("linear (weights)", ("nn/modules/linear.py",)),
)


def categorize(frames: list[str]) -> str:
    for frame in frames:  # innermost first: the nearest of our frames decides
        for name, marks in CATEGORIES:
            if any(m in frame for m in marks):
                return name
    return "other ops"


def decode_once(base, prompt: list[int], method: str, knobs: dict, tokens: int) -> float:
    s = base.fork(method=method, knobs=knobs)
    stream = s.stream_ids(prompt, SamplingParams(max_new_tokens=tokens, ignore_eos=True))
    for _ in stream:
        pass
    return stream.result.stats.tpot_s


def profile_once(base, prompt: list[int], method: str, knobs: dict, tokens: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    s = base.fork(method=method, knobs=knobs)
    stream = s.stream_ids(prompt, SamplingParams(max_new_tokens=tokens, ignore_eos=True))
    next(stream)  # the prefill and the first token stay outside the profile
    with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
        t0 = time.perf_counter()
        steps = sum(1 for _ in stream)
        wall = time.perf_counter() - t0
    own = defaultdict(float)
    ops = defaultdict(lambda: defaultdict(float))
    for ev in prof.events():
        if not ev.name.startswith("aten::"):
            continue
        frames, up = [], ev.cpu_parent  # the Python frames that called it, innermost first
        while up is not None:
            frames.append(up.name)
            up = up.cpu_parent
        cat = categorize(frames)
        own[cat] += ev.self_cpu_time_total / 1e6
        ops[cat][ev.name] += ev.self_cpu_time_total / 1e6
    in_ops = sum(own.values())
    shares = {c: own.get(c, 0.0) / steps * 1000 for c in [n for n, _ in CATEGORIES] + ["other ops"]}
    shares["Python and dispatch"] = max(0.0, wall - in_ops) / steps * 1000
    top = {c: sorted(((n, round(t / steps * 1000, 3)) for n, t in d.items()), key=lambda x: -x[1])[:6] for c, d in ops.items()}
    return {"steps": steps, "profiled_ms_per_token": wall / steps * 1000, "ms_per_token": shares, "top_ops_ms": top}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=8000)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--n-d", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default="runs/decode-profile.json")
    args = ap.parse_args()

    engine = Engine(load_model("smollm2", dtype=args.dtype), method="dense", threads=args.threads)
    prompt = long_prompt(engine, args.context)
    if len(prompt) + args.tokens >= engine.max_context:  # past it the cache slides and no view holds
        sys.exit(f"context {len(prompt)} + {args.tokens} tokens exceeds the model's {engine.max_context}-token limit")
    base = engine.new_session(method="dense")
    base.prefill(prompt[:-32])
    methods = {"dense": ("dense", {}), "loopserve": ("dense+loopserve", {"budget": args.budget, "n_d": args.n_d})}
    result = {"benchmark": "decode-profile", "context": len(prompt), "tokens": args.tokens, "runs": args.runs,
              "threads": args.threads, "dtype": args.dtype, "budget": args.budget, "n_d": args.n_d, "methods": {}}
    for name, (method, knobs) in methods.items():
        decode_once(base, prompt, method, knobs, 4)  # warm-up
        tpot = [decode_once(base, prompt, method, knobs, args.tokens) for _ in range(args.runs)]
        prof = profile_once(base, prompt, method, knobs, args.tokens)
        result["methods"][name] = {"tpot_ms": statistics.median(tpot) * 1000, "tpot_all_ms": [t * 1000 for t in tpot], **prof}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    cats = list(result["methods"]["dense"]["ms_per_token"])
    print(f"| ms per token, {result['context']} tokens, {args.threads} threads | " + " | ".join(methods) + " |")
    print("|---|" + "---:|" * len(methods))
    print("| TPOT, no profiler (median) | " + " | ".join(f"{result['methods'][m]['tpot_ms']:.1f}" for m in methods) + " |")
    print("| TPOT, profiled | " + " | ".join(f"{result['methods'][m]['profiled_ms_per_token']:.1f}" for m in methods) + " |")
    for c in cats:
        print(f"| {c} | " + " | ".join(f"{result['methods'][m]['ms_per_token'][c]:.1f}" for m in methods) + " |")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
