"""Confidence intervals for the benchmark report: a paired, conversation-level bootstrap.

The turns of one conversation are not independent (they share a history, and a
method that loses an early context loses every later question about it), so the
resampling unit is the **conversation**, not the turn. Resampling is stratified by
dataset: every bootstrap replicate draws, for each dataset, as many conversations as
it has (with replacement), so every dataset keeps its weight in the macro average
(each dataset's mean over its turns, then the mean over datasets: the statistic the
report's headline shows).

"Paired" means a per-turn value is computed from two methods' records of the *same*
turn (a score difference, ROUGE-L between the two answers, exact agreement) before
resampling, so the interval reflects the disagreement between methods on the same
inputs rather than the spread of the inputs themselves.

A dataset with a single conversation contributes no sampling variance: its interval
is degenerate and the report says how many conversations each cell has.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

__all__ = ["DEFAULT_REPLICATES", "Estimate", "cluster_bootstrap", "macro_estimate"]

#: Bootstrap replicates per interval: enough for stable 2.5/97.5 percentiles.
DEFAULT_REPLICATES = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class Estimate:
    """A macro mean with its bootstrap interval and how much data it rests on."""

    mean: float
    lo: float
    hi: float
    turns: int
    conversations: int

    def excludes(self, value: float = 0.0) -> bool:
        """Whether the interval lies entirely on one side of ``value`` (a clear difference)."""
        return self.lo > value or self.hi < value

    def contains(self, value: float) -> bool:
        return self.lo <= value <= self.hi

    def as_dict(self) -> dict:
        return {"mean": self.mean, "ci": [self.lo, self.hi], "turns": self.turns,
                "conversations": self.conversations}


def cluster_bootstrap(clusters: dict[str, list[list[float]]], *, replicates: int = DEFAULT_REPLICATES,
                      seed: int = 0, level: float = LEVEL) -> Estimate | None:
    """Macro mean over strata of per-stratum turn means, with a percentile interval.

    ``clusters`` maps a stratum (dataset) to its clusters (conversations), each a list
    of per-turn values. Empty clusters and strata are ignored; None if nothing is left.
    The seed is fixed so a report is reproducible byte for byte.
    """
    strata = [[np.asarray(c, dtype=float) for c in cs if len(c)] for cs in clusters.values()]
    strata = [cs for cs in strata if cs]
    if not strata:
        return None
    rng = np.random.default_rng(seed)
    point = np.mean([np.concatenate(cs).mean() for cs in strata])
    boot = np.zeros(replicates)
    for cs in strata:
        sums = np.array([c.sum() for c in cs])
        counts = np.array([len(c) for c in cs], dtype=float)
        k = len(cs)
        draws = rng.multinomial(k, np.full(k, 1.0 / k), size=replicates)  # (replicates, k)
        boot += (draws @ sums) / (draws @ counts)
    boot /= len(strata)
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(boot, [tail, 100 - tail])
    # Percentiles of a degenerate distribution can drift by an ulp from the point estimate.
    lo, hi = min(float(lo), float(point)), max(float(hi), float(point))
    return Estimate(float(point), lo, hi, sum(len(c) for cs in strata for c in cs), sum(len(cs) for cs in strata))


def macro_estimate(records: Iterable[dict], value: Callable[[dict], float | None], **kw) -> Estimate | None:
    """Bootstrap the macro mean of ``value(record)`` over records grouped by dataset and
    conversation. Records whose value is None are left out."""
    clusters: dict[str, dict[str, list[float]]] = {}
    for r in records:
        v = value(r)
        if v is None:
            continue
        clusters.setdefault(r["dataset"], {}).setdefault(r["conversation"], []).append(float(v))
    return cluster_bootstrap({d: list(cs.values()) for d, cs in clusters.items()}, **kw)
