"""`loopserve bench build | run | report`: the multi-turn benchmark's command line.

``add_bench_commands(bench)`` adds the three subcommands to the ``loopserve bench``
subparser group. Every command returns an exit code: 0 on success, 2 on bad input
(with ``error: ...`` on stderr and nothing touched), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..cliparser import HelpParser
from ..cli_options import add_common_options, add_numerics_options, apply_common_options

__all__ = ["add_bench_commands", "build_parser", "main"]


def _err(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_knob_args(pairs: list[str] | None) -> tuple[dict, dict[str, dict]]:
    """``NAME=VALUE`` -> shared knobs; ``METHOD:NAME=VALUE`` -> that method's knobs."""
    shared: dict = {}
    per_method: dict[str, dict] = {}
    for p in pairs or []:
        if "=" not in p:
            raise ValueError(f"--knob expects NAME=VALUE or METHOD:NAME=VALUE, got {p!r}")
        name, value = p.split("=", 1)
        if ":" in name:
            method, name = name.split(":", 1)
            per_method.setdefault(method, {})[name] = _value(value)
        else:
            shared[name] = _value(value)
    return shared, per_method


def _count_tokens(tokenizer):
    return lambda text: len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


# --------------------------------------------------------------------------- build


def cmd_build(args) -> int:
    from ..models import load_tokenizer
    from .runner import build_data, default_data_dir, parse_names
    from .datasets import DATASETS

    try:
        names = parse_names(args.datasets, DATASETS, "datasets")
        if args.context < 2000:
            raise ValueError(f"--context must be at least 2000 tokens, got {args.context}")
        if args.conversations < 1:
            raise ValueError(f"--conversations must be >= 1, got {args.conversations}")
    except ValueError as exc:
        return _err(str(exc))
    out = Path(args.out) if args.out else default_data_dir(args.context, args.seed, args.tokenizer)
    try:
        tokenizer = load_tokenizer(args.tokenizer)
        paths = build_data(out, context=args.context, seed=args.seed, count_tokens=_count_tokens(tokenizer),
                           conversations=args.conversations, datasets=names, source_dir=args.source)
    except (ValueError, OSError, RuntimeError) as exc:  # bad tokenizer / data folder, unfillable length
        return _err(str(exc))
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    for name in paths:
        m = manifest["datasets"][name]
        print(f"{name:>13}: {m['conversations']} conversations, {m['turns']} turns "
              f"({m['dependent_turns']} need history), {m['mean_user_tokens']:.0f} user tokens each", file=sys.stderr)
    print(str(out))
    return 0


# --------------------------------------------------------------------------- run


