"""`loopserve bench serve`: N concurrent multi-turn conversations through the scheduler,
against the same conversations one at a time, in one process.

Each conversation opens with its own passage of real essay text (about `context` tokens)
and a question, then asks `turns - 1` short follow-ups; every answer is exactly `tokens`
tokens (greedy, EOS ignored), so both runs do the same work. Batched, a conversation's next
turn is submitted as soon as its previous answer ends (continuous batching); one at a time,
each turn runs alone through `Session.stream_ids`. `identical` says whether every answer of
the batched run equals the one-at-a-time answer token for token.
"""

from __future__ import annotations

import time

from ..engine import Engine, SamplingParams
from ..engine.scheduler import Scheduler
from ..textdata import text_chunks
from .settings import run_settings

FOLLOW_UPS = [
    "What is the main point of the passage?",
    "Give one example the author uses.",
    "Do you agree with the author? Why?",
    "Summarise your previous answers in two sentences.",
]


def conversations(engine: Engine, sessions: int, turns: int, context: int) -> list[list[str]]:
    """`sessions` conversations of `turns` user messages: a distinct passage first, then follow-ups."""
    passages = text_chunks(engine.tokenizer, max(context - 40, 16), sessions)
    return [[p + "\n\nWhat is this passage about?"] + [FOLLOW_UPS[i % len(FOLLOW_UPS)] for i in range(turns - 1)]
            for p in passages]


def _percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def _summary(wall_s: float, ttft: list[float], tpot: list[float], tokens: int, decode_s: float, decode_tokens: int) -> dict:
    return {
        "wall_s": round(wall_s, 6),  # microseconds: a tiny run lasts tens of ms, and the rate derives from it
        "generated_tokens": tokens,
        "throughput_tok_s": round(tokens / wall_s, 3) if wall_s > 0 else 0.0,
        # decoding alone: tokens of decode steps over their time (batched: the iterations
        # without prefill; one at a time: every token after a turn's first)
        "decode_tokens": decode_tokens,
        "decode_tok_s": round(decode_tokens / decode_s, 3) if decode_s > 0 else 0.0,
        "ttft_p50_s": round(_percentile(ttft, 50), 4),
        "ttft_p95_s": round(_percentile(ttft, 95), 4),
        "tpot_p50_ms": round(_percentile(tpot, 50) * 1000, 3),
        "tpot_p95_ms": round(_percentile(tpot, 95) * 1000, 3),
    }


def _one_at_a_time(engine: Engine, convs: list[list[str]], method: str, knobs: dict, params: SamplingParams):
    answers, ttft, tpot, generated = [], [], [], 0
    decode_s, decode_tokens = 0.0, 0
    t0 = time.perf_counter()
    for conv in convs:
        session = engine.new_session(method=method, knobs=knobs)
        answers.append([])
        for text in conv:
            res = session.chat(text, params)
            answers[-1].append(res.token_ids)
            ttft.append(res.stats.ttft_s)
            tpot.append(res.stats.tpot_s)
            generated += res.stats.new_tokens
            steps = max(0, res.stats.new_tokens - 1)  # the first token comes from the prefill forward
            decode_s += res.stats.tpot_s * steps
            decode_tokens += steps
    return answers, _summary(time.perf_counter() - t0, ttft, tpot, generated, decode_s, decode_tokens)


