"""Metrics on known examples (LongBench-compatible normalisation and F1)."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loopserve.bench.metrics import (
    METRICS,
    accuracy,
    edit_similarity,
    exact_match,
    extract_choice,
    extract_last_number,
    gsm_accuracy,
    levenshtein,
    mc_accuracy,
    normalize_answer,
    qa_f1,
    rouge_l,
    score,
    substring_match,
)


def test_normalize_answer_matches_longbench_steps():
    assert normalize_answer("The  Quick, brown fox!") == "quick brown fox"
    assert normalize_answer("An apple a day") == "apple day"
    # Articles only as whole words; punctuation removed before article removal.
    assert normalize_answer("Theater, another anthem") == "theater another anthem"
    assert normalize_answer("  ") == ""


def test_f1_identical_disjoint_partial():
    assert qa_f1("Paris is the capital", "Paris is the capital") == 1.0
    assert qa_f1("London", "Paris") == 0.0
    # Articles, case and punctuation are ignored.
    assert qa_f1("The Eiffel Tower!", "eiffel tower") == 1.0
    # precision 1/2, recall 1 -> 2/3
    assert qa_f1("cat sat", "cat") == pytest.approx(2 / 3)
    assert qa_f1("", "cat") == 0.0
    assert qa_f1("", "the") == 1.0  # both empty after normalisation


def test_rouge_l_bounds():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    assert rouge_l("completely different words", "the cat sat on the mat") == 0.0
    partial = rouge_l("the cat lay on a rug", "the cat sat on the mat")
    assert 0.0 < partial < 1.0


def test_exact_match_is_normalised():
    assert exact_match("The Answer.", "answer") == 1.0
    assert exact_match("answer here", "answer") == 0.0


@pytest.mark.parametrize(
    "text, letter",
    [
        ("B", "B"),
        ("(C)", "C"),
        ("Answer: D", "D"),
        ("The answer is B.", "B"),
        ("A. Analyze and predict future trends", "A"),
        ("A good choice is (C) because", "C"),  # leading article "A" skipped
        ("I think D) is right", "D"),
        ("Based on the story, option B.", "B"),
        ("no letter here", None),
        ("ABBA and BDI", None),  # letters inside words do not count
    ],
)
def test_extract_choice(text, letter):
    assert extract_choice(text) == letter


def test_mc_accuracy_with_letter_and_option_golds():
    assert mc_accuracy("(B) Their subconscious knew", "B") == 1.0
    assert mc_accuracy("B", "(B) Their subconscious knew that Korvin was insoluble.") == 1.0
    assert mc_accuracy("The answer is C", "B") == 0.0
    assert mc_accuracy("I do not know", "B") == 0.0
    with pytest.raises(ValueError, match="mc_accuracy"):
        mc_accuracy("B", "not an option")


def test_extract_last_number_and_gsm_accuracy():
    assert extract_last_number("3 + 4 = 7. The answer is 1,234.") == 1234
    assert extract_last_number("costs $18.00") == 18
    assert extract_last_number("a drop of -5 degrees") == -5
    assert extract_last_number("ratio 3,4") == 4  # not a thousands separator
    assert extract_last_number("0.5") == Fraction(1, 2)
    assert extract_last_number("no digits") is None
    assert gsm_accuracy("16 - 3 - 4 = 9 eggs, 9 * 2 = 18. The answer is 18", "18") == 1.0
    assert gsm_accuracy("The answer is 18 dollars, not 20", "18") == 0.0
    assert gsm_accuracy("", "18") == 0.0


def test_accuracy_dispatches_on_gold_shape():
    assert accuracy("The answer is (B)", "B") == 1.0
    assert accuracy("so the total is 52", "52") == 1.0
    assert accuracy("Green Bay Packers", "green bay packers.") == 1.0
    assert accuracy("A dog", "A dog") == 1.0  # "A dog" is not an option gold


def test_substring_match_on_word_boundaries():
    assert substring_match("The pass key is 12345.", "12345") == 1.0
    assert substring_match("The pass key is 123456.", "12345") == 0.0
    assert substring_match("It was in the 10th and 11th centuries.", "10th and 11th centuries") == 1.0
    assert substring_match("FRANCE!", "France") == 1.0
    assert substring_match("anything", "the") == 0.0  # empty gold after normalisation


def test_edit_similarity():
    assert edit_similarity("abc", "abc") == 1.0
    assert edit_similarity("", "") == 1.0
    assert edit_similarity("abc", "") == 0.0
    assert levenshtein("kitten", "sitting") == 3
    assert edit_similarity("kitten", "sitting") == pytest.approx(1 - 3 / 7)


def test_score_takes_max_over_golds_and_accepts_aliases():
    assert score("f1", "Paris", ["London", "Paris"]) == 1.0
    assert score("substring", "It is 42.", "42") == 1.0
    assert score("rougeL", "a b c", ["a b c"]) == pytest.approx(1.0)
    assert score("em", "Yes.", ["yes", "no"]) == 1.0
    assert score("edit_similarity", "abc", ["abd", "xyz"]) == pytest.approx(2 / 3)


def test_score_errors_name_the_metric():
    with pytest.raises(ValueError, match="bleu"):
        score("bleu", "x", ["x"])
    with pytest.raises(ValueError, match="f1"):
        score("f1", "x", [])


def test_every_metric_scores_a_gold_against_itself_as_one():
    golds = {
        "f1": "tropical rain forest",
        "rouge_l": "the report recommends more funding",
        "exact_match": "Denver Broncos",
        "mc_accuracy": "C",
        "gsm_accuracy": "115",
        "accuracy": "B",
        "substring": "71432",
        "edit_sim": "def f(x): return x",
    }
    assert set(golds) == set(METRICS)
    for name, gold in golds.items():
        assert score(name, gold, [gold]) == pytest.approx(1.0), name


text = st.text(alphabet="ab c.,The", max_size=30)


@settings(max_examples=150, deadline=None)
@given(text, text)
def test_metric_ranges_and_symmetry(a, b):
    assert 0.0 <= qa_f1(a, b) <= 1.0
    assert qa_f1(a, b) == pytest.approx(qa_f1(b, a))
    assert 0.0 <= edit_similarity(a, b) <= 1.0
    assert levenshtein(a, b) == levenshtein(b, a)
    assert levenshtein(a, b) <= max(len(a), len(b))
    assert (levenshtein(a, b) == 0) == (a == b)
