"""Retrieval of an earlier turn's fact through a sparse-prefilled question turn (issue 12).

A diagnostic of Phase 1, teacher-forced so that it measures the prefill alone:

- turn 1: ~1,000 tokens of essay text with a named 5-digit pass key at a random depth, and
  a request for a summary; turn 2: ~600 tokens of other text, a summary request. Both
  answers are dense's own greedy answers (64 tokens), and this history (~1.8k tokens) is
  prefilled densely once per case.
- turn 3 (the one under test): ~1,000 tokens of new text with the question "What is the
  pass key for <label> given in my first message?" at the front, in the middle or at the
  back. Only this turn's prefill changes between configurations (``--configs``).
- then the answer prefix "The pass key for <label> is" and the 5 key tokens are fed
  densely, and the log-probability of the key and whether greedy decoding would produce
  it token for token (``exact``) are recorded.

Prints a table (mean log p, exact count, prefill density per configuration and position)
and writes every case as JSON lines to ``--out``.

    python benchmarks/recall_across_turns.py --cases 6 \
        --configs 'dense' 'loopserve+dense' 'loopserve+dense:alpha=0.95' 'loopserve+dense:spike_tau=0.1' \
        --out runs/recall-across-turns.jsonl

It uses the engine's public session API only: ``Session.prefill`` (which returns the
logits and the prefill method's diagnostics) and ``Session.fork`` (each configuration
starts from a copy of the same dense history).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import defaultdict
from pathlib import Path

import torch

from loopserve.engine import Engine, SamplingParams
from loopserve.engine.registry import parse_method_spec
from loopserve.models import load_model
from loopserve.textdata import essays_text
from loopserve.threads import configure as configure_threads

LABELS = ("the red door", "the blue gate", "the green locker", "the old safe", "the garden shed",
          "the north tower", "the wine cellar", "the server room", "the boat house", "the attic")
POSITIONS = ("front", "middle", "back")


def make_cases(tokenizer, count: int, seed: int = 1) -> list[dict]:
    ids = tokenizer(essays_text()[:1_000_000], add_special_tokens=False)["input_ids"]
    rng = random.Random(seed)
    cases = []
    for c in range(count):
        starts = rng.sample(range(0, len(ids) - 3000, 3000), 3)
        first, second, third = (tokenizer.decode(ids[s:s + m]) for s, m in zip(starts, (1000, 600, 1000)))
        label, key = LABELS[c % len(LABELS)], str(rng.randrange(10000, 100000))
        cut = first.find(". ", int(rng.random() * len(first)))
        cut = cut + 2 if cut > 0 else len(first)
        needle = f"The pass key for {label} is {key}. Remember it. {key} is the pass key for {label}. "
        first = first[:cut] + needle + first[cut:]
        question = f"What is the pass key for {label} given in my first message? Answer with the pass key only."
        mid = third.find(". ", len(third) // 2) + 2
        cases.append({
            "history": [f"Here is a text. Summarize it in two sentences.\n\n{first}",
                        f"Here is another text. Summarize it in two sentences.\n\n{second}"],
            "turn": {"front": f"{question}\n\nHere is one more text.\n\n{third}",
                     "middle": f"Here is one more text.\n\n{third[:mid]}\n\n{question}\n\n{third[mid:]}",
                     "back": f"Here is one more text.\n\n{third}\n\n{question}"},
            "label": label, "key": key,
        })
    return cases


def run(engine: Engine, cases: list[dict], configs: list[str], positions, out: Path) -> list[dict]:
    tok = engine.tokenizer
    parsed = {c: parse_method_spec(c) for c in configs}
    for name, knobs in parsed.values():  # a bad name or knob fails before any work
        engine.new_session(method=name, knobs=knobs)
    records = []
    for i, case in enumerate(cases):
        session = engine.new_session(method="dense")
        answers = [session.chat(u, SamplingParams(max_new_tokens=64)).text for u in case["history"]]
        messages = [m for u, a in zip(case["history"], answers)
                    for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})]
        history = list(tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"])
        base = engine.new_session(method="dense")
        base.prefill(history)
        prefix = list(tok(f"The pass key for {case['label']} is", add_special_tokens=False)["input_ids"])
        gold = list(tok(f"The pass key for {case['label']} is {case['key']}", add_special_tokens=False)["input_ids"])
        gold = gold[len(prefix):]
        for pos in positions:
            full = engine.encode_messages(messages + [{"role": "user", "content": case["turn"][pos]}])
            turn = full[len(history):]
            for config, (name, knobs) in parsed.items():
                trial = base.fork(method=name, knobs=knobs)
                density = trial.prefill(turn).stats.get("prefill_density")
                answer = trial.fork(method="dense").prefill(prefix + gold, all_logits=True).logits
                logp = torch.log_softmax(answer.float(), -1)[len(prefix) - 1:-1]
                rec = {"case": i, "position": pos, "config": config,
                       "logp": float(sum(logp[j, g] for j, g in enumerate(gold))),
                       "exact": all(int(logp[j].argmax()) == g for j, g in enumerate(gold)),
                       "density": sum(density) / len(density) if density else 1.0}
                records.append(rec)
                with out.open("a", encoding="utf-8") as fh:
                    fh.write(json.dumps(rec) + "\n")
                print(json.dumps(rec), file=sys.stderr, flush=True)
    return records


def table(records: list[dict]) -> str:
    groups = defaultdict(list)
    for r in records:
        groups[(r["config"], r["position"])].append(r)
        groups[(r["config"], "all")].append(r)
    lines = ["| configuration | position | cases | mean log p(key) | exact | density |", "|---|---|---:|---:|---:|---:|"]
    for (config, pos), rs in groups.items():
        lines.append(f"| {config} | {pos} | {len(rs)} | {sum(r['logp'] for r in rs) / len(rs):.2f} | "
                     f"{sum(r['exact'] for r in rs)}/{len(rs)} | {sum(r['density'] for r in rs) / len(rs):.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=6)
    ap.add_argument("--configs", nargs="+", default=["dense", "loopserve+dense"],
                    help="METHOD[:KNOB=VALUE,...] for the question turn's prefill")
    ap.add_argument("--positions", default="front,middle,back")
    ap.add_argument("--out", default="runs/recall-across-turns.jsonl")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    configure_threads(args.threads)
    positions = [p for p in args.positions.split(",") if p]
    bad = [p for p in positions if p not in POSITIONS]
    if bad:
        ap.error(f"unknown positions {bad}; known: {', '.join(POSITIONS)}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    engine = Engine(load_model("smollm2"), method="dense")
    records = run(engine, make_cases(engine.tokenizer, args.cases), args.configs, positions, out)
    print(table(records))


if __name__ == "__main__":
    main()
