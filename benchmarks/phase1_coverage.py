"""Where Phase 1's selection misses attention mass, by layer, head and row region (issue 12).

Replays `turn_recall` conversations (a fact in the first turn, asked for in the last turn, the
question at the front, middle or back of a long new message) with dense's answers from a
`bench run` results file. Every turn is prefilled densely; on the last turn, each layer also
runs LoopServe's selection (`--knobs`, default knobs otherwise) on the same queries and keys,
and compares it with the exact attention of every new row:

- ``coverage``: the share of a row's attention mass that falls on the selected cells;
- ``missed_history`` / ``missed_new``: the mass outside the selection on earlier turns' keys /
  on the new message's keys;
- ``fact_mass`` / ``fact_kept``: the mass the question's rows put on the fact's tokens in the
  first turn, and the share of those tokens the selection keeps as verticals.

Rows are grouped into regions: the question's rows, the 64 rows after it, the other rows of the
message, and the last ``dense_last`` rows (they attend densely in LoopServe; listed for scale).

    python benchmarks/phase1_coverage.py --results docs/results/4k/results-turn-recall.jsonl \\
        --data runs/bench-data/ctx4000-seed0 --limit 6 --threads 2 --out runs/phase1-coverage.json

Uses the engine's public session API and the prefill registry (a diagnostic method registered
here returns dense attention, so the activations are dense's).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from loopserve.attention.base import register_prefill
from loopserve.attention.dense import dense_attention
from loopserve.attention.pattern import pattern_mask
from loopserve.attention.loopserve import LoopServePrefill
from loopserve.bench.runner import load_selection
from loopserve.bench.text import token_span
from loopserve.engine import Engine
from loopserve.engine.registry import parse_knobs
from loopserve.engine.turn import common_prefix
from loopserve.models import load_model
from loopserve.threads import configure as configure_threads

# Set by main() around the last turn's prefill: the question's and the fact's token spans.
CAPTURE: dict = {"on": False}
CAPTURED: list[dict] = []  # one entry per layer of the captured forward


@register_prefill
@dataclass
class CoverageProbe(LoopServePrefill):
    """Dense attention, plus LoopServe's selection measured against it (diagnostics only)."""

    name = "phase1-coverage"
    description = "diagnostic: dense prefill; records where LoopServe's selection misses mass"

    def attend(self, q, k, v, *, layer_idx, scaling, ctx):
        out = dense_attention(q, k, v, scaling)
        if CAPTURE["on"]:
            CAPTURED.append(self.measure(q, k, layer_idx, scaling))
        return out

    def measure(self, q, k, layer_idx, scaling) -> dict:
        n, N = q.shape[-2], k.shape[-2]
        pattern = self.select(q, k, layer_idx=layer_idx, scaling=scaling)
        H, Hkv = q.shape[1], k.shape[1]
        g, off = H // Hkv, N - n
        rows = torch.arange(n)
        causal = torch.arange(N)[None, :] > (off + rows)[:, None]
        qa, qb = CAPTURE["question"][0] - off, CAPTURE["question"][1] - off
        fa, fb = CAPTURE["fact"]
        rec = {"layer": layer_idx, "off": off, "n": n, "coverage": [], "missed_history": [], "missed_new": [],
               "fact_mass": [], "fact_kept": [],
               "question_mass": [], "question_mass_kept": []}
        for h in range(Hkv):
            mask = pattern_mask(pattern, h, rows)
            scores = (q[0, h * g:(h + 1) * g].float() @ k[0, h].float().T) * scaling
            a = torch.softmax(scores.masked_fill(causal, float("-inf")), -1)  # (g, n, N)
            outside = a * ~mask
            rec["coverage"].append((a * mask).sum(-1))  # (g, n)
            rec["missed_history"].append(outside[..., :off].sum(-1))
            rec["missed_new"].append(outside[..., off:].sum(-1))
            rec["fact_mass"].append(float(a[:, qa:qb, fa:fb].sum(-1).mean()))
            rec["fact_kept"].append(float(mask[qa:qb, fa:fb].any(0).float().mean()))
            # the rows after the question (up to the dense last rows): their mass on the
            # question's tokens, and the part of it the selection keeps
            after = slice(qb, max(qb, n - self.dense_last))
            on_q = a[:, after, off + qa:off + qb]
            rec["question_mass"].append(float(on_q.sum(-1).mean()) if on_q.numel() else 0.0)
            rec["question_mass_kept"].append(float((on_q * mask[after, off + qa:off + qb]).sum(-1).mean()) if on_q.numel() else 0.0)
        for key in ("coverage", "missed_history", "missed_new"):
            rec[key] = torch.stack(rec[key])  # (Hkv, g, n)
        return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", required=True, help="bench run results holding dense's answers")
    ap.add_argument("--data", required=True)
    ap.add_argument("--reference", default="dense")
    ap.add_argument("--limit", type=int, default=6)
    ap.add_argument("--positions", default="front,middle,back")
    ap.add_argument("--knobs", default="", help="LoopServe knobs, KNOB=VALUE,... (default knobs otherwise)")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="bf16-prefill")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="runs/phase1-coverage.json")
    args = ap.parse_args()
    configure_threads(args.threads)
    knobs = parse_knobs([kv for kv in args.knobs.split(",") if kv])
    probe = CoverageProbe(**knobs)  # its dense_last and full configuration
    answers = {}
    with open(args.results, encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            if r["method"] == args.reference:
                answers[(r["conversation"], r["position"], r["turn"])] = r["prediction"]
    convs = load_selection(Path(args.data), ["turn_recall"], args.limit)["turn_recall"]
    engine = Engine(load_model(args.model, dtype=args.dtype), method="dense")
    tok = engine.tokenizer
    dense_last = probe.dense_last
    # per (position, region, layer): lists of per-row means; per (layer, kv head): question rows
    agg: dict = defaultdict(list)
    heads: dict = defaultdict(list)
    cases: list[dict] = []
    for conv in convs:
        for pos in args.positions.split(","):
            session = engine.new_session(method="phase1-coverage+dense", knobs=knobs)
            messages: list[dict] = []
            for turn in conv["turns"]:
                messages = messages + [{"role": "user", "content": turn["user"][pos]}]
                prompt = engine.encode_messages(messages)
                keep = common_prefix(session.token_ids, prompt)
                if keep < len(session.token_ids):
                    session.rewind((keep, session.messages, len(session.turns)))
                last = turn is conv["turns"][-1]
                if last:
                    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
                    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
                    if list(enc["input_ids"]) != prompt:
                        raise SystemExit("the offsets' tokenization differs from the engine's")
                    u0 = text.rindex(turn["user"][pos])
                    qs, qe = turn["question_span"][pos]
                    fact = re.search(r"The pass key for the [\w ]+? is \d+\.", text)
                    CAPTURE.update(on=True, question=token_span(enc["offset_mapping"], u0 + qs, u0 + qe),
                                   fact=token_span(enc["offset_mapping"], fact.start(), fact.end()))
                    CAPTURED.clear()
                session.prefill(prompt[keep:])
                CAPTURE["on"] = False
                if last:
                    break
                answer = answers[(conv["id"], pos, turn["index"])]
                session.prefill(list(tok(answer, add_special_tokens=False)["input_ids"]) or [next(iter(engine.eos_ids))])
                messages = messages + [{"role": "assistant", "content": answer}]
            # the measured turn sits on the whole conversation, dense's answers included
            missing = [m for m in messages if m["role"] == "assistant" and m["content"] not in text]
            if missing or sum(m["role"] == "assistant" for m in messages) != len(conv["turns"]) - 1:
                raise SystemExit(f"{conv['id']} {pos}: the last turn's prompt lacks earlier answers")
            cases.append({"conversation": conv["id"], "position": pos, "history_tokens": CAPTURED[0]["off"],
                          "new_tokens": CAPTURED[0]["n"], "answers": len(conv["turns"]) - 1})
            q_a, q_b = CAPTURE["question"]
            for cap in CAPTURED:
                off, n, L = cap["off"], cap["n"], cap["layer"]
                qa, qb = q_a - off, q_b - off
                regions = {"question": (qa, qb), "after question": (qb, min(qb + 64, n - dense_last)),
                           "last rows (dense)": (n - dense_last, n)}
                other = torch.ones(n, dtype=torch.bool)
                for a, b in regions.values():
                    other[max(a, 0):max(b, 0)] = False
                for name, (a, b) in regions.items():
                    if b <= a:
                        continue
                    for key in ("coverage", "missed_history", "missed_new"):
                        agg[(pos, name, key, L)].append(float(cap[key][..., a:b].mean()))
                for key in ("coverage", "missed_history", "missed_new"):
                    agg[(pos, "other rows", key, L)].append(float(cap[key][..., other].mean()))
                for h in range(len(cap["fact_mass"])):
                    heads[(L, h)].append({"position": pos, "fact_mass": cap["fact_mass"][h], "fact_kept": cap["fact_kept"][h],
                                          "question_mass": cap["question_mass"][h],
                                          "question_mass_kept": cap["question_mass_kept"][h],
                                          "question_coverage": float(cap["coverage"][h, :, qa:qb].mean())})
            print(f"{conv['id']} {pos}: question rows {q_a - off}-{q_b - off} of {n}", file=sys.stderr, flush=True)
    layers = sorted({k[3] for k in agg})
    positions = args.positions.split(",")
    summary = {"knobs": knobs, "config": dataclasses.asdict(probe),
               "conversations": len(convs), "positions": positions, "cases": cases, "by_region": {}, "heads": []}
    for (pos, region, key, L), vals in agg.items():
        summary["by_region"].setdefault(pos, {}).setdefault(region, {}).setdefault(key, {})[L] = sum(vals) / len(vals)
    for (L, h), rs in heads.items():
        for pos in positions + ["all"]:
            sel = [r for r in rs if pos in ("all", r["position"])]
            if sel:
                summary["heads"].append({"layer": L, "kv_head": h, "position": pos, **{
                    k: sum(r[k] for r in sel) / len(sel)
                    for k in ("fact_mass", "fact_kept", "question_coverage", "question_mass", "question_mass_kept")}})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))
    plot(summary, out.with_suffix(".png"))
    print(table(summary, layers))
    print(f"\nwrote {out} and {out.with_suffix('.png')}", file=sys.stderr)


