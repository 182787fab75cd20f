"""Load test for `loopserve serve`: N concurrent conversations x T turns over loopback.

Each session is one conversation: every turn adds a chunk of real essay text and a
question, streams the answer with the official `openai` client, and appends the model's
answer to the history it resends next turn (so the server's session reuse is exercised).
Reports p50/p95 time to first token (first content delta), tokens/s and the error count,
as a table on stderr and a JSON object on stdout (or --json PATH).

    # against a running server
    python benchmarks/load.py --base-url http://127.0.0.1:8000/v1 --sessions 4 --turns 3
    # or let the script start one (and stop it afterwards)
    python benchmarks/load.py --spawn --model smollm2 --method loopserve --sessions 4 --turns 3
    # ... or a Ray Serve deployment with N engine replicas (needs Redis: scripts/redis.sh start)
    python benchmarks/load.py --spawn --ray --replicas 2 --store redis://127.0.0.1:6379/0 --sessions 6
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUESTIONS = [
    "Summarize the passage above in two sentences.",
    "What is the main claim of the passage above?",
    "Name one example the author gives in the passage above.",
    "How does the passage above relate to what we discussed before?",
    "What would a skeptic say about the passage above?",
]


def _text_source() -> str:
    from loopserve.textdata import essays_text  # shipped with the package

    return essays_text()


def _require_clients() -> None:
    """The client libraries are an optional extra: say which, before anything starts."""
    missing = []
    for module in ("openai", "httpx"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        sys.exit(f"error: benchmarks/load.py needs {' and '.join(missing)}: pip install -e '.[bench]'")


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


async def run_session(client, model: str, sid: int, args, text: str, results: list) -> None:
    messages = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    chars = args.turn_tokens * 4  # ~4 characters per token of English
    for turn in range(args.turns):
        start = (sid * args.turns + turn) * chars % max(1, len(text) - chars)
        context = text[start : start + chars]
        messages.append({"role": "user", "content": f"{context}\n\n{QUESTIONS[(sid + turn) % len(QUESTIONS)]}"})
        row = {"session": sid, "turn": turn + 1, "error": None}
        t0 = time.perf_counter()
        first = None
        answer = []
        try:
            stream = await client.chat.completions.create(
                model=model, messages=messages, stream=True, stream_options={"include_usage": True},
                max_tokens=args.max_tokens, temperature=args.temperature,
                extra_body={"ignore_eos": True} if args.ignore_eos else None,
            )
            usage = None
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    if first is None:
                        first = time.perf_counter()
                    answer.append(chunk.choices[0].delta.content)
                if chunk.usage is not None:
                    usage = chunk.usage
            end = time.perf_counter()
            if usage is None:
                raise RuntimeError("no usage chunk")
            first = first or end
            row.update(
                ttft_s=first - t0, latency_s=end - t0, prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                cached_tokens=(usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0) or 0,
                decode_tok_s=(usage.completion_tokens - 1) / (end - first) if usage.completion_tokens > 1 and end > first else None,
            )
        except Exception as e:  # counted, and this conversation stops
            row["error"] = f"{type(e).__name__}: {e}"
            results.append(row)
            return
        results.append(row)
        messages.append({"role": "assistant", "content": "".join(answer)})


async def run_load(args) -> dict:
    import httpx
    from openai import AsyncOpenAI

    http = httpx.AsyncClient(trust_env=False, timeout=args.timeout)
    client = AsyncOpenAI(base_url=args.base_url, api_key=args.api_key or "none", max_retries=0, timeout=args.timeout,
                         http_client=http)
    model = args.served_model or (await client.models.list()).data[0].id
    text = _text_source()
    results: list[dict] = []
    t0 = time.perf_counter()
    await asyncio.gather(*(run_session(client, model, i, args, text, results) for i in range(args.sessions)))
    wall = time.perf_counter() - t0
    await http.aclose()

    ok = [r for r in results if not r["error"]]
    ttft = [r["ttft_s"] for r in ok]
    gen = sum(r["completion_tokens"] for r in ok)
    prompt = sum(r["prompt_tokens"] for r in ok)
    cached = sum(r["cached_tokens"] for r in ok)
    per_turn = {}
    for t in range(1, args.turns + 1):
        xs = [r["ttft_s"] for r in ok if r["turn"] == t]
        per_turn[str(t)] = {"p50_ttft_s": round(percentile(xs, 50), 3), "mean_prompt_tokens": round(
            sum(r["prompt_tokens"] for r in ok if r["turn"] == t) / max(len(xs), 1)), "mean_cached_tokens": round(
            sum(r["cached_tokens"] for r in ok if r["turn"] == t) / max(len(xs), 1))}
    decode_rates = [r["decode_tok_s"] for r in ok if r.get("decode_tok_s")]
    expected = args.sessions * args.turns
    return {
        "benchmark": "server-load",
        "model": model,
        "ray_replicas": args.replicas if args.ray else None,
        "sessions": args.sessions,
        "turns": args.turns,
        "max_tokens": args.max_tokens,
        "turn_tokens": args.turn_tokens,
        "requests": len(results),
        "completed": len(ok),
        "errors": len(results) - len(ok) + (expected - len(results)),
        "wall_s": round(wall, 2),
        "ttft_p50_s": round(percentile(ttft, 50), 3),
        "ttft_p95_s": round(percentile(ttft, 95), 3),
        "completion_tokens": gen,
        "tokens_per_s": round(gen / wall, 2) if wall > 0 else None,
        "per_request_decode_tok_s_p50": round(percentile(decode_rates, 50), 2) if decode_rates else None,
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "cached_fraction": round(cached / prompt, 3) if prompt else 0.0,
        "per_turn": per_turn,
        "error_messages": sorted({r["error"] for r in results if r["error"]})[:5],
        "rows": results,
    }


def print_table(res: dict, out=sys.stderr) -> None:
    rows = [
        ("model", res["model"]), ("sessions x turns", f"{res['sessions']} x {res['turns']}"),
        ("requests ok / errors", f"{res['completed']} / {res['errors']}"), ("wall time (s)", res["wall_s"]),
        ("TTFT p50 (s)", res["ttft_p50_s"]), ("TTFT p95 (s)", res["ttft_p95_s"]),
        ("generated tokens", res["completion_tokens"]), ("tokens/s (aggregate)", res["tokens_per_s"]),
        ("decode tok/s per request (p50)", res["per_request_decode_tok_s_p50"]),
        ("prompt tokens (cached)", f"{res['prompt_tokens']} ({res['cached_tokens']}, {res['cached_fraction']:.0%})"),
    ]
    for t, v in res["per_turn"].items():
        rows.append((f"turn {t}: TTFT p50 (s), prompt/cached", f"{v['p50_ttft_s']}, {v['mean_prompt_tokens']}/{v['mean_cached_tokens']}"))
    w = max(len(k) for k, _ in rows)
    print("-" * (w + 24), file=out)
    for k, v in rows:
        print(f"{k:<{w}}  {v}", file=out)
    print("-" * (w + 24), file=out)
    for e in res["error_messages"]:
        print(f"error: {e}", file=out)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_server(args):
    port = _free_port()
    db = args.store or str(Path(tempfile.mkdtemp(prefix="loopserve-load-")) / "conversations.sqlite")
    cmd = [sys.executable, "-m", "loopserve.server", "--model", args.model, "--method", args.method, "--host", "127.0.0.1",
           "--port", str(port), "--db", str(db), "--log-level", "warning", "--max-queue", str(max(16, args.sessions * 2))]
    if args.ray:
        cmd += ["--ray", "--replicas", str(args.replicas), "--replica-cpus", str(args.replica_cpus)]
    for k in args.knob or []:
        cmd += ["--knob", k]
    if args.api_key:
        cmd += ["--api-key", args.api_key]
    print("starting:", " ".join(cmd), file=sys.stderr)
    proc = subprocess.Popen(cmd, stdout=sys.stderr, stderr=sys.stderr)
    import httpx

    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2, trust_env=False).status_code == 200:
                return proc, url + "/v1"
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not start")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--api-key", default=os.environ.get("LOOPSERVE_API_KEY"))
    ap.add_argument("--served-model", default=None, help="model id to request (default: the first of /v1/models)")
    ap.add_argument("--sessions", type=int, default=4)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--turn-tokens", type=int, default=300, help="approximate tokens of context text per user turn")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--system", default=None, help="system prompt (default: none, the template's own)")
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--json", default=None, help="also write the JSON result to this file")
    ap.add_argument("--spawn", action="store_true", help="start `python -m loopserve.server` for the run")
    ap.add_argument("--model", default="smollm2", help="with --spawn")
    ap.add_argument("--method", default="loopserve", help="with --spawn")
    ap.add_argument("--knob", action="append", help="with --spawn: server knob NAME=VALUE")
    ap.add_argument("--store", default=None, help="with --spawn: conversation store (SQLite path or redis:// URL)")
    ap.add_argument("--ray", action="store_true", help="with --spawn: a Ray Serve deployment (needs --store redis://...)")
    ap.add_argument("--replicas", type=int, default=2, help="with --spawn --ray: engine replicas")
    ap.add_argument("--replica-cpus", type=float, default=1.0, help="with --spawn --ray: CPUs (torch threads) per replica")
    ap.add_argument("--ignore-eos", action="store_true", help="every answer is exactly --max-tokens long (fair throughput)")
    args = ap.parse_args(argv)
    _require_clients()
    proc = None
    if args.spawn:
        proc, args.base_url = spawn_server(args)
    try:
        res = asyncio.run(run_load(args))
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
    print_table(res)
    out = json.dumps({k: v for k, v in res.items() if k != "rows"}, indent=None)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    print(out)
    return 0 if res["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
