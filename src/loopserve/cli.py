"""The `loopserve` command: chat, demo, methods, bench ..., serve."""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import __version__
from .cli_options import add_common_options, add_numerics_options, apply_common_options
from .cliparser import HelpParser

# Chat's sampling defaults: a little randomness and a repetition guard, so that a small
# model does not loop until max-new-tokens (greedy decoding is --temperature 0).
CHAT_TEMPERATURE = 0.7
CHAT_TOP_P = 0.9
CHAT_REPETITION_PENALTY = 1.1


def _knobs(pairs: list[str] | None) -> dict:
    from .engine.registry import parse_knobs

    return parse_knobs(pairs)


def _engine(args):
    from .engine import Engine
    from .engine.registry import resolve_method
    from .models import load_model

    knobs = _knobs(args.knob)
    resolve_method(args.method, knobs)  # a bad method or knob fails before the weights load
    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    context = getattr(args, "context", None)
    if context is not None and context > loaded.max_context:
        raise ValueError(f"--context {context} is larger than the model's context window of {loaded.max_context} "
                         f"tokens ({loaded.name}); give a smaller --context")
    return Engine(loaded, method=args.method, knobs=knobs)


def _model_args(p: argparse.ArgumentParser, method: str = "dense") -> None:
    p.add_argument("--model", default="smollm2", help="smollm2, tiny-llama|tiny-qwen2|tiny-qwen3, or a local HF folder")
    add_numerics_options(p)
    p.add_argument("--method", default=method, help="method name (see `loopserve methods`), or PREFILL+DECODE")
    p.add_argument("--knob", action="append", metavar="NAME=VALUE", help="method knob, repeatable (e.g. alpha=0.9; default: none, the method's defaults)")
    add_common_options(p)


CHAT_COMMANDS = {
    "/help": "list these commands",
    "/reset": "clear the conversation",
    "/stats": "per-turn statistics: method, tokens prefilled / cached / generated, TTFT, TPOT, KV size",
    "/quit": "exit (also /exit, Ctrl-D)",
}


def _chat_params(args):
    from .engine import SamplingParams

    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed).validate()


def _print_stats(con, session) -> None:
    if not session.turns:
        con.print("[dim]no turns yet[/]")
    for i, t in enumerate(session.turns, 1):
        con.print(f"turn {i}: method {t.method}, prefill {t.prefill_tokens} (cached {t.cached_tokens}), "
                  f"generated {t.new_tokens} ({t.finish_reason}), TTFT {t.ttft_s:.2f}s, TPOT {t.tpot_s * 1000:.0f}ms, "
                  f"KV {t.kv_tokens} tokens / {t.kv_bytes / 2**20:.1f} MiB", highlight=False)


def cmd_chat(args) -> int:
    from rich.console import Console
    from rich.markup import escape

    from .console import stream_answer

    params = _chat_params(args)  # bad sampling values fail before the weights load
    con = Console()
    engine = _engine(args)
    session = engine.new_session(system_prompt=args.system)
    con.print(f"[bold]loopserve chat[/] - {engine.loaded.name}, method {session.method.name}; "
              "/help lists the commands, Ctrl-C stops an answer")
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            con.print()
            return 0
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/quit", "/exit"):
            return 0
        if cmd == "/help":
            for name, what in CHAT_COMMANDS.items():
                con.print(f"  {name:<8} {what}", highlight=False)
            continue
        if cmd == "/reset":
            session.reset()
            con.print("[dim]conversation cleared[/]")
            continue
        if cmd == "/stats":
            _print_stats(con, session)
            continue
        if cmd.startswith("/") and " " not in cmd:
            con.print(f"[red]unknown command {escape(cmd)}[/]; /help lists the commands", highlight=False)
            continue
        try:
            stream_answer(con, session, line, params)
        except ValueError as e:
            con.print(f"[red]error:[/] {escape(str(e))}", highlight=False)


def cmd_demo(args) -> int:
    from .demo import run_demo

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    run_demo(_engine(args), context=args.context, max_new_tokens=args.max_new_tokens)
    return 0


def cmd_methods(args) -> int:
    from .engine import describe_methods

    rows = describe_methods()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title="LoopServe methods (pair any prefill with any decode method as PREFILL+DECODE)")
    for c in ("name", "phase", "description", "knobs (defaults)"):
        t.add_column(c)
    for r in rows:
        knobs = ", ".join(f"{k}={json.dumps(v)}" for k, v in r["knobs"].items()) or "-"
        t.add_row(r["name"], r["phase"], r["description"], knobs)
    Console().print(t)
    return 0