def plot(summary: dict, path: Path) -> None:
    """Mass kept per layer, one panel per question position, one line per row region."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    positions = list(summary["by_region"])
    colours = {"question": "C0", "after question": "C1", "last rows (dense)": "C2", "other rows": "C3"}
    fig = Figure(figsize=(4.2 * len(positions), 3.6), tight_layout=True)
    FigureCanvasAgg(fig)
    for i, pos in enumerate(positions):
        ax = fig.add_subplot(1, len(positions), i + 1)
        for region, keys in summary["by_region"][pos].items():
            layers = sorted(keys["coverage"], key=int)
            ax.plot([int(L) for L in layers], [keys["coverage"][L] for L in layers], marker=".", label=region,
                    color=colours.get(region))
        ax.set_title(f"question at the {pos}")
        ax.set_xlabel("layer")
        ax.set_ylabel("attention mass kept by the selection")
        ax.grid(alpha=0.3)
    handles = {h.get_label(): h for ax in fig.axes for h in ax.get_lines()}
    fig.axes[0].legend([handles[r] for r in colours if r in handles], [r for r in colours if r in handles], fontsize=8)
    fig.savefig(path, dpi=110)


def table(summary: dict, layers: list[int]) -> str:
    lines = ["| position | rows | coverage | missed on history keys | missed on new keys | lowest-coverage layers |",
             "|---|---|---:|---:|---:|---|"]
    for pos, regions in summary["by_region"].items():
        for region, keys in regions.items():
            cov = keys["coverage"]
            worst = sorted(cov, key=cov.get)[:3]
            mean = lambda d: sum(d.values()) / len(d)  # noqa: E731
            lines.append(f"| {pos} | {region} | {mean(cov):.3f} | {mean(keys['missed_history']):.3f} | "
                         f"{mean(keys['missed_new']):.3f} | " + ", ".join(f"{L} ({cov[L]:.2f})" for L in worst) + " |")
    every = [r for r in summary["heads"] if r["position"] == "all"]
    top = sorted(every, key=lambda r: -r["fact_mass"])[:10]
    lines += ["", "Heads whose question rows put the most mass on the first turn's fact:", "",
              "| layer | KV head | fact mass (question rows) | fact tokens kept as verticals | question rows' coverage |",
              "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['layer']} | {r['kv_head']} | {r['fact_mass']:.3f} | {r['fact_kept']:.2f} | {r['question_coverage']:.3f} |"
              for r in top]
    lines += ["", "Rows after the question: their mass on the question's tokens, and the part the selection keeps", "",
              "| position | heads | mass on the question | kept | lost |", "|---|---:|---:|---:|---:|"]
    for pos in summary["positions"]:
        rs = [r for r in summary["heads"] if r["position"] == pos]
        m, kept = sum(r["question_mass"] for r in rs) / len(rs), sum(r["question_mass_kept"] for r in rs) / len(rs)
        lines.append(f"| {pos} | {len(rs)} | {m:.3f} | {kept:.3f} | {m - kept:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
