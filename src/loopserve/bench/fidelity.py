"""`loopserve bench fidelity`: do a method's greedy answers agree with dense attention's?

Twenty real long prompts (L-Eval documents cut to about `context` tokens, each with its
own question) are answered greedily by dense attention and by the method under test; the
score is ROUGE-L F of the method's answer against dense's answer (1.0 = identical).
"""

from __future__ import annotations

import json
import statistics

from rouge_score import rouge_scorer

from ..engine import Engine, SamplingParams
from ..textdata import shared_data_dir

_FILES = ["natural_question", "scientific_qa", "multidoc_qa", "financial_qa", "meeting_summ", "news_summ", "gov_report_summ"]


def fidelity_prompts(tokenizer, context: int, count: int = 20) -> list[str]:
    """`count` prompts, round-robin over L-Eval files, each document cut to ~`context` tokens."""
    base = shared_data_dir() / "leval" / "Open-ended-tasks"
    docs = {f: [json.loads(line) for line in open(base / f"{f}.jsonl", encoding="utf-8")] for f in _FILES}
    prompts, i = [], 0
    while len(prompts) < count:
        f = _FILES[i % len(_FILES)]
        row = docs[f][(i // len(_FILES)) % len(docs[f])]
        ids = tokenizer(row["input"][: context * 8], add_special_tokens=False)["input_ids"][: context - 80]
        doc = tokenizer.decode(ids)
        question = row["instructions"][0]
        prompts.append(f"Read the document and answer the question.\n\n{doc}\n\nQuestion: {question}\nAnswer briefly.")
        i += 1
    return prompts


def run_fidelity(engine: Engine, method: str, knobs: dict | None = None, context: int = 4000, count: int = 20,
                 max_new_tokens: int = 64, progress=None) -> dict:
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    prompts = fidelity_prompts(engine.tokenizer, context, count)
    params = SamplingParams(max_new_tokens=max_new_tokens)
    rows = []
    for i, p in enumerate(prompts):
        ref = engine.new_session(method="dense").chat(p, params)
        ours = engine.new_session(method=method, knobs=knobs).chat(p, params)
        rows.append({
            "prompt_tokens": ref.stats.prompt_tokens,
            "rouge_l": scorer.score(ref.text, ours.text)["rougeL"].fmeasure if ref.text or ours.text else 1.0,
            "identical": ref.token_ids == ours.token_ids,
            "dense_tpot_ms": ref.stats.tpot_s * 1000,
            "method_tpot_ms": ours.stats.tpot_s * 1000,
            "active_kv_tokens": ours.stats.active_kv_tokens,
            "dense": ref.text,
            "method_answer": ours.text,
        })
        if progress:
            progress(i + 1, len(prompts))
    return {
        "benchmark": "fidelity",
        "model": engine.loaded.name,
        "method": method,
        "knobs": knobs or {},
        "context": context,
        "prompts": len(rows),
        "mean_prompt_tokens": round(statistics.mean(r["prompt_tokens"] for r in rows)),
        "rouge_l_vs_dense": round(statistics.mean(r["rouge_l"] for r in rows), 4),
        "identical_answers": sum(r["identical"] for r in rows),
        "rows": rows,
    }