def cmd_run(args) -> int:
    from ..engine import Engine
    from ..models import load_model, load_tokenizer, resolve_device, resolve_dtype
    from .datasets import DATASETS
    from .runner import (
        BenchError,
        build_data,
        default_data_dir,
        execute,
        load_selection,
        parse_names,
        plan_run,
        resolve_knobs,
        validate_methods,
    )
    from .schema import POSITIONS
    from .settings import run_settings

    # 1. Names, knobs, numbers: no model, no files.
    try:
        methods = validate_methods(args.methods)
        datasets = parse_names(args.datasets, DATASETS, "datasets")
        positions = parse_names(args.positions, POSITIONS, "positions")
        shared, per_method = parse_knob_args(args.knob)
        knobs = resolve_knobs(methods, shared, per_method)
        if args.limit is not None and args.limit < 1:
            raise BenchError(f"--limit must be >= 1, got {args.limit}")
        if args.max_new_tokens is not None and args.max_new_tokens < 1:
            raise BenchError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        if args.concurrency < 1:
            raise BenchError(f"--concurrency must be >= 1, got {args.concurrency}")
        if args.data is None and args.context is None:
            raise BenchError("give --context N (data in runs/bench-data/ctxN-seedS, built if missing) or --data DIR")
        out = Path(args.out)
        if out.exists() and not out.is_file():
            raise BenchError(f"{out}: not a regular file")
    except ValueError as exc:
        return _err(str(exc))

    # 2. Data and results file (the model's tokenizer measures default data built on the fly).
    data = Path(args.data) if args.data else default_data_dir(args.context, args.seed, args.model)
    try:
        if args.data is None:
            missing = [d for d in datasets if not (data / f"{d}.jsonl").exists()]
            if missing:
                count = args.limit or 10
                print(f"building {', '.join(missing)} in {data} ({count} conversations, {args.context} tokens)",
                      file=sys.stderr)
                build_data(data, context=args.context, seed=args.seed,
                           count_tokens=_count_tokens(load_tokenizer(args.model)),
                           conversations=count, datasets=missing)
    except (ValueError, OSError, RuntimeError) as exc:  # unknown model, no source data, unfillable length
        return _err(f"building {data}: {exc}")
    try:
        convs = load_selection(data, datasets, args.limit, context=args.context)
        short = [f"{d} ({len(c)})" for d, c in convs.items() if args.limit and len(c) < args.limit]
        if short:
            print(f"note: fewer than --limit {args.limit} conversations in {', '.join(short)}; "
                  "rebuild with `loopserve bench build --conversations K`", file=sys.stderr)
        plan = plan_run(out, convs, methods, positions, knobs, model=args.model, dtype=resolve_dtype(args.dtype, resolve_device(args.device)),
                        max_new_tokens=args.max_new_tokens)
    except ValueError as exc:
        return _err(str(exc))

    # 3. The model. Still nothing written.
    try:
        engine = Engine(load_model(args.model, dtype=args.dtype, device=args.device), method="dense")
    except (ValueError, RuntimeError, OSError) as exc:
        return _err(str(exc))

    print(f"{len(plan.units)} units ({len(methods)} methods x {sum(map(len, convs.values()))} conversations x "
          f"{len(positions)} positions): {len(plan.units) - len(plan.todo)} done, {len(plan.todo)} to run "
          f"({plan.turns_todo} turns)" + (f"; dropping {plan.dropped_records} records of unfinished units"
                                          if plan.dropped_records else ""), file=sys.stderr)
    # 4. Run (execute checks that every conversation fits the context window before writing).
    try:
        summary = execute(plan, engine, progress=not args.no_progress, concurrency=args.concurrency)
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished turns are in {out}; rerun the same command to resume", file=sys.stderr)
        return 130
    except BenchError as exc:
        return _err(str(exc))
    print(json.dumps({**summary.as_dict(), **run_settings(engine)}))
    return 0


# --------------------------------------------------------------------------- report


def _print_written(write, args) -> int:
    """Run a report writer; print the files it wrote, or the error."""
    try:
        written = write(args.results, args.out, reference=args.reference)
    except ValueError as exc:
        return _err(str(exc))
    for path in written.values():
        print(path)
    return 0


def cmd_report(args) -> int:
    from functools import partial

    from .report import write_report

    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()] if args.datasets else None
    return _print_written(partial(write_report, methods=methods, datasets=datasets), args)


def cmd_sensitivity(args) -> int:
    from functools import partial

    from .sensitivity import write_sensitivity

    return _print_written(partial(write_sensitivity, speed=args.speed), args)


# --------------------------------------------------------------------------- parsers


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="smollm2 (default), tiny-llama|tiny-qwen2|tiny-qwen3, or a local HF folder")
    add_numerics_options(p)
    p.add_argument("--knob", action="append", metavar="[METHOD:]NAME=VALUE",
                   help="method knob, repeatable; NAME=VALUE goes to every selected method that has it, "
                        "METHOD:NAME=VALUE to one method (e.g. snapkv:budget=1024)")
    add_common_options(p)


