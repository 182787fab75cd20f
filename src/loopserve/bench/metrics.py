"""Answer-quality metrics for the multi-turn benchmark.

Every metric maps ``(prediction, gold) -> float`` in ``[0, 1]``; :func:`score`
takes the maximum over several gold answers, as LongBench does.

The normalisation is LongBench's ``normalize_answer`` (itself SQuAD's): lowercase,
strip ASCII punctuation, drop the articles *a/an/the*, collapse whitespace. Keeping
it byte-for-byte compatible lets our F1 numbers be compared with published ones.

Metric names (``METRICS``; a few aliases are accepted, see ``ALIASES``):

``f1``            LongBench ``qa_f1_score``: token-level F1 after normalisation.
``rouge_l``       ROUGE-L F-measure from the ``rouge-score`` package.
``exact_match``   normalised prediction == normalised gold.
``mc_accuracy``   first option letter A-D in the prediction == gold letter.
``gsm_accuracy``  last number in the prediction == gold number.
``accuracy``      picks one of the three above from the gold's shape.
``substring``     normalised gold occurs in the normalised prediction on word
                  boundaries (retrieval: pass keys, short extractive answers).
``edit_sim``      1 - Levenshtein(pred, gold) / max(len(pred), len(gold)).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from fractions import Fraction
from functools import lru_cache

__all__ = [
    "ALIASES",
    "METRICS",
    "accuracy",
    "edit_similarity",
    "exact_match",
    "extract_choice",
    "extract_last_number",
    "gsm_accuracy",
    "levenshtein",
    "mc_accuracy",
    "normalize_answer",
    "qa_f1",
    "resolve_metric",
    "rouge_l",
    "score",
    "substring_match",
]

_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """LongBench/SQuAD answer normalisation.

    Same steps in the same order as LongBench ``metrics.normalize_answer``:
    lowercase, remove punctuation, remove articles, collapse whitespace.
    """
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _token_f1(pred_tokens: Sequence[str], gold_tokens: Sequence[str]) -> float:
    common = Counter(pred_tokens) & Counter(gold_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, gold: str) -> float:
    """Token F1 after :func:`normalize_answer` (LongBench ``qa_f1_score``).

    One deliberate deviation: two answers that are both empty after
    normalisation score 1.0 (identical), where LongBench returns 0.
    """
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not pred_tokens and not gold_tokens:
        return 1.0
    return _token_f1(pred_tokens, gold_tokens)


@lru_cache(maxsize=1)
def _rouge_scorer():
    # Imported lazily: rouge-score pulls in nltk/absl, which costs ~0.5 s at import.
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"])


def rouge_l(prediction: str, gold: str) -> float:
    """ROUGE-L F-measure (``rouge_score.RougeScorer(['rougeL'])``, no stemming).

    rouge-score tokenises to lowercase ASCII alphanumerics, so text with no such
    characters scores 0.
    """
    return float(_rouge_scorer().score(gold, prediction)["rougeL"].fmeasure)


def exact_match(prediction: str, gold: str) -> float:
    """1.0 when the normalised strings are equal."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


# An option letter that stands alone: not part of a word ("Apple", "BDI") and not a
# lowercase letter. "A" directly followed by a lowercase word is the English
# article ("A good answer is C"), so it is skipped.
_CHOICE = re.compile(r"(?<![A-Za-z0-9])([A-D])(?![A-Za-z0-9'])")
_ARTICLE_A = re.compile(r"A\s+[a-z]")


def extract_choice(text: str) -> str | None:
    """First multiple-choice option letter (A-D) in ``text``, or None.

    Accepts the usual shapes a model answers with: ``"B"``, ``"(B)"``, ``"B."``,
    ``"B) ..."``, ``"Answer: B"``, ``"The answer is B"``.
    """
    for match in _CHOICE.finditer(text):
        letter = match.group(1)
        if letter == "A" and _ARTICLE_A.match(text, match.start()):
            continue
        return letter
    return None


def mc_accuracy(prediction: str, gold: str) -> float:
    """1.0 when the first option letter of the prediction is the gold letter.

    The gold may be a bare letter (``"B"``) or an option as L-Eval stores it
    (``"(B) Their subconscious ..."``).
    """
    gold_letter = extract_choice(gold)
    if gold_letter is None:
        raise ValueError(f"mc_accuracy: gold answer {gold!r} contains no option letter A-D")
    return float(extract_choice(prediction) == gold_letter)


