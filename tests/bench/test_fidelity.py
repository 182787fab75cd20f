"""`loopserve bench fidelity` on a tiny model: dense against itself is identical, several
methods share the same dense references, and bad names fail before any work."""

from __future__ import annotations

import pytest

from loopserve import threads
from loopserve.bench.fidelity import fidelity_prompts, run_fidelity
from loopserve.engine import Engine
from loopserve.models import load_model


@pytest.fixture(scope="module")
def engine():
    return Engine(load_model("tiny-llama"), method="dense")


def test_dense_matches_itself_and_methods_share_references(engine):
    r = run_fidelity(engine, ["dense", "dense+snapkv"], knobs={"budget": 64}, context=400, count=2,
                     max_new_tokens=8, position="front")
    assert r["by_method"]["dense"] == {"rouge_l_vs_dense": 1.0, "identical_answers": 2}
    assert r["rouge_l_vs_dense"] == 1.0 and r["method"] == "dense"
    assert r["threads"] == threads.budget() and r["dtype"] == "float32"
    assert set(r["rows"][0]["methods"]) == {"dense", "dense+snapkv"}
    assert 0.0 <= r["by_method"]["dense+snapkv"]["rouge_l_vs_dense"] <= 1.0
    assert "vs_fp32" not in r  # float32 numerics: nothing to compare with


def test_other_numerics_are_compared_with_fp32_per_method():
    mixed = Engine(load_model("tiny-llama", dtype="bf16-prefill"), method="dense")
    r = run_fidelity(mixed, ["dense+snapkv"], knobs={"budget": 64}, context=400, count=2, max_new_tokens=8)
    assert r["dtype"] == "bf16-prefill" and set(r["vs_fp32"]) == {"dense", "dense+snapkv"}
    fp32 = run_fidelity(Engine(load_model("tiny-llama"), method="dense"), ["dense+snapkv"], knobs={"budget": 64},
                        context=400, count=2, max_new_tokens=8)
    # The per-prompt figures are the agreement of the two runs' answers, method by method.
    from loopserve.bench.report import fidelity

    for row, base in zip(r["rows"], fp32["rows"]):
        assert row["vs_fp32"]["dense"]["rouge_l"] == fidelity(row["dense"], base["dense"])
        assert row["vs_fp32"]["dense+snapkv"]["rouge_l"] == fidelity(row["methods"]["dense+snapkv"]["answer"],
                                                                       base["methods"]["dense+snapkv"]["answer"])


def test_question_position_and_bad_input(engine):
    back = fidelity_prompts(engine.tokenizer, 300, 1, "back")[0]
    front = fidelity_prompts(engine.tokenizer, 300, 1, "front")[0]
    assert back.index("Question:") > len(back) // 2 > front.index("Question:")
    with pytest.raises(ValueError, match="position"):
        fidelity_prompts(engine.tokenizer, 300, 1, "middle")
    with pytest.raises(ValueError):
        run_fidelity(engine, ["dense", "no-such-method"], count=1)
    with pytest.raises(ValueError, match="apply to none"):
        run_fidelity(engine, ["dense", "dense+snapkv"], knobs={"alpha": 0.5}, count=1)
