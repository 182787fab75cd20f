"""`loopserve bench kv-reuse`: turn 3 with KV reuse against re-prefilling the whole history."""

from __future__ import annotations

import statistics

from ..engine import Engine, SamplingParams
from ..textdata import text_chunks
from .settings import run_settings

QUESTIONS = [
    "What is the main point of this passage? Answer in one sentence.",
    "What advice does this passage give? Answer in one sentence.",
    "Which of the passages so far did you find most convincing, and why? Answer briefly.",
]


def conversation_turns(tokenizer, context: int, turns: int = 3) -> list[str]:
    """`turns` user messages of real text + question, about `context` tokens in total."""
    chunk = max(32, context // turns - 40)
    return [f"{c}\n\n{q}" for c, q in zip(text_chunks(tokenizer, chunk, turns), QUESTIONS)]


def run_kv_reuse(engine: Engine, context: int, runs: int = 3, answer_tokens: int = 16, progress=None) -> dict:
    tok = engine.tokenizer
    users = conversation_turns(tok, context)
    greedy = SamplingParams(max_new_tokens=answer_tokens)
    session = engine.new_session()
    for u in users[:2]:
        session.chat(u, greedy)
    history = list(session.messages)
    point = session.checkpoint()
    one = SamplingParams(max_new_tokens=1)
    reuse, reprefill = [], []
    naive = engine.new_session(reuse_kv=False)
    for r in range(runs):
        # Alternate the order so neither side always runs on a warmer machine.
        for side in ((0, 1) if r % 2 == 0 else (1, 0)):
            if side == 0:
                res = session.chat(users[2], one)
                session.rewind(point)
                reuse.append(res.stats.ttft_s)
                prompt_tokens, new_tokens = res.stats.prompt_tokens, res.stats.prefill_tokens
            else:
                naive.messages = list(history)
                reprefill.append(naive.chat(users[2], one).stats.ttft_s)
        if progress:
            progress(r + 1, runs)
    reuse_s, reprefill_s = statistics.median(reuse), statistics.median(reprefill)
    return {
        "benchmark": "kv-reuse",
        "model": engine.loaded.name,
        **run_settings(engine),
        "context": context,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "runs": runs,
        "reuse_ttft_s": round(reuse_s, 4),
        "reprefill_ttft_s": round(reprefill_s, 4),
        "speedup": round(reprefill_s / reuse_s, 2),
        "reuse_ttft_all_s": [round(x, 4) for x in reuse],
        "reprefill_ttft_all_s": [round(x, 4) for x in reprefill],
    }
