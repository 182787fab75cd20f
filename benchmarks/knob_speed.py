"""The speed half of the ablation (issue 12): TTFT and TPOT of each knob setting against dense,
measured side by side in one process on an idle machine.

The 4k benchmark's records carry timings of forwards shared by several conversations
(`--concurrency`), and dense ran in another process, so their ratios are not speed-ups. This
script measures the ablation's configurations on one conversation shaped like the benchmark's
later turns, alternating dense and each configuration run by run (median of `--runs`):

- prefill knobs (alpha): TTFT of a `--new`-token turn onto a `--history`-token cache, Phase 1
  alone (`loopserve+dense`) against dense;
- decode knobs (budget, n_d): TPOT of `--tokens` tokens at `--context` tokens, Phase 2 alone
  (`dense+loopserve`) against dense.

Labels follow `benchmarks/run_4k.sh` (a08, a09, b256, ..., and `loopserve` for the defaults),
so `loopserve bench sensitivity --speed FILE` puts these ratios in its TTFT / TPOT columns.

    python benchmarks/knob_speed.py --threads 2 --runs 3 --out docs/results/4k/knob-speed.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from loopserve.bench.decode import long_prompt
from loopserve.engine import Engine, SamplingParams
from loopserve.models import load_model
from loopserve.threads import configure as configure_threads

PREFILL = {"a08": {"alpha": 0.8}, "a09": {"alpha": 0.9}, "loopserve": {}}
DECODE = {"b256": {"budget": 256}, "b512": {"budget": 512}, "loopserve": {}, "b2048": {"budget": 2048},
          "nd4": {"n_d": 4}, "nd64": {"n_d": 64}}


def timed(base, prompt: list[int], method: str, knobs: dict, tokens: int) -> tuple[float, float]:
    """(TTFT, TPOT) of one turn from a fork of `base`."""
    s = base.fork(method=method, knobs=knobs)
    stream = s.stream_ids(prompt, SamplingParams(max_new_tokens=tokens, ignore_eos=True))
    for _ in stream:
        pass
    st = stream.result.stats
    return st.ttft_s, st.tpot_s


def sweep(base, prompt: list[int], configs: dict[str, tuple[str, dict]], tokens: int, runs: int, key: int) -> dict:
    """Median of `runs` alternating passes over dense and every configuration."""
    times = {label: [] for label in configs}
    for r in range(runs):
        for label in (list(configs) if r % 2 == 0 else list(reversed(configs))):
            times[label].append(timed(base, prompt, *configs[label], tokens)[key])
        print(f"  run {r + 1}/{runs}", file=sys.stderr, flush=True)
    return {label: statistics.median(v) for label, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--history", type=int, default=3072, help="cached tokens before the timed prefill turn")
    ap.add_argument("--new", type=int, default=1024, help="tokens of the timed prefill turn")
    ap.add_argument("--context", type=int, default=4000, help="tokens before the timed decode")
    ap.add_argument("--tokens", type=int, default=64, help="tokens decoded per timed decode")
    ap.add_argument("--out", default="runs/knob-speed.json")
    args = ap.parse_args()
    threads = configure_threads(args.threads)
    engine = Engine(load_model(args.model, dtype=args.dtype), method="dense")
    result = {"benchmark": "knob-speed", "model": engine.loaded.name, "dtype": args.dtype, "threads": threads,
              "runs": args.runs, "prefill": {}, "decode": {}}

    text = long_prompt(engine, args.history + args.new)
    base = engine.new_session()
    base.prefill(text[: args.history])
    print(f"prefill: {args.new} new tokens onto {args.history}", file=sys.stderr)
    configs = {"dense": ("dense", {}), **{label: ("loopserve+dense", k) for label, k in PREFILL.items()}}
    ttft = sweep(base, text, configs, 1, args.runs, key=0)
    for label, knobs in PREFILL.items():
        result["prefill"][label] = {"knobs": knobs, "ttft_s": round(ttft[label], 6), "dense_ttft_s": round(ttft["dense"], 6),
                                    "ttft_speedup": round(ttft["dense"] / ttft[label], 3)}

    prompt = long_prompt(engine, args.context)
    base = engine.new_session()
    base.prefill(prompt[:-32])  # the last 32 tokens are the timed turn's input, as in `bench decode`
    print(f"decode: {args.tokens} tokens at {len(prompt)}", file=sys.stderr)
    configs = {"dense": ("dense", {}), **{label: ("dense+loopserve", k) for label, k in DECODE.items()}}
    tpot = sweep(base, prompt, configs, args.tokens, args.runs, key=1)
    for label, knobs in DECODE.items():
        result["decode"][label] = {"knobs": knobs, "tpot_ms": round(tpot[label] * 1000, 4),
                                   "dense_tpot_ms": round(tpot["dense"] * 1000, 4),
                                   "tpot_speedup": round(tpot["dense"] / tpot[label], 3)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))


def table(result: dict) -> str:
    lines = ["| configuration | knobs | TTFT (s) | dense TTFT (s) | TTFT speed-up |", "|---|---|---:|---:|---:|"]
    for label, r in result["prefill"].items():
        lines.append(f"| {label} | {r['knobs'] or 'defaults'} | {r['ttft_s']} | {r['dense_ttft_s']} | {r['ttft_speedup']:.2f}x |")
    lines += ["", "| configuration | knobs | TPOT (ms) | dense TPOT (ms) | TPOT speed-up |", "|---|---|---:|---:|---:|"]
    for label, r in result["decode"].items():
        lines.append(f"| {label} | {r['knobs'] or 'defaults'} | {r['tpot_ms']} | {r['dense_tpot_ms']} | {r['tpot_speedup']:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