def _batched(engine: Engine, convs: list[list[str]], method: str, knobs: dict, params: SamplingParams,
             chunk_tokens: int, kv_budget_bytes: int | None):
    sched = Scheduler(engine, kv_budget_bytes=kv_budget_bytes, chunk_tokens=chunk_tokens)
    sessions = [engine.new_session(method=method, knobs=knobs) for _ in convs]
    answers: list[list[list[int]]] = [[] for _ in convs]
    ttft, tpot, generated = [], [], 0
    owner = {}

    def submit(i: int) -> None:
        messages = sessions[i].messages + [{"role": "user", "content": convs[i][len(answers[i])]}]
        seq = sched.submit(sessions[i], engine.encode_messages(messages), params, messages=messages)
        owner[seq.seq_id] = i

    t0 = time.perf_counter()
    for i in range(len(convs)):
        submit(i)
    while sched.has_work:
        for seq in sched.step():
            if seq.status != "finished":
                raise RuntimeError(f"conversation {owner[seq.seq_id]} turn failed: {seq.error!r}")
            i, st = owner.pop(seq.seq_id), seq.result.stats
            answers[i].append(seq.result.token_ids)
            # From submission: time spent waiting for admission counts against the first token.
            ttft.append(seq.t_admit - seq.t_submit + st.ttft_s)
            tpot.append(st.tpot_s)
            generated += st.new_tokens
            if len(answers[i]) < len(convs[i]):
                submit(i)
    summary = _summary(time.perf_counter() - t0, ttft, tpot, generated, sched.stats.decode_only_s,
                       sched.stats.decode_only_tokens)
    summary.update(forwards=sched.stats.forwards, max_batch=sched.stats.max_batch, preemptions=sched.stats.preemptions)
    return answers, summary


def run_serve(engine: Engine, sessions: int = 8, turns: int = 2, context: int = 2000, tokens: int = 64,
              methods: tuple[str, ...] = ("dense", "loopserve"), knobs: dict | None = None, chunk_tokens: int = 512,
              kv_budget_bytes: int | None = None, progress=None) -> dict:
    """Batched (scheduler) vs one at a time, per method; see the module docstring."""
    if sessions < 1 or turns < 1 or tokens < 2:
        raise ValueError(f"need sessions >= 1, turns >= 1 and tokens >= 2 (got {sessions}, {turns}, {tokens})")
    knobs = dict(knobs or {})
    convs = conversations(engine, sessions, turns, context)
    params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
    out = {}
    for k, method in enumerate(methods):
        m_knobs = knobs if method != "dense" else {}
        alone, alone_summary = _one_at_a_time(engine, convs, method, m_knobs, params)
        batched, batched_summary = _batched(engine, convs, method, m_knobs, params, chunk_tokens, kv_budget_bytes)
        out[method] = {
            "batched": batched_summary,
            "one_at_a_time": alone_summary,
            "throughput_speedup": round(batched_summary["throughput_tok_s"] / alone_summary["throughput_tok_s"], 3)
            if alone_summary["throughput_tok_s"] else None,
            "decode_throughput_speedup": round(batched_summary["decode_tok_s"] / alone_summary["decode_tok_s"], 3)
            if alone_summary["decode_tok_s"] else None,
            "identical": batched == alone,
        }
        if progress:
            progress(k + 1, len(methods))
    first = out[methods[0]]
    result = {
        "benchmark": "serve",
        "model": engine.loaded.name,
        **run_settings(engine),
        "sessions": sessions,
        "turns": turns,
        "context": context,
        "tokens": tokens,
        "chunk_tokens": chunk_tokens,
        "kv_budget_bytes": kv_budget_bytes,
        "knobs": knobs,
        # The first method's figures at the top level; every method's under "methods".
        "throughput_tok_s": {"batched": first["batched"]["throughput_tok_s"], "one_at_a_time": first["one_at_a_time"]["throughput_tok_s"]},
        "throughput_speedup": first["throughput_speedup"],
        "decode_throughput_speedup": first["decode_throughput_speedup"],
        "identical": all(m["identical"] for m in out.values()),
        "methods": out,
    }
    if "dense" in out and len(out) > 1:
        # Per-token advantage under batching: dense p50 TPOT over each other method's.
        result["batched_tpot_advantage_over_dense"] = {
            m: round(out["dense"]["batched"]["tpot_p50_ms"] / r["batched"]["tpot_p50_ms"], 3) if r["batched"]["tpot_p50_ms"] else None
            for m, r in out.items() if m != "dense"
        }
        # The same per-token comparison from decode throughput (the mean cost of a decode token,
        # where a p50 TPOT picks one kind of step in a method whose steps differ in kind).
        result["decode_advantage_over_dense"] = {
            m: {mode: round(r[mode]["decode_tok_s"] / out["dense"][mode]["decode_tok_s"], 3)
                if out["dense"][mode]["decode_tok_s"] else None for mode in ("batched", "one_at_a_time")}
            for m, r in out.items() if m != "dense"
        }
    return result
