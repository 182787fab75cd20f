"""`loopserve demo`: a scripted 3-turn conversation over ~4k tokens of real text, with KV
reuse, then the same turns by the naive path that re-prefills the whole history."""

from __future__ import annotations

import torch
from rich.console import Console
from rich.table import Table

from .bench.kv_reuse import conversation_turns
from .console import stream_answer
from .engine import Engine, SamplingParams


def speed_phrase(reuse_s: float, naive_s: float) -> str:
    """"2.10x faster" or "1.25x slower": how KV reuse compares, never a ratio below 1 called faster."""
    if reuse_s <= 0 or naive_s <= 0:
        return "not measured"
    if naive_s >= reuse_s:
        return f"{naive_s / reuse_s:.2f}x faster"
    return f"{reuse_s / naive_s:.2f}x slower"


def run_demo(engine: Engine, context: int = 4000, max_new_tokens: int = 48, console: Console | None = None) -> dict:
    con = console or Console()
    users = conversation_turns(engine.tokenizer, context)
    greedy = SamplingParams(max_new_tokens=max_new_tokens)
    session = engine.new_session()
    threads = torch.get_num_threads()
    setup = f"method {session.method.name}, {threads} thread{'s' if threads != 1 else ''}"
    histories = []
    con.rule(f"[bold]LoopServe demo[/] - {engine.loaded.name}, {setup}, ~{context} tokens over 3 turns")
    for i, u in enumerate(users, 1):
        histories.append(list(session.messages))
        con.print(f"[bold cyan]Turn {i}[/] user: {len(engine.tokenizer(u)['input_ids'])} tokens of essay text + “{u.splitlines()[-1]}”")
        stream_answer(con, session, u, greedy, prefix="assistant: ", keep_on_interrupt=False)
    reuse = session.turns

    # The naive path: the same prompts (same history, the reuse session's answers), but the
    # whole conversation is prefilled from scratch every turn.
    naive_session = engine.new_session(reuse_kv=False)
    naive = []
    with con.status("re-running the 3 turns by re-prefilling the whole history...") as status:
        for i, (u, hist) in enumerate(zip(users, histories), 1):
            naive_session.messages = list(hist)
            stream = naive_session.stream(u, greedy, progress=lambda done, layers, tokens, i=i: status.update(
                f"re-running turn {i}/3 by re-prefilling the whole history: {tokens:,} tokens, layer {done}/{layers}"))
            for _ in stream:
                pass
            naive.append(stream.result.stats)

    table = Table(title=f"Per-turn statistics (KV reuse vs naive re-prefill; {setup})")
    for col in ["turn", "prompt tok", "prefilled", "TTFT reuse s", "TTFT naive s", "KV reuse", "TPOT ms", "KV tokens", "KV MiB"]:
        table.add_column(col, justify="right")
    rows = []
    for i, (r, n) in enumerate(zip(reuse, naive), 1):
        ratio = n.ttft_s / r.ttft_s if r.ttft_s else float("nan")
        phrase = speed_phrase(r.ttft_s, n.ttft_s)
        rows.append({"turn": i, "reuse": r.as_dict(), "naive_ttft_s": n.ttft_s, "ttft_ratio": ratio, "verdict": phrase})
        table.add_row(
            str(i), str(r.prompt_tokens), str(r.prefill_tokens), f"{r.ttft_s:.2f}", f"{n.ttft_s:.2f}",
            phrase, f"{r.tpot_s * 1000:.0f}", str(r.kv_tokens), f"{r.kv_bytes / 2**20:.1f}",
        )
    con.print(table)
    for row in rows[1:]:
        con.print(f"turn {row['turn']}: with KV reuse the time to first token is {row['verdict']} than re-prefilling "
                  f"the history ({setup})", highlight=False)
    return {"method": session.method.name, "threads": threads, "turns": rows}
