"""Paired difference between two configurations of a `bench run` results set (issue 12):
fidelity to the reference's answers (ROUGE-L, as `bench report`) and score, turn by turn on
the same turns, with a 95% bootstrap interval over conversations (2,000 resamples, seed 0),
overall, by dependency and by question position.

    python benchmarks/paired_fidelity.py --reference docs/results/4k/results-dense.jsonl:dense \
        docs/results/4k/results-loopserve.jsonl:loopserve \
        docs/results/4k/results-loopserve-history.jsonl:loopserve-history

Means are over turns (not per dataset first, as the report's are); each row also gives both
configurations' own fidelity on those turns. ``--datasets`` and ``--metric`` keep only some
turns, e.g. the recall turns of `turn_recall` (``--datasets turn_recall --metric substring``:
its Δ score is the difference in the share of keys found).
"""

from __future__ import annotations

import argparse
import json
import random
from collections import defaultdict

from loopserve.bench.report import fidelity


def load(spec: str) -> dict[tuple, dict]:
    """`file:label` -> records of that label, by (dataset, conversation, position, turn)."""
    path, label = spec.rsplit(":", 1)
    out = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            if r["method"] == label:
                out[(r["dataset"], r["conversation"], r["position"], r["turn"])] = r
    if not out:
        raise SystemExit(f"{spec}: no records with label {label!r}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", required=True, help="file:label of the reference (dense)")
    ap.add_argument("a", help="file:label")
    ap.add_argument("b", help="file:label (the difference is a minus b)")
    ap.add_argument("--datasets", help="comma-separated: only these datasets")
    ap.add_argument("--metric", help="only turns scored by this metric (e.g. substring: turn_recall's recall turns)")
    args = ap.parse_args()
    ref, a, b = load(args.reference), load(args.a), load(args.b)
    datasets = set(args.datasets.split(",")) if args.datasets else None
    by_conv = defaultdict(list)  # (dataset, conversation) -> per-turn differences
    for key, r in ref.items():
        if (datasets is not None and key[0] not in datasets) or (args.metric and r["metric"] != args.metric):
            continue
        if key in a and key in b:
            fa, fb = fidelity(a[key]["prediction"], r["prediction"]), fidelity(b[key]["prediction"], r["prediction"])
            by_conv[key[:2]].append({"fid": fa - fb, "fid_a": fa, "fid_b": fb, "score": a[key]["score"] - b[key]["score"],
                                     "dependent": bool(r["depends_on"]), "position": key[2]})
    convs = sorted(by_conv)
    groups = {"all": lambda t: True, "dependent": lambda t: t["dependent"], "independent": lambda t: not t["dependent"]}
    groups |= {p: (lambda t, p=p: t["position"] == p) for p in ("front", "middle", "back")}
    rng = random.Random(0)
    samples = [[rng.choice(convs) for _ in convs] for _ in range(2000)]
    label = lambda spec: spec.rsplit(":", 1)[1]  # noqa: E731
    print(f"| {label(args.a)} − {label(args.b)} | turns | fidelity of each | Δ fidelity [95% CI] | Δ score [95% CI] |")
    print("|---|---:|---:|---:|---:|")
    for name, keep in groups.items():
        def means(cs, fields=("fid", "score")):
            ts = [t for c in cs for t in by_conv[c] if keep(t)]
            return (*(sum(t[f] for t in ts) / len(ts) for f in fields), len(ts)) if ts else None
        whole = means(convs, ("fid", "score", "fid_a", "fid_b"))
        if whole is None:  # no turn of this group (e.g. no independent turn under --metric)
            continue
        fid, score, fid_a, fid_b, n = whole
        each = f"{fid_a:.3f} / {fid_b:.3f}"
        boot = [m for m in map(means, samples) if m is not None]
        lo, hi = int(0.025 * len(boot)), int(0.975 * len(boot)) - 1
        f, s = sorted(m[0] for m in boot), sorted(m[1] for m in boot)
        print(f"| {name} | {n} | {each} | {fid:+.3f} [{f[lo]:+.3f}, {f[hi]:+.3f}] | {score:+.3f} [{s[lo]:+.3f}, {s[hi]:+.3f}] |")


if __name__ == "__main__":
    main()