def _emit(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=result.get("benchmark", "result"))
    t.add_column("field")
    t.add_column("value", justify="right")
    for k, v in result.items():
        if not isinstance(v, (list, dict)):
            t.add_row(k, str(v))
    Console(stderr=True).print(t)
    print(json.dumps(result))


def _progress(desc: str):
    from tqdm import tqdm

    bar = {"b": None}

    def update(done: int, total: int) -> None:
        if bar["b"] is None:
            bar["b"] = tqdm(total=total, desc=desc, file=sys.stderr, initial=0)
        bar["b"].n = done
        bar["b"].refresh()
        if done >= total:
            bar["b"].close()

    return update


def cmd_bench_kv_reuse(args) -> int:
    from .bench.kv_reuse import run_kv_reuse

    _emit(run_kv_reuse(_engine(args), args.context, runs=args.runs, progress=_progress("kv-reuse")), args.json)
    return 0


def cmd_bench_decode(args) -> int:
    from .bench.decode import run_decode

    knobs = _knobs(args.knob)
    args.knob = None  # the knobs are Phase 2's (passed below), not the engine's default method's
    r = run_decode(_engine(args), args.context, budget=args.budget, tokens=args.tokens, runs=args.runs, n_d=args.n_d,
                   new_tokens=args.new_tokens, knobs=knobs, progress=_progress("decode"))
    _emit(r, args.json)
    return 0


def cmd_bench_prefill_attention(args) -> int:
    from .bench.prefill import run_prefill_attention

    r = run_prefill_attention(_engine(args), args.context, alpha=args.alpha, new_rows=args.new_rows, runs=args.runs,
                              progress=_progress("prefill-attention"))
    _emit(r, args.json)
    return 0


def cmd_bench_prefill(args) -> int:
    from .bench.prefill import run_prefill

    r = run_prefill(_engine(args), args.context, history=args.history, new=args.new, runs=args.runs,
                    knobs=_knobs(args.knob), progress=_progress("prefill"))
    _emit(r, args.json)
    return 0


def cmd_bench_serve(args) -> int:
    from .bench.serve import run_serve
    from .engine import Engine
    from .engine.registry import resolve_method
    from .models import load_model

    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    knobs = _knobs(args.knob)
    # Bad input fails before the model loads (main turns a ValueError into exit code 2).
    if not methods:
        raise ValueError("--methods needs at least one method name")
    for m in methods:
        resolve_method(m, knobs if m != "dense" else {})
    for name, low in (("sessions", 1), ("turns", 1), ("tokens", 2), ("chunk_tokens", 1)):
        if getattr(args, name) < low:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    engine = Engine(load_model(args.model, dtype=args.dtype, device=args.device), method="dense")  # the methods run per session
    r = run_serve(engine, sessions=args.sessions, turns=args.turns, context=args.context, tokens=args.tokens, methods=methods,
                  knobs=knobs, chunk_tokens=args.chunk_tokens, kv_budget_bytes=args.kv_budget_bytes, progress=_progress("serve"))
    _emit(r, args.json)
    return 0


def cmd_bench_fidelity(args) -> int:
    from .bench.fidelity import run_fidelity

    from .engine import Engine
    from .models import load_model

    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    engine = Engine(load_model(args.model, dtype=args.dtype, device=args.device), method="dense")  # the methods run per session
    r = run_fidelity(engine, methods if len(methods) > 1 else methods[0], knobs=_knobs(args.knob), context=args.context,
                     count=args.count, max_new_tokens=args.max_new_tokens, position=args.position, progress=_progress("fidelity"))
    _emit(r, args.json)
    return 0


