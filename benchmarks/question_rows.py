"""Does the recall turn of `turn_recall` come back when the question's own rows attend
densely, and which cheap signal finds those rows (issue 12)?

Replays `turn_recall` conversations with the reference's answers (a `bench run` results
file, dense by default) as the assistant turns, so every configuration sees the same
history; then prefills the recall turn with each configuration and generates its answer
greedily (64 tokens), scored as the benchmark scores it (the key in the answer).

Besides any registered METHOD[:KNOBS], ``question-oracle+dense`` is LoopServe's Phase 1
(defaults, dense decoding) with diagnostic knobs: ``dense_question=1`` makes the question's
true rows (from the dataset's ``question_span``) attend densely, what a perfect question
detector would give; ``sparse_turns=1`` prefills only the recall turn sparsely (the history
densely), ``sparse_turns=2`` only the earlier turns. With
``--detect``, every configuration's recall turn also records, per layer and KV head, which
share of the question's rows each candidate detector picks among its top 5% of rows:

- ``outliers``: the queries farthest from their head group's mean (`spikes.outlier_rows`,
  what the spike pass tests);
- ``history``: the rows with the most exact attention mass on earlier turns' keys, the first
  4 (attention sinks) left out (costly: the reference a cheap detector would approximate).

    python benchmarks/question_rows.py --results docs/results/4k/results-turn-recall.jsonl \\
        --data runs/bench-data/ctx4000-seed0-tr24 --limit 24 --positions front,middle \\
        --configs loopserve+dense question-oracle+dense:dense_question=1 --threads 2 \\
        --out runs/question-rows.jsonl

Uses the engine's public session API and the prefill registry.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from loopserve.attention.base import register_prefill
from loopserve.attention.dense import dense_attention
from loopserve.attention.spikes import outlier_rows
from loopserve.attention.loopserve import LoopServePrefill, exact_rows_attention
from loopserve.bench.metrics import score
from loopserve.bench.runner import load_selection
from loopserve.bench.text import token_span
from loopserve.engine import Engine, SamplingParams
from loopserve.engine.registry import parse_method_spec
from loopserve.engine.turn import common_prefix
from loopserve.models import load_model
from loopserve.threads import configure as configure_threads

# Set by main() for the recall turn's prefill: the question's absolute token span, and
# whether detectors are measured; each layer appends its measurements to DETECTED.
QUESTION: dict = {"span": (0, 0), "detect": False}
DETECTED: list[dict] = []


@register_prefill
@dataclass
class QuestionOracle(LoopServePrefill):
    """Phase 1 with the question's true rows dense (``dense_question=1``; diagnostics only)."""

    name = "question-oracle"
    description = "diagnostic: LoopServe Phase 1 with the question's true rows attending densely"
    dense_question: int = 0
    # 1: only the recall turn is prefilled sparsely (earlier turns densely); 2: only the
    # earlier turns (the recall turn densely); 0: every turn, as LoopServe does
    sparse_turns: int = 0

    def attend(self, q, k, v, *, layer_idx, scaling, ctx):
        n, N = q.shape[-2], k.shape[-2]
        off = N - n
        recall_turn = off <= QUESTION["span"][0] < N
        if (self.sparse_turns == 1 and not recall_turn) or (self.sparse_turns == 2 and recall_turn):
            return dense_attention(q, k, v, scaling)
        out = super().attend(q, k, v, layer_idx=layer_idx, scaling=scaling, ctx=ctx)
        a, b = (max(0, p - off) for p in QUESTION["span"])
        b = min(b, n)
        if b <= a:
            return out
        if self.dense_question and N >= self.min_keys and n >= self.min_new:
            g = q.shape[1] // k.shape[1]
            rows = torch.arange(a, b)
            for h in range(k.shape[1]):
                heads = slice(h * g, (h + 1) * g)
                out[0, heads, a:b] = exact_rows_attention(q[0, heads, a:b], k[0, h], v[0, h], off + rows, scaling)
        if QUESTION["detect"]:
            DETECTED.append(detect(q[0], k[0], off, a, b, layer_idx, scaling))
        return out


