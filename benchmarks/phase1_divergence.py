"""How far a prefill method moves the next-token distributions from dense's, teacher-forced on
dense's own conversations of the multi-turn benchmark (issue 12).

Greedy fidelity (`bench report`) is what users see, but one changed token early in an answer
changes the rest, and a 37-minute run per configuration makes it a slow guide. This script
replays the benchmark's conversations with dense's answers (from a `bench run` results file)
as the assistant turns, so every configuration sees the same history. Each turn's user
message is prefilled by the configuration's prefill method (decoding is dense), then dense's
answer is fed and, at every answer position, the configuration's distribution is compared
with dense's in the same process:

- ``top1``: the share of answer positions whose argmax equals dense's argmax;
- ``kl``: mean KL(dense || configuration) in nats;
- ``first``: whether the answer's first token agrees (the first token decides the most).

Per layer, with ``recall_rows`` in the knobs (e.g. ``loopserve+dense:recall_rows=64``), the
selection's recall of held-out rows' attention mass is averaged too.

    python benchmarks/phase1_divergence.py --results docs/results/4k/results-dense.jsonl \
        --data runs/bench-data/ctx4000-seed0 --limit 1 --threads 2 \
        --configs loopserve+dense 'loopserve+dense:alpha=0.95' --out runs/phase1-divergence.jsonl

The table counts only the turns some configuration prefilled sparsely (the others are
dense's own); ``--table FILE`` prints it again from an earlier ``--out`` file. Uses the engine's public session API only.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

from loopserve.bench.runner import load_selection
from loopserve.engine import Engine
from loopserve.engine.registry import parse_method_spec
from loopserve.engine.turn import common_prefix
from loopserve.models import load_model
from loopserve.threads import configure as configure_threads


def dense_answers(path: str, method: str = "dense") -> dict[tuple, str]:
    out = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            if r["method"] == method:
                out[(r["conversation"], r["position"], r["turn"])] = r["prediction"]
    return out


class Player:
    """One session that follows a conversation with given answers, teacher-forced."""

    def __init__(self, engine: Engine, method: str, knobs: dict):
        self.engine = engine
        self.session = engine.new_session(method=method, knobs=knobs)

    def turn(self, messages: list[dict], answer: list[int], again: bool = False) -> tuple[torch.Tensor, dict]:
        """Log-probabilities ``(len(answer), vocab)`` of each answer token's position, and the
        prefill diagnostics of the user turn. ``again``: the same user turn with another answer
        (the user message is prefilled again, as on the first call)."""
        s = self.session
        prompt = self.engine.encode_messages(messages)
        if again:
            keep = self.turn_start
        else:
            keep = common_prefix(s.token_ids, prompt)
            if keep == len(prompt):
                keep -= 1  # at least one token to prefill
            self.turn_start = keep
        if keep < len(s.token_ids):
            s.rewind((keep, s.messages, len(s.turns)))
        first = s.prefill(prompt[keep:])
        rest = s.prefill(answer[:-1], all_logits=True) if len(answer) > 1 else None
        logits = first.logits[-1:] if rest is None else torch.cat([first.logits[-1:], rest.logits], 0)
        return torch.log_softmax(logits.float(), -1), first.stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", help="only print the table of an earlier run's --out file")
    ap.add_argument("--results", help="a bench run results file holding dense's answers")
    ap.add_argument("--reference", default="dense", help="label of the reference's records in --results")
    ap.add_argument("--data", help="the bench data folder the results were made from")
    ap.add_argument("--datasets", default=None, help="comma-separated (default: every dataset in --data)")
    ap.add_argument("--limit", type=int, default=1, help="conversations per dataset")
    ap.add_argument("--positions", default="front,middle,back")
    ap.add_argument("--configs", nargs="+", help="METHOD[:KNOB=VALUE,...], e.g. loopserve+dense:alpha=0.95")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="bf16-prefill")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-answer", type=int, default=64)
    ap.add_argument("--gold", action="store_true",
                    help="on turns that depend on earlier ones, also score the reference answer (gold_lp: its "
                         "mean log-probability, teacher-forced; gold_top1: its tokens that are the argmax); "
                         "the turn is then prefilled twice, and continues with dense's answer as without it")
    ap.add_argument("--out", default="runs/phase1-divergence.jsonl")
    args = ap.parse_args()
    if args.table:
        with open(args.table, encoding="utf-8") as fh:
            print(table([json.loads(line) for line in fh]))
        return
    if not (args.results and args.data and args.configs):
        ap.error("--results, --data and --configs are required (or --table FILE)")
    configure_threads(args.threads)
    answers = dense_answers(args.results, args.reference)
    data = Path(args.data)
    names = args.datasets.split(",") if args.datasets else sorted(p.stem for p in data.glob("*.jsonl"))
    convs = load_selection(data, names, args.limit)
    engine = Engine(load_model(args.model, dtype=args.dtype), method="dense")
    tok = engine.tokenizer
    configs = {c: parse_method_spec(c) for c in args.configs}
    for name, knobs in configs.values():
        engine.new_session(method=name, knobs=knobs)  # a bad name or knob fails before any work
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    records = []
    for dataset, cs in convs.items():
        for conv in cs:
            for pos in args.positions.split(","):
                reference = Player(engine, "dense", {})
                players = {c: Player(engine, *nk) for c, nk in configs.items()}
                messages: list[dict] = []
                for turn in conv["turns"]:
                    key = (conv["id"], pos, turn["index"])
                    if key not in answers:
                        raise SystemExit(f"{args.results}: no {args.reference} record for {key}")
                    messages = messages + [{"role": "user", "content": turn["user"][pos]}]
                    answer = list(tok(answers[key], add_special_tokens=False)["input_ids"])[: args.max_answer]
                    answer = answer or [next(iter(engine.eos_ids))]
                    # The reference answer is scored first, so that every session ends the turn
                    # holding dense's answer, as without --gold (the next turn builds on it).
                    gold = None
                    if args.gold and turn.get("depends_on") and turn.get("answers"):
                        gold = list(tok(turn["answers"][0], add_special_tokens=False)["input_ids"])[: args.max_answer]
                    if gold:
                        ref_gold = gold_scores(reference.turn(messages, gold)[0], gold)
                    ref, _ = reference.turn(messages, answer, again=bool(gold))
                    ref_top = ref.argmax(-1)
                    for c, player in players.items():
                        if gold:
                            lp, gstats = player.turn(messages, gold)
                            lp_gold, top_gold = gold_scores(lp, gold)
                            gdens = gstats.get("prefill_density") or [1.0]
                        lp, stats = player.turn(messages, answer, again=bool(gold))
                        kl = (ref.exp() * (ref - lp)).sum(-1)
                        dens = stats.get("prefill_density") or [1.0]
                        rec = {"dataset": dataset, "conversation": conv["id"], "position": pos, "turn": turn["index"],
                               "config": c, "top1": float((lp.argmax(-1) == ref_top).float().mean()),
                               "first": bool(lp[0].argmax() == ref_top[0]), "kl": float(kl.mean()),
                               "density": sum(dens) / len(dens), "answer_tokens": len(answer)}
                        if stats.get("recall"):
                            rec["recall"] = list(stats["recall"])
                        if gold:
                            rec.update(gold_lp=lp_gold, gold_top1=top_gold, ref_gold_lp=ref_gold[0], ref_gold_top1=ref_gold[1],
                                       gold_density=sum(gdens) / len(gdens))
                        records.append(rec)
                        with out.open("a", encoding="utf-8") as fh:
                            fh.write(json.dumps(rec) + "\n")
                    messages = messages + [{"role": "assistant", "content": answers[key]}]
                print(f"{dataset} {conv['id']} {pos} done", file=sys.stderr, flush=True)
    print(table(records))


def gold_scores(lp: torch.Tensor, gold: list[int]) -> tuple[float, float]:
    """Mean log-probability of the gold tokens, and the share of them that are the argmax."""
    ids = torch.tensor(gold)
    picked = lp.gather(-1, ids[:, None]).flatten()
    return float(picked.mean()), float((lp.argmax(-1) == ids).float().mean())


def table(records: list[dict]) -> str:
    """Sparse turns only (those where some configuration prefilled sparsely), per position."""
    sparse = {(r["conversation"], r["position"], r["turn"]) for r in records if r["density"] < 1}
    groups = defaultdict(list)
    for r in records:
        if (r["conversation"], r["position"], r["turn"]) in sparse:
            groups[(r["config"], r["position"])].append(r)
            groups[(r["config"], "all")].append(r)
    configs = list(dict.fromkeys(r["config"] for r in records))
    mean = lambda rs, k: sum(float(r[k]) for r in rs) / max(len(rs), 1)  # noqa: E731
    lines = ["| prefill (dense decoding) | turns | KL front | KL middle | KL back | KL all | top-1 agreement | first token | density |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in configs:
        a = groups[(c, "all")]
        kls = " | ".join(f"{mean(groups[(c, p)], 'kl'):.4f}" for p in ("front", "middle", "back"))
        lines.append(f"| {c} | {len(a)} | {kls} | {mean(a, 'kl'):.4f} | {mean(a, 'top1'):.4f} | "
                     f"{sum(r['first'] for r in a)}/{len(a)} | {mean(a, 'density'):.3f} |")
    golds = [r for r in records if "gold_lp" in r]
    if golds:
        lines += ["", "Turns that depend on earlier ones, the reference answer teacher-forced (dense in brackets):", "",
                  "| prefill (dense decoding) | turns | gold log-prob front | middle | back | all | gold tokens top-1 |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for c in configs:
            g = [r for r in golds if r["config"] == c]
            cell = lambda rs: (f"{mean(rs, 'gold_lp'):.3f} ({mean(rs, 'ref_gold_lp'):.3f})" if rs else "-")  # noqa: E731
            per = " | ".join(cell([r for r in g if r["position"] == p]) for p in ("front", "middle", "back"))
            lines.append(f"| {c} | {len(g)} | {per} | {cell(g)} | {mean(g, 'gold_top1'):.3f} ({mean(g, 'ref_gold_top1'):.3f}) |")
    recalls = defaultdict(list)
    for r in records:
        if "recall" in r:
            recalls[r["config"]].append(r["recall"])
    for c, rs in recalls.items():
        per_layer = [sum(x[i] for x in rs) / len(rs) for i in range(min(map(len, rs)))]
        lines.append(f"\n{c}: held-out recall by layer: " + " ".join(f"{x:.2f}" for x in per_layer))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