# Thousands separators are only honoured in groups of three ("1,234"), so a list
# such as "3,4" yields two numbers, not 34.
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def extract_last_number(text: str) -> Fraction | None:
    """Last number in ``text`` (commas as thousands separators), exactly, or None."""
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    return Fraction(matches[-1].replace(",", ""))


def gsm_accuracy(prediction: str, gold: str) -> float:
    """1.0 when the last number in the prediction equals the gold number.

    Compared as exact fractions, so ``"18.00"`` equals ``"18"``.
    """
    gold_number = extract_last_number(gold)
    if gold_number is None:
        raise ValueError(f"gsm_accuracy: gold answer {gold!r} contains no number")
    return float(extract_last_number(prediction) == gold_number)


_NUMERIC_GOLD = re.compile(r"\s*-?[\d,]+(?:\.\d+)?\s*")
# "B", "(B) option text", "B. option text", "B) option text"; not "A dog".
_MC_GOLD = re.compile(r"[A-D]|\([A-D]\).*|[A-D][.)]\s.*", flags=re.S)


def accuracy(prediction: str, gold: str) -> float:
    """Exact-match accuracy whose flavour follows the gold's shape.

    A gold that is an option (``"B"``, ``"(B) ..."``) is scored with
    :func:`mc_accuracy`, a numeric gold with :func:`gsm_accuracy`, anything else
    with :func:`exact_match`.
    """
    stripped = gold.strip()
    if _MC_GOLD.fullmatch(stripped):
        return mc_accuracy(prediction, gold)
    if _NUMERIC_GOLD.fullmatch(gold):
        return gsm_accuracy(prediction, gold)
    return exact_match(prediction, gold)


def substring_match(prediction: str, gold: str) -> float:
    """1.0 when the normalised gold occurs in the normalised prediction.

    Matching is on word boundaries so that the pass key ``"1234"`` is not found
    in ``"12345"``. An empty (after normalisation) gold never matches.
    """
    gold_norm = normalize_answer(gold)
    if not gold_norm:
        return 0.0
    return float(f" {gold_norm} " in f" {normalize_answer(prediction)} ")


def levenshtein(a: str, b: str) -> int:
    """Character edit distance (insert, delete, substitute; unit costs)."""
    if len(a) < len(b):
        a, b = b, a  # keep the DP row over the shorter string
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(
                min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb))
            )
        previous = current
    return previous[-1]


def edit_similarity(prediction: str, gold: str) -> float:
    """``1 - levenshtein / max(len)``; 1.0 for two empty strings."""
    longest = max(len(prediction), len(gold))
    if longest == 0:
        return 1.0
    return 1.0 - levenshtein(prediction, gold) / longest


METRICS: dict[str, Callable[[str, str], float]] = {
    "f1": qa_f1,
    "rouge_l": rouge_l,
    "exact_match": exact_match,
    "mc_accuracy": mc_accuracy,
    "gsm_accuracy": gsm_accuracy,
    "accuracy": accuracy,
    "substring": substring_match,
    "edit_sim": edit_similarity,
}

ALIASES: dict[str, str] = {
    "qa_f1": "f1",
    "qa_f1_score": "f1",
    "rouge": "rouge_l",
    "rougeL": "rouge_l",
    "rouge-l": "rouge_l",
    "em": "exact_match",
    "substring_match": "substring",
    "string_match": "substring",
    "edit_similarity": "edit_sim",
    "code_sim": "edit_sim",
}


def resolve_metric(name: str) -> str:
    """Canonical metric name for ``name`` (aliases allowed); ValueError if unknown."""
    canonical = ALIASES.get(name, name)
    if canonical not in METRICS:
        known = ", ".join(sorted(METRICS))
        raise ValueError(f"unknown metric {name!r}; known metrics: {known}")
    return canonical


def score(metric_name: str, prediction: str, golds: Sequence[str] | str) -> float:
    """Score ``prediction`` with ``metric_name``, taking the max over ``golds``.

    ``golds`` is a list of acceptable answers (a single string is accepted too).
    Raises ValueError naming the metric when it is unknown or ``golds`` is empty.
    """
    fn = METRICS[resolve_metric(metric_name)]
    if isinstance(golds, str):
        golds = [golds]
    if not golds:
        raise ValueError(f"metric {metric_name!r}: no gold answers given")
    if prediction is None:
        prediction = ""
    return max(fn(prediction, gold) for gold in golds)
