"""The `serve` command: `loopserve serve --model M --method NAME --host H --port P ...`.

`add_serve_command(subparsers)` registers it on the main `loopserve` parser;
`python -m loopserve.server [serve] --model ...` runs it on its own.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..cli_options import add_common_options, add_numerics_options, apply_common_options


def _default_db() -> str:
    from ..paths import cache_root

    return str(cache_root() / "server" / "conversations.sqlite")


def add_serve_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model", default="smollm2", help="smollm2 (default), tiny-llama|tiny-qwen2|tiny-qwen3, or a local HF folder")
    add_numerics_options(p)
    p.add_argument("--method", default="loopserve", help="method name (see `loopserve methods`), or PREFILL+DECODE")
    p.add_argument("--knob", action="append", metavar="NAME=VALUE", help="method knob, repeatable (e.g. budget=1024)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("LOOPSERVE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every path but /health and /metrics (default: "
                        "$LOOPSERVE_API_KEY, else no auth); prefer the variable: a command-line key shows in `ps`")
    p.add_argument("--db", "--store", dest="db", default=None,
                   help="conversation store: a SQLite file (default: $LOOPSERVE_CACHE/server/conversations.sqlite; "
                        "':memory:' keeps nothing across restarts) or redis://HOST:PORT/DB (the shared store; "
                        "default with --ray: redis://127.0.0.1:6379/0)")
    p.add_argument("--kv-budget-mb", type=float, default=1024.0, help="KV memory of all live sessions before LRU eviction")
    p.add_argument("--max-queue", type=int, default=16, help="requests waiting + running before 429")
    p.add_argument("--max-active", type=int, default=4, help="requests batched into each forward at once")
    p.add_argument("--max-body-mb", type=float, default=8.0, help="largest accepted request body")
    p.add_argument("--default-max-tokens", type=int, default=256, help="max_tokens when a request sets none")
    p.add_argument("--default-temperature", type=float, default=1.0, help="temperature when a request sets none (OpenAI: 1)")
    p.add_argument("--served-model-name", default=None, help="model id reported by /v1/models (default: the model's name)")
    g = p.add_argument_group("scale-out on Ray Serve (docs/scale-out.md)")
    g.add_argument("--ray", action="store_true", help="serve as a Ray Serve application: one ingress + N engine replicas")
    g.add_argument("--replicas", type=int, default=2, help="engine replicas (with --ray)")
    g.add_argument("--address", default=None,
                   help="Ray cluster to join: auto (the cluster this node belongs to) or ray://HOST:PORT; "
                        "default: start a local Ray instance on this machine")
    g.add_argument("--replica-cpus", type=float, default=1.0,
                   help="CPUs reserved per engine replica; also its thread budget unless --threads is given")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_common_options(p)  # --threads: with --ray, each engine replica's thread budget
    return p


def api_key_warning(args) -> str | None:
    """A warning when the key came on the command line (other local users see it in `ps`)."""
    if args.api_key and args.api_key != os.environ.get("LOOPSERVE_API_KEY"):
        return ("warning: --api-key is visible to other users in the process list; "
                "set LOOPSERVE_API_KEY in the server's environment instead")
    return None


def server_config(args, knobs: dict, db_path: str | None):
    """The ServerConfig the `serve` options describe (single node and every Ray replica)."""
    from .app import ServerConfig

    return ServerConfig(
        model=args.model, dtype=args.dtype, device=args.device, method=args.method, knobs=knobs, api_key=args.api_key or None,
        db_path=db_path, kv_budget_bytes=int(args.kv_budget_mb * (1 << 20)), max_queue=args.max_queue,
        max_active=args.max_active, max_body_bytes=int(args.max_body_mb * (1 << 20)),
        default_max_tokens=args.default_max_tokens, default_temperature=args.default_temperature,
        served_model_name=args.served_model_name,
    )


def cmd_serve(args) -> int:
    import logging

    import uvicorn

    from ..engine import Engine
    from ..models import load_model
    from .app import create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from ..engine.registry import parse_knobs

    knobs = parse_knobs(args.knob)
    warning = api_key_warning(args)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    if args.ray:
        return cmd_serve_ray(args, knobs)
    db = args.db if args.db is not None else _default_db()
    cfg = server_config(args, knobs, None if db == ":memory:" else db)
    engine = Engine(load_model(args.model, dtype=args.dtype, device=args.device), method=args.method, knobs=knobs)
    app = create_app(engine, cfg)
    state = app.state.loopserve
    print(f"loopserve: serving {state.model_id!r} (method {engine.method}) on http://{args.host}:{args.port}/v1 "
          f"- db {cfg.db_path or ':memory:'}, KV budget {args.kv_budget_mb:g} MiB, queue {cfg.max_queue}"
          f"{', API key required' if cfg.api_key else ''}", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0


def cmd_serve_ray(args, knobs: dict) -> int:
    import dataclasses
    import signal
    import threading

    if args.replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {args.replicas}")
    db = args.db or "redis://127.0.0.1:6379/0"
    cfg = server_config(args, knobs, db)
    from ..engine.registry import resolve_method
    from .store import StoreUnavailable, open_store, redact_url

    resolve_method(args.method, knobs)  # bad method or knobs: fail here, not in every replica
    store = open_store(db)
    if not hasattr(store, "ping"):
        raise ValueError(f"--ray needs the shared redis:// store that every replica reaches, not {db!r}")
    try:
        store.ping()  # an unreachable store: fail here, with its address
    except StoreUnavailable as e:
        raise ValueError(f"{e} (start one with scripts/redis.sh start)") from None
    local = args.address in (None, "", "local")
    os.environ["LOOPSERVE_RAY_LOCAL"] = "1" if local else "0"
    from . import ray_app

    ray_app.start(dataclasses.asdict(cfg), replicas=args.replicas, address=args.address, host=args.host,
                  port=args.port, replica_cpus=args.replica_cpus, threads=args.threads)
    print(f"loopserve: Ray Serve app {ray_app.APP_NAME!r} with {args.replicas} engine replica(s) of {args.model!r} "
          f"(method {args.method}) on http://{args.host}:{args.port}/v1 - store {redact_url(db)}", file=sys.stderr, flush=True)
    if not local:
        print("loopserve: the application keeps running on the cluster; stop it with `serve shutdown -y`.", file=sys.stderr)
        return 0
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *a: stop.set())
    stop.wait()
    from ray import serve

    serve.shutdown()
    return 0


def add_serve_command(subparsers) -> argparse.ArgumentParser:
    """Add `serve` to the `loopserve` command's subparsers."""
    p = subparsers.add_parser("serve", help="OpenAI-compatible chat server with session KV reuse")
    add_serve_args(p)
    p.set_defaults(func=cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        argv = argv[1:]
    ap = add_serve_args(argparse.ArgumentParser(prog="python -m loopserve.server", description="LoopServe chat server"))
    args = ap.parse_args(argv)
    try:
        apply_common_options(args)
        return cmd_serve(args) or 0
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