def detect(q: torch.Tensor, k: torch.Tensor, off: int, a: int, b: int, layer: int, scale: float,
           fraction: float = 0.05, sinks: int = 4) -> dict:
    """Per KV head, the share of the question's rows ``[a, b)`` among each detector's top
    ``fraction`` of the rows, and the question rows' history mass against the other rows'."""
    n = q.shape[1]
    g = q.shape[0] // k.shape[0]
    m = max(1, math.ceil(fraction * n))
    rec = {"layer": layer, "outliers": [], "history": [], "q_history_mass": [], "other_history_mass": []}
    is_q = torch.zeros(n, dtype=torch.bool)
    is_q[a:b] = True
    cols = torch.arange(k.shape[1])
    for h in range(k.shape[0]):
        qg = q[g * h: g * (h + 1)].float()
        picked = outlier_rows(qg, fraction)
        rec["outliers"].append(float(is_q[picked].sum()) / (b - a))
        hist = torch.zeros(n)
        for s in range(0, n, 256):
            sc = (qg[:, s:s + 256] @ k[h].float().T) * scale
            sc.masked_fill_(cols[None, None, :] > (off + torch.arange(s, min(s + 256, n)))[None, :, None], float("-inf"))
            hist[s:s + 256] = torch.softmax(sc, -1)[..., sinks:off].sum(-1).mean(0)
        rec["history"].append(float(is_q[hist.topk(m).indices].sum()) / (b - a))
        rec["q_history_mass"].append(float(hist[a:b].mean()))
        rec["other_history_mass"].append(float(hist[~is_q].mean()))
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", required=True, help="a bench run results file holding the reference's answers")
    ap.add_argument("--reference", default="dense")
    ap.add_argument("--data", required=True)
    ap.add_argument("--limit", type=int, default=6)
    ap.add_argument("--positions", default="front,middle")
    ap.add_argument("--configs", nargs="+", required=True, help="METHOD[:KNOBS] or oracle")
    ap.add_argument("--detect", action="store_true", help="measure the detectors on the recall turn")
    ap.add_argument("--found-only", action="store_true", help="only the cases the reference answered")
    ap.add_argument("--cases", default=None, help="only these cases, e.g. turn_recall-0001:middle,turn_recall-0002:front")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="bf16-prefill")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--out", default="runs/question-rows.jsonl")
    args = ap.parse_args()
    configure_threads(args.threads)
    answers = {}
    with open(args.results, encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            if r["method"] == args.reference:
                answers[(r["conversation"], r["position"], r["turn"])] = r
    convs = load_selection(Path(args.data), ["turn_recall"], args.limit)["turn_recall"]
    engine = Engine(load_model(args.model, dtype=args.dtype), method="dense")
    tok = engine.tokenizer
    configs = {c: parse_method_spec(c) for c in args.configs}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if out.exists():
        done = {(r["conversation"], r["position"], r["config"]) for r in map(json.loads, out.open(encoding="utf-8"))}
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens)
    for conv in convs:
        last_turn = conv["turns"][-1]
        for pos in args.positions.split(","):
            ref = answers[(conv["id"], pos, last_turn["index"])]
            if args.found_only and not ref["score"]:
                continue
            if args.cases and f"{conv['id']}:{pos}" not in args.cases.split(","):
                continue
            messages = []
            for turn in conv["turns"][:-1]:
                messages += [{"role": "user", "content": turn["user"][pos]},
                             {"role": "assistant", "content": answers[(conv["id"], pos, turn["index"])]["prediction"]}]
            messages += [{"role": "user", "content": last_turn["user"][pos]}]
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
            prompt = engine.encode_messages(messages)
            if list(enc["input_ids"]) != prompt:
                raise SystemExit("the offsets' tokenization differs from the engine's")
            u0 = text.rindex(last_turn["user"][pos])
            qs, qe = last_turn["question_span"][pos]
            span = token_span(enc["offset_mapping"], u0 + qs, u0 + qe)
            for c, (method, knobs) in configs.items():
                if (conv["id"], pos, c) in done:
                    continue
                session = engine.new_session(method=method, knobs=knobs)
                QUESTION.update(span=span, detect=False)
                for i, m in enumerate(messages[:-1]):
                    if m["role"] == "user":
                        ids = engine.encode_messages(messages[: i + 1])
                        session.prefill(ids[common_prefix(session.token_ids, ids):])
                    else:
                        session.prefill(list(tok(m["content"], add_special_tokens=False)["input_ids"])
                                        or [next(iter(engine.eos_ids))])
                QUESTION["detect"] = args.detect
                DETECTED.clear()
                stream = session.stream_ids(prompt, sampling)
                for _ in stream:
                    pass
                QUESTION["detect"] = False
                answer = stream.result.text
                rec = {"conversation": conv["id"], "position": pos, "config": c, "answer": answer,
                       "found": score("substring", answer, last_turn["answers"]),
                       "reference_found": ref["score"], "question_tokens": span[1] - span[0],
                       "prompt_tokens": len(prompt)}
                if DETECTED:
                    rec["detect"] = list(DETECTED)
                with out.open("a", encoding="utf-8") as fh:
                    fh.write(json.dumps(rec) + "\n")
                print(f"{conv['id']} {pos} {c}: found {rec['found']:.0f} (reference {ref['score']:.0f})",
                      file=sys.stderr, flush=True)
    summarize([json.loads(line) for line in out.open(encoding="utf-8")])


def summarize(records: list[dict]) -> None:
    counts: dict = defaultdict(lambda: [0, 0])
    for r in records:
        for key in ((r["config"], r["position"]), (r["config"], "all")):
            counts[key][0] += r["found"]
            counts[key][1] += 1
    configs = sorted({r["config"] for r in records})
    positions = sorted({r["position"] for r in records}) + ["all"]
    ref = defaultdict(lambda: [0, 0])
    for r in records:
        if r["config"] == configs[0]:
            for p in (r["position"], "all"):
                ref[p][0] += r["reference_found"]
                ref[p][1] += 1
    print("| found the key | " + " | ".join(positions) + " |")
    print("|---|" + "---:|" * len(positions))
    print("| reference (results file) | " + " | ".join(f"{ref[p][0]:.0f}/{ref[p][1]}" for p in positions) + " |")
    for c in configs:
        print(f"| {c} | " + " | ".join(f"{counts[(c, p)][0]:.0f}/{counts[(c, p)][1]}" for p in positions) + " |")
    det = [d for r in records for d in r.get("detect", [])]
    if det:
        by_layer = defaultdict(list)
        for d in det:
            by_layer[d["layer"]].append(d)
        print("\n| layer | question rows among outliers | among top history mass | history mass: question / other |")
        print("|---:|---:|---:|---:|")
        for L in sorted(by_layer):
            ds = by_layer[L]
            mean = lambda key: sum(sum(d[key]) / len(d[key]) for d in ds) / len(ds)  # noqa: E731
            print(f"| {L} | {mean('outliers'):.2f} | {mean('history'):.2f} | "
                  f"{mean('q_history_mass'):.3f} / {mean('other_history_mass'):.3f} |")


if __name__ == "__main__":
    main()