def build_parser() -> argparse.ArgumentParser:
    # HelpParser: every option's --help shows its default, in sub-commands too.
    ap = HelpParser(prog="loopserve", description="LoopServe: fast long multi-turn LLM inference")
    ap.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("chat", help="interactive multi-turn chat with streaming")
    _model_args(p, method="loopserve")
    p.add_argument("--system", default=None, help="system prompt (default: none)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer, in tokens")
    p.add_argument("--temperature", type=float, default=CHAT_TEMPERATURE, help="sampling temperature; 0 is greedy")
    p.add_argument("--top-p", type=float, default=CHAT_TOP_P, help="nucleus sampling mass, in (0, 1]")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens; 0 disables it")
    p.add_argument("--repetition-penalty", type=float, default=CHAT_REPETITION_PENALTY,
                   help="divide the logits of tokens already in the conversation by this, in [1, 10]; 1 disables it")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("demo", help="scripted 3-turn conversation: KV reuse vs re-prefill")
    _model_args(p, method="loopserve")
    p.add_argument("--context", type=int, default=4000, help="tokens of essay text over the 3 turns")
    p.add_argument("--max-new-tokens", type=int, default=48, help="longest answer per turn (greedy)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("methods", help="list prefill and decode methods with their knobs")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of the table")
    add_common_options(p)
    p.set_defaults(func=cmd_methods)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_cmd", required=True)
    p = bench.add_parser("kv-reuse", help="turn-3 TTFT: KV reuse vs re-prefilling the history")
    _model_args(p)
    p.add_argument("--context", type=int, default=4000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    p.set_defaults(func=cmd_bench_kv_reuse)

    p = bench.add_parser("decode", help="TPOT: dense vs LoopServe Phase 2 on the same prompt")
    _model_args(p)
    p.add_argument("--context", type=int, default=8000)
    p.add_argument("--budget", type=int, default=1024)
    p.add_argument("--n-d", type=int, default=16)
    p.add_argument("--tokens", type=int, default=64, help="tokens decoded per run")
    p.add_argument("--new-tokens", type=int, default=32, help="prompt tokens prefilled as the new turn (the rest is cached history)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    p.set_defaults(func=cmd_bench_decode)

    p = bench.add_parser("prefill-attention", help="one layer on real activations: dense SDPA vs Phase 1")
    _model_args(p)
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--new-rows", type=int, default=None, help="query rows (default: all, i.e. no history)")
    p.add_argument("--alpha", type=float, default=0.9)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    p.set_defaults(func=cmd_bench_prefill_attention)

    p = bench.add_parser("prefill", help="end-to-end TTFT: dense vs loopserve, 8k prompt and turn 3")
    _model_args(p)
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--history", type=int, default=6144)
    p.add_argument("--new", type=int, default=2048)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    p.set_defaults(func=cmd_bench_prefill)

    p = bench.add_parser("serve", help="N concurrent conversations through the scheduler vs one at a time: throughput, TTFT, TPOT")
    _model_args(p)
    p.add_argument("--methods", default="dense,loopserve", help="comma-separated methods, each run batched and one at a time")
    p.add_argument("--sessions", type=int, default=8, help="concurrent conversations")
    p.add_argument("--turns", type=int, default=2, help="user turns per conversation")
    p.add_argument("--context", type=int, default=2000, help="tokens of each conversation's opening passage")
    p.add_argument("--tokens", type=int, default=64, help="tokens per answer (EOS ignored)")
    p.add_argument("--chunk-tokens", type=int, default=512, help="prefill tokens per scheduler iteration")
    p.add_argument("--kv-budget-bytes", type=int, default=None, help="scheduler KV byte budget (default: none)")
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    p.set_defaults(func=cmd_bench_serve)

    p = bench.add_parser("fidelity", help="ROUGE-L of methods' greedy answers against dense's (--method A,B,C), 20 long prompts")
    _model_args(p, method="dense+loopserve")
    p.add_argument("--context", type=int, default=4000)
    p.add_argument("--count", type=int, default=20)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--position", default="back", choices=["back", "front"], help="question after or before the document")
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    p.set_defaults(func=cmd_bench_fidelity)

    from .bench.commands import add_bench_commands

    add_bench_commands(bench)  # bench build / run / report (the multi-turn benchmark)

    from .server.cli import add_serve_command

    add_serve_command(sub)  # serve: the OpenAI-compatible HTTP server
    return ap


def _check_args(args) -> None:
    """Checks of options several commands share, before any command starts (and before
    any weights load)."""
    port = getattr(args, "port", None)
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(f"--port must be in 1..65535, got {port}")
    if args.cmd == "serve":  # its parser and command live in server/cli.py
        from .engine import SamplingParams
        from .engine.registry import resolve_method

        resolve_method(args.method, _knobs(args.knob))
        SamplingParams(max_new_tokens=args.default_max_tokens, temperature=args.default_temperature).validate()


def _silence_stdout() -> None:
    # The reader of stdout went away (`loopserve methods --json | head`): send what is left
    # to /dev/null, so that the interpreter's final flush does not fail once more.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout is not a file (e.g. captured)
        pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check_args(args)
        apply_common_options(args)  # the thread budget, before any model loads
        code = args.func(args) or 0
        sys.stdout.flush()  # a closed pipe shows up here, inside the handler below
        return code
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        _silence_stdout()
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
