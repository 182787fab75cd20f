"""`loopserve bench decode`: time per output token, dense against LoopServe Phase 2, on the
same prompt in one process. The prompt (minus its last token) is prefilled once and the
cache copied for every run, so only decoding is measured."""

from __future__ import annotations

import copy
import statistics

import time

import torch
from transformers import DynamicCache

from ..engine import Engine, SamplingParams
from ..engine.hook import TurnContext
from ..textdata import text_chunks


def long_prompt(engine: Engine, context: int) -> list[int]:
    """About `context` tokens: real essay text and a question after it, chat-templated."""
    question = "\n\nSummarise the passage above in a few sentences."
    body = text_chunks(engine.tokenizer, max(context - 60, 16))[0]
    return engine.encode_messages([{"role": "user", "content": body + question}])


def run_decode(engine: Engine, context: int, budget: int = 1024, tokens: int = 32, runs: int = 3, n_d: int = 16, progress=None) -> dict:
    prompt = long_prompt(engine, context)
    # Prefill all but the last prompt token once (dense); every run starts from a copy.
    base = engine.new_session(method="dense")
    ctx = TurnContext(base.cache, base.method.prefill, base.method.decode, q_start=0, input_end=len(prompt), num_layers=engine.num_layers)
    engine.forward(prompt[:-1], base.cache, ctx)
    methods = {"dense": ("dense", {}), "loopserve": ("dense+loopserve", {"budget": budget, "n_d": n_d})}
    tpot = {m: [] for m in methods}
    last = {}
    # min_new_tokens-like behaviour: ignore EOS so every run decodes exactly `tokens`.
    saved_eos = engine.eos_ids
    engine.eos_ids = set()
    try:
        for r in range(runs):
            order = list(methods) if r % 2 == 0 else list(reversed(methods))
            for m in order:
                name, knobs = methods[m]
                s = engine.new_session(method=name, knobs=knobs)
                s.cache = copy.deepcopy(base.cache)
                s.token_ids = list(prompt[:-1])
                stream = s.stream_ids(prompt, SamplingParams(max_new_tokens=tokens))
                for _ in stream:
                    pass
                tpot[m].append(stream.result.stats.tpot_s)
                last[m] = (stream.result, s)
            if progress:
                progress(r + 1, runs)
    finally:
        engine.eos_ids = saved_eos
    hf_ms = statistics.median(_stock_transformers_tpot(engine, base.cache, prompt, tokens) for _ in range(runs)) * 1000
    dense_ms = statistics.median(tpot["dense"]) * 1000
    ours_ms = statistics.median(tpot["loopserve"]) * 1000
    res, sess = last["loopserve"]
    return {
        "benchmark": "decode",
        "model": engine.loaded.name,
        "context": len(prompt),
        "budget": budget,
        "n_d": n_d,
        "tokens": tokens,
        "runs": runs,
        "dense_tpot_ms": round(dense_ms, 2),
        "loopserve_tpot_ms": round(ours_ms, 2),
        "speedup": round(dense_ms / ours_ms, 2),
        # transformers' stock path (DynamicCache grows by torch.cat, an O(N) copy per token).
        "transformers_dense_tpot_ms": round(hf_ms, 2),
        "speedup_vs_transformers_dense": round(hf_ms / ours_ms, 2),
        "active_kv_tokens": res.stats.active_kv_tokens,
        "resident_kv_bytes": res.stats.kv_bytes,
        "dense_tpot_all_ms": [round(x * 1000, 2) for x in tpot["dense"]],
        "loopserve_tpot_all_ms": [round(x * 1000, 2) for x in tpot["loopserve"]],
    }


@torch.inference_mode()
def _stock_transformers_tpot(engine: Engine, cache, prompt: list[int], tokens: int) -> float:
    """Greedy decode with transformers' own DynamicCache (no LoopServe context: dense)."""
    hf = DynamicCache(ddp_cache_data=[(layer.keys.clone(), layer.values.clone()) for layer in cache.layers])
    tok, pos, times = prompt[-1], len(prompt) - 1, []
    for _ in range(tokens):
        t0 = time.perf_counter()
        out = engine.model(input_ids=torch.tensor([[tok]]), position_ids=torch.tensor([[pos]]), cache=hf, use_cache=True, logits_to_keep=1)
        tok = int(out.logits[0, -1].argmax())
        pos += 1
        times.append(time.perf_counter() - t0)
    return statistics.mean(times[1:])
