"""`loopserve bench decode`: time per output token, dense against LoopServe Phase 2, on the
same prompt in one process. The prompt (minus its last token) is prefilled once and the
cache copied for every run, so only decoding is measured."""

from __future__ import annotations

import statistics

import time

import torch
from transformers import DynamicCache

from ..engine import Engine, SamplingParams
from ..engine.registry import resolve_method
from ..textdata import text_chunks
from .settings import run_settings


def long_prompt(engine: Engine, context: int) -> list[int]:
    """About `context` tokens: real essay text and a question after it, chat-templated."""
    question = "\n\nSummarise the passage above in a few sentences."
    body = text_chunks(engine.tokenizer, max(context - 60, 16))[0]
    return engine.encode_messages([{"role": "user", "content": body + question}])


def _prefilled(engine: Engine, ids: list[int]):
    """A dense session whose cache holds `ids` (prefilled once; runs start from copies)."""
    base = engine.new_session(method="dense")
    base.prefill(ids)
    return base


def _decode_runs(engine: Engine, base, prompt: list[int], methods: dict, tokens: int, runs: int, progress=None) -> tuple[dict, dict]:
    """TPOT of each method over `runs` alternating runs, every run from a copy of `base`."""
    tpot = {m: [] for m in methods}
    last = {}
    for r in range(runs):
        order = list(methods) if r % 2 == 0 else list(reversed(methods))
        for m in order:
            name, knobs = methods[m]
            s = base.fork(method=name, knobs=knobs)
            # ignore_eos: every run decodes exactly `tokens` tokens.
            stream = s.stream_ids(prompt, SamplingParams(max_new_tokens=tokens, ignore_eos=True))
            for _ in stream:
                pass
            if stream.result.stats.new_tokens != tokens:
                raise RuntimeError(f"{m} decoded {stream.result.stats.new_tokens} tokens, not {tokens}: context too long for the model?")
            tpot[m].append(stream.result.stats.tpot_s)
            last[m] = (stream.result, s)
        if progress:
            progress(r + 1, runs)
    return tpot, last


def run_decode(engine: Engine, context: int, budget: int = 1024, tokens: int = 64, runs: int = 3, n_d: int = 16,
               new_tokens: int = 32, knobs: dict | None = None, progress=None) -> dict:
    """Dense vs LoopServe Phase 2 decoding of the same turn.

    The cache holds the prompt minus its last `new_tokens` tokens (the conversation so far);
    every run prefills those last tokens (the new user turn: the question and the template's
    assistant header) and decodes `tokens` tokens greedily, as a real turn does. So Phase 2
    makes its first selection from the new turn's queries, and re-selects every n_d tokens.

    Also measured, in the same process: dense decoding over a prompt of only
    budget + sinks + recent tokens (`floor_tpot_ms`): what a decode step costs when attention
    covers as many keys as Phase 2 keeps. dense / floor is the ceiling of any speed-up from
    shrinking attention on this model and machine (weights, not KV, dominate the rest).
    """
    if new_tokens < 1 or tokens < 2:
        raise ValueError(f"need new_tokens >= 1 and tokens >= 2 (got {new_tokens}, {tokens})")
    prompt = long_prompt(engine, context)
    if len(prompt) + tokens >= engine.max_context:
        raise ValueError(f"context {len(prompt)} + {tokens} tokens exceeds the model's {engine.max_context}-token limit")
    knobs = {**(knobs or {}), "budget": budget, "n_d": n_d}  # other Phase 2 knobs pass through
    method = resolve_method("dense+loopserve", knobs)
    kept = budget + method.decode.sinks + method.decode.recent
    base = _prefilled(engine, prompt[:-new_tokens])
    methods = {"dense": ("dense", {}), "loopserve": ("dense+loopserve", knobs)}
    tpot, last = _decode_runs(engine, base, prompt, methods, tokens, runs, progress)
    short = long_prompt(engine, kept)
    floor_base = _prefilled(engine, short[:-new_tokens])
    floor, _ = _decode_runs(engine, floor_base, short, {"floor": ("dense", {})}, tokens, runs)
    hf_ms = statistics.median(_stock_transformers_tpot(engine, base.cache, prompt[: len(prompt) - new_tokens + 1], tokens) for _ in range(runs)) * 1000
    dense_ms = statistics.median(tpot["dense"]) * 1000
    ours_ms = statistics.median(tpot["loopserve"]) * 1000
    fp32_ms = dense_ms  # decode steps run the decode weights: float32 unless --dtype bfloat16
    if engine.model.dtype != torch.float32 and engine.device.type == "cpu":
        ref = Engine(engine.loaded.as_float32(), method="dense")
        ref_tpot, _ = _decode_runs(ref, _prefilled(ref, prompt[:-new_tokens]), prompt, {"dense": ("dense", {})}, tokens, runs)
        fp32_ms = statistics.median(ref_tpot["dense"]) * 1000
    floor_ms = statistics.median(floor["floor"]) * 1000
    res, sess = last["loopserve"]
    return {
        "benchmark": "decode",
        "model": engine.loaded.name,
        **run_settings(engine),
        "context": len(prompt),
        "budget": budget,
        "n_d": n_d,
        "knobs": knobs,
        "tokens": tokens,
        "new_tokens": new_tokens,
        "runs": runs,
        "dense_tpot_ms": round(dense_ms, 2),
        "loopserve_tpot_ms": round(ours_ms, 2),
        "speedup": round(dense_ms / ours_ms, 2),
        "decode_dtype": str(engine.model.dtype).removeprefix("torch."),
        "dense_fp32_tpot_ms": round(fp32_ms, 2),
        "speedup_vs_fp32_dense": round(fp32_ms / ours_ms, 2) if engine.device.type == "cpu" or engine.model.dtype == torch.float32 else None,
        "device": str(engine.device),
        # Dense decoding over only `kept` keys: the ceiling of the speed-up on this model.
        "floor_context": len(short),
        "floor_tpot_ms": round(floor_ms, 2),
        "ceiling_speedup": round(dense_ms / floor_ms, 2),
        # How much of the possible gain Phase 2 realises (1.0 = all of it); None without a gain to take.
        "fraction_of_ceiling": round((dense_ms / ours_ms - 1) / (dense_ms / floor_ms - 1), 2) if dense_ms / floor_ms > 1.05 else None,
        # transformers' stock path (DynamicCache grows by torch.cat, an O(N) copy per token).
        "transformers_dense_tpot_ms": round(hf_ms, 2),
        "speedup_vs_transformers_dense": round(hf_ms / ours_ms, 2),
        "active_kv_tokens": res.stats.active_kv_tokens,
        "resident_kv_bytes": res.stats.kv_bytes,
        "reselections_per_layer": sess.method.decode.reselections // engine.num_layers,
        "dense_tpot_all_ms": [round(x * 1000, 2) for x in tpot["dense"]],
        "loopserve_tpot_all_ms": [round(x * 1000, 2) for x in tpot["loopserve"]],
        "floor_tpot_all_ms": [round(x * 1000, 2) for x in floor["floor"]],
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
