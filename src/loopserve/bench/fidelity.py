"""`loopserve bench fidelity`: do a method's greedy answers agree with dense attention's?

Real long prompts (L-Eval documents cut to about `context` tokens, each with its own
question, placed after the document (`back`) or before it (`front`)) are answered greedily
by dense attention and by each method under test; the score is ROUGE-L F of the method's
answer against dense's answer (1.0 = identical). Dense runs once per prompt, so several
methods are compared on exactly the same references.
"""

from __future__ import annotations

import statistics

from ..engine import Engine, SamplingParams
from ..engine.registry import method_knobs
from ..sourcedata import resolve_data_dir
from .report import fidelity
from .sources import leval_rows
from .settings import run_settings

_FILES = ["natural_question", "scientific_qa", "multidoc_qa", "financial_qa", "meeting_summ", "news_summ", "gov_report_summ"]
POSITIONS = ("back", "front")


def fidelity_prompts(tokenizer, context: int, count: int = 20, position: str = "back") -> list[str]:
    """`count` prompts, round-robin over L-Eval files, each document cut to ~`context` tokens."""
    if position not in POSITIONS:
        raise ValueError(f"unknown question position {position!r}; choose from {', '.join(POSITIONS)}")
    root = resolve_data_dir()
    docs = {f: leval_rows(root, f"Open-ended-tasks/{f}.jsonl") for f in _FILES}
    prompts, i = [], 0
    while len(prompts) < count:
        f = _FILES[i % len(_FILES)]
        row = docs[f][(i // len(_FILES)) % len(docs[f])]
        ids = tokenizer(row["input"][: context * 8], add_special_tokens=False)["input_ids"][: context - 80]
        doc = tokenizer.decode(ids)
        question = row["instructions"][0]
        if position == "back":
            prompts.append(f"Read the document and answer the question.\n\n{doc}\n\nQuestion: {question}\nAnswer briefly.")
        else:
            prompts.append(f"Answer the question about the document below.\nQuestion: {question}\n\n{doc}\n\nAnswer briefly.")
        i += 1
    return prompts


def run_fidelity(engine: Engine, method: str | list[str], knobs: dict | None = None, context: int = 4000, count: int = 20,
                 max_new_tokens: int = 64, position: str = "back", progress=None) -> dict:
    """One method (the report's top-level fields) or several (`by_method`, same references).
    Each method gets the knobs it declares (e.g. `budget` for every KV method, not dense).

    When the engine's numerics are not float32 (``--dtype auto`` on a BF16 CPU), dense and
    every method also answer in float32 (the same weights, ``LoadedModel.as_float32``), and
    ``vs_fp32`` reports, per method, ROUGE-L and identical answers against the float32 run
    of the same method: what the faster numerics cost in agreement."""
    methods = [method] if isinstance(method, str) else list(method)
    knobs = dict(knobs or {})
    accepted = {m: method_knobs(m) for m in methods}
    own = {m: {k: v for k, v in knobs.items() if k in accepted[m]} for m in methods}
    unused = sorted(set(knobs) - set().union(*(set(k) for k in own.values())))
    if unused:
        raise ValueError(f"knob(s) {unused} apply to none of the methods {methods}")
    for m in methods:  # a bad name or knob fails now, not after the first dense answer
        engine.new_session(method=m, knobs=own[m])
    prompts = fidelity_prompts(engine.tokenizer, context, count, position)
    params = SamplingParams(max_new_tokens=max_new_tokens)
    fp32 = Engine(engine.loaded.as_float32(), method="dense") if engine.dtype != "float32" else None
    rows = []
    for i, p in enumerate(prompts):
        ref = engine.new_session(method="dense").chat(p, params)
        row = {"prompt_tokens": ref.stats.prompt_tokens, "dense_tpot_ms": ref.stats.tpot_s * 1000, "dense": ref.text, "methods": {}}
        answers = {"dense": ref}
        for m in methods:
            ours = answers[m] = engine.new_session(method=m, knobs=own[m]).chat(p, params)
            row["methods"][m] = {"rouge_l": fidelity(ours.text, ref.text), "identical": ref.token_ids == ours.token_ids,
                                 "tpot_ms": ours.stats.tpot_s * 1000, "active_kv_tokens": ours.stats.active_kv_tokens,
                                 "answer": ours.text}
        if fp32 is not None:
            row["vs_fp32"] = {}
            for m, ours in answers.items():
                base = fp32.new_session(method=m, knobs=own.get(m)).chat(p, params)
                row["vs_fp32"][m] = {"rouge_l": fidelity(ours.text, base.text), "identical": ours.token_ids == base.token_ids}
        rows.append(row)
        if progress:
            progress(i + 1, len(prompts))
    by_method = {m: {"rouge_l_vs_dense": round(statistics.mean(r["methods"][m]["rouge_l"] for r in rows), 4),
                     "identical_answers": sum(r["methods"][m]["identical"] for r in rows)} for m in methods}
    return {
        "benchmark": "fidelity",
        "model": engine.loaded.name,
        **run_settings(engine),
        "method": methods[0],
        "knobs": knobs,
        "context": context,
        "position": position,
        "prompts": len(rows),
        "mean_prompt_tokens": round(statistics.mean(r["prompt_tokens"] for r in rows)),
        **by_method[methods[0]],
        "by_method": by_method,
        **({"vs_fp32": {m: {"rouge_l": round(statistics.mean(r["vs_fp32"][m]["rouge_l"] for r in rows), 4),
                            "identical_answers": sum(r["vs_fp32"][m]["identical"] for r in rows)}
                        for m in rows[0]["vs_fp32"]}} if fp32 is not None and rows else {}),
        "rows": rows,
    }