def add_bench_commands(bench) -> None:
    """Add `build`, `run` and `report` to the `loopserve bench` subparser group."""
    p = bench.add_parser("build", help="build the 11 multi-turn datasets (JSONL)")
    p.add_argument("--context", type=int, required=True, help="total user tokens per conversation (>= 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default runs/bench-data/ctxN-seedS)")
    p.add_argument("--conversations", type=int, default=10, help="conversations per dataset (default 10)")
    p.add_argument("--datasets", default=None, help="comma-separated subset (default: all 11)")
    p.add_argument("--tokenizer", default="smollm2", help="tokenizer that counts tokens (default smollm2)")
    p.add_argument("--source", default=None, help="source data folder (default: $LOOPSERVE_DATA, else the data shipped in the package)")
    add_common_options(p)
    p.set_defaults(func=cmd_build)

    p = bench.add_parser("run", help="play the benchmark conversations; one JSONL record per turn, resumable")
    _model_args(p)
    p.add_argument("--methods", default="dense",
                   help="comma-separated methods (default dense); LABEL=METHOD runs METHOD under another name, "
                        "so one run can hold several configurations (a08=loopserve --knob a08:alpha=0.8)")
    p.add_argument("--datasets", default=None, help="comma-separated datasets (default: all)")
    p.add_argument("--positions", default=",".join(("front", "middle", "back")), help="front,middle,back (default all)")
    p.add_argument("--context", type=int, default=None, help="context length of the data (selects/builds the default data folder)")
    p.add_argument("--seed", type=int, default=0, help="build seed of the default data folder")
    p.add_argument("--limit", type=int, default=None, help="first K conversations of each dataset (default: all)")
    p.add_argument("--data", default=None, help="dataset folder (default runs/bench-data/ctxN-seedS[-tokenizer])")
    p.add_argument("--out", default="runs/bench/results.jsonl", help="results JSONL, appended (default runs/bench/results.jsonl)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="cap on each dataset's answer budget")
    p.add_argument("--concurrency", type=int, default=1,
                   help="conversations played at once through the batching scheduler (default 1); greedy answers "
                        "are the same, per-turn timings are those of shared forwards")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_run)

    p = bench.add_parser("report", help="markdown report, summary.json and plots from results JSONL files")
    p.add_argument("--results", nargs="+", default=["runs/bench/results.jsonl"],
                   help="one or more results JSONL files (default runs/bench/results.jsonl)")
    p.add_argument("--out", default="runs/bench/report", help="output folder (default runs/bench/report)")
    p.add_argument("--reference", default="dense", help="method the others are compared with (default dense)")
    p.add_argument("--methods", default=None,
                   help="comma-separated method labels to report (default: all in the files), e.g. the finished ones")
    p.add_argument("--datasets", default=None,
                   help="comma-separated datasets to report (default: all), or 'signal': those where the reference "
                        "clearly beats a content-free answer")
    add_common_options(p)
    p.set_defaults(func=cmd_report)

    p = bench.add_parser("sensitivity", help="ablation table and one plot per knob from labelled configurations")
    p.add_argument("--results", nargs="+", required=True, help="one or more results JSONL files")
    p.add_argument("--out", default="runs/sensitivity", help="output folder (default runs/sensitivity)")
    p.add_argument("--reference", default="dense", help="method the others are compared with (default dense)")
    p.add_argument("--speed", default=None,
                   help="a benchmarks/knob_speed.py JSON: its side-by-side TTFT / TPOT speed-ups replace the "
                        "records' (which share forwards with other conversations)")
    add_common_options(p)
    p.set_defaults(func=cmd_sensitivity)


def build_parser() -> argparse.ArgumentParser:
    """A stand-alone `loopserve bench`-like parser with build / run / report."""
    ap = HelpParser(prog="loopserve bench", description="multi-turn long-context benchmark")
    add_bench_commands(ap.add_subparsers(dest="bench_cmd", required=True))
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        apply_common_options(args)
        return args.func(args) or 0
    except (ValueError, FileNotFoundError) as exc:
        return _err(str(exc))


if __name__ == "__main__":
    sys.exit(main())
