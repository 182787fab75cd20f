"""The report's statistics: the conversation bootstrap, paired intervals, exact agreement,
the dependent / independent split and the trivial baseline."""

from __future__ import annotations

import random

import pytest

from loopserve.bench.report import agrees, summarize, trivial_baseline
from loopserve.bench.stats import cluster_bootstrap, macro_estimate

from .test_report import rec


def test_bootstrap_of_identical_conversations_is_degenerate():
    e = cluster_bootstrap({"a": [[0.5, 0.5], [0.5]], "b": [[1.0]]})
    assert e.mean == pytest.approx(0.75) and e.lo == pytest.approx(0.75) and e.hi == pytest.approx(0.75)
    assert (e.turns, e.conversations) == (4, 3)
    assert cluster_bootstrap({"a": [[]]}) is None


def test_bootstrap_interval_covers_the_truth_at_about_the_nominal_rate():
    # 40 conversations of 3 turns, per-conversation means spread around 0.5: the 95%
    # interval of the mean should contain 0.5 in most of 60 independent experiments.
    rng = random.Random(1)
    hits = 0
    for trial in range(60):
        convs = []
        for _ in range(40):
            mu = rng.gauss(0.5, 0.2)
            convs.append([mu + rng.gauss(0, 0.1) for _ in range(3)])
        e = cluster_bootstrap({"d": convs}, replicates=500, seed=trial)
        assert e.lo < e.mean < e.hi
        hits += e.contains(0.5)
    assert hits >= 51  # nominal 57 of 60; a naive turn-level or broken interval falls well short


def test_bootstrap_resamples_conversations_not_turns():
    # Two conversations: one all ones, one all zeros. Resampling whole conversations can
    # draw both copies of the same one, so the interval reaches the extremes 0 and 1.
    e = cluster_bootstrap({"d": [[1.0] * 10, [0.0] * 10]}, replicates=400)
    assert e.lo == 0.0 and e.hi == 1.0


def test_strata_keep_equal_weight():
    records = [rec("dense", "nq", "back", t, 1.0, conv=f"nq-{c}") for c in range(3) for t in range(4)]
    records += [rec("dense", "qasper", "back", 0, 0.0, conv=f"qasper-{c}") for c in range(3)]
    e = macro_estimate(records, lambda r: r["score"])
    assert e.mean == pytest.approx(0.5) and e.lo == pytest.approx(0.5) and e.hi == pytest.approx(0.5)


def _paired(deltas_by_conv: list[list[float]], method="m"):
    out = []
    for c, deltas in enumerate(deltas_by_conv):
        for t, d in enumerate(deltas):
            out.append(rec("dense", "nq", "front", t, 0.5, pred=f"ref {c} {t}", conv=f"nq-{c}"))
            out.append(rec(method, "nq", "front", t, 0.5 + d, pred=f"ref {c} {t}" if d == 0 else "other", conv=f"nq-{c}"))
    return out


def test_paired_delta_interval_excludes_zero_only_for_a_consistent_loss():
    consistent = summarize(_paired([[-0.2, -0.1], [-0.3, -0.2], [-0.1, -0.2], [-0.2, -0.2]]))
    row = next(r for r in consistent["averages"] if r["position"] == "all" and r["method"] == "m")
    lo, hi = row["score_delta_ci"]["ci"]
    assert row["score_delta_ci"]["mean"] == pytest.approx(-0.1875) and hi < 0
    mixed = summarize(_paired([[-0.4, -0.4], [0.4, 0.4], [-0.4, 0.4], [0.0, 0.0]]))
    row = next(r for r in mixed["averages"] if r["position"] == "all" and r["method"] == "m")
    lo, hi = row["score_delta_ci"]["ci"]
    assert lo < 0 < hi


def test_exact_agreement_normalises_answers():
    assert agrees("The Eiffel Tower.", "eiffel tower") and not agrees("Paris", "London")
    recs = _paired([[0.0, 0.1], [0.0, 0.0]])
    row = next(r for r in summarize(recs)["averages"] if r["position"] == "all" and r["method"] == "m")
    assert row["agreement"] == pytest.approx(0.75)  # 3 of the 4 answers equal dense's


def test_dependent_and_independent_turns_are_split():
    records = []
    for c in range(3):
        records += [rec("dense", "nq", "back", 0, 1.0, conv=f"nq-{c}", depends_on=[]),
                    rec("dense", "nq", "back", 1, 1.0, conv=f"nq-{c}", depends_on=[0]),
                    rec("evict", "nq", "back", 0, 1.0, conv=f"nq-{c}", depends_on=[]),
                    rec("evict", "nq", "back", 1, 0.0, conv=f"nq-{c}", pred="lost", depends_on=[0])]
    s = summarize(records)
    rows = {(r["dependency"], r["method"]): r for r in s["by_dependency"] if r["position"] == "all"}
    assert rows[("dependent", "evict")]["score_delta_ci"]["mean"] == pytest.approx(-1.0)
    assert rows[("independent", "evict")]["score_delta_ci"]["mean"] == pytest.approx(0.0)
    assert rows[("dependent", "evict")]["turns"] == 3


def test_trivial_baseline_is_blind_to_each_conversations_golds():
    # Every conversation has its own unique key: nothing content-free can score.
    keys = [rec("dense", "passkey", "back", 0, 1.0, conv=f"p-{c}", golds=[str(10000 + c)], metric="substring")
            for c in range(4)]
    assert trivial_baseline(keys)["score"] == 0.0
    # A multiple-choice dataset where "A" is always right: the constant answer scores 1.
    mc = [rec("dense", "quality_mc", "back", 0, 1.0, conv=f"q-{c}", golds=["A"], metric="mc_accuracy") for c in range(4)]
    assert trivial_baseline(mc) == {"answerer": "most common other gold", "score": 1.0}


def test_signal_mark_needs_the_reference_clearly_above_trivial():
    keys = [rec("dense", "passkey", "back", 0, 1.0, conv=f"p-{c}", golds=[str(10000 + c)], metric="substring")
            for c in range(4)]
    mc = [rec("dense", "quality_mc", "back", 0, float(c % 2), conv=f"q-{c}", golds=["A"], metric="mc_accuracy")
          for c in range(4)]
    s = summarize(keys + mc)
    assert s["signal"]["passkey"]["signal"] is True
    assert s["signal"]["quality_mc"]["signal"] is False  # 0.5 against a constant "A" that scores 1.0


def test_head_to_head_marks_clear_differences():
    records = _paired([[-0.5, -0.5]] * 4, method="loopserve")
    records += [dict(r, method="snapkv") for r in records if r["method"] == "dense"]  # snapkv equals dense
    s = summarize(records)
    comp = {(c["versus"], c["position"]): c for c in s["comparisons"] if c["method"] == "loopserve"}
    assert comp[("snapkv", "all")]["mean"] == pytest.approx(-0.5) and comp[("snapkv", "all")]["clear"]
    assert {c["method"] for c in s["comparisons"]} == {"loopserve"}
