"""The dataset registry: one entry per dataset, its facts and its recipe.

Adding a dataset: a builder module next to this one (or an existing builder) and one
entry below. ``DATASETS`` (name -> :class:`DatasetInfo`) is the public view.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import gsm, leval, passkey, squad, turn_recall
from .common import Dataset, DatasetInfo, Recipe

__all__ = ["DATASETS", "REGISTRY", "dataset_info", "dataset_path"]

_LEVAL = "GPL-3.0 (L-Eval repository)"

REGISTRY: dict[str, Dataset] = {
    "qasper": Dataset(
        DatasetInfo(
            "single_doc_qa", "f1",
            "Questions on NLP papers (Qasper via L-Eval); one paper per turn, follow-ups on earlier papers.",
            "leval/Open-ended-tasks/scientific_qa.jsonl", f"{_LEVAL}; Qasper content: CC BY 4.0", 64),
        Recipe(
            leval.BUILDER,
            "You are given scientific articles and a question about one of them. Answer the "
            "question as concisely as you can, using a single phrase or sentence if possible. "
            'If the question cannot be answered from the article, write "unanswerable". If it '
            'is a yes/no question, answer "yes", "no", or "unanswerable". Do not provide any '
            "explanation.",
            label="Article",
        ),
    ),
    "nq": Dataset(
        DatasetInfo(
            "single_doc_qa", "f1",
            "Natural Questions over Wikipedia pages (L-Eval); one page per turn, follow-ups on earlier pages.",
            "leval/Open-ended-tasks/natural_question.jsonl", f"{_LEVAL}; Natural Questions content: CC BY-SA 3.0", 32),
        Recipe(
            leval.BUILDER,
            "You are given Wikipedia pages and a question about one of them. Answer the "
            "question based on that page. Only give me the answer and do not output any "
            "other words.",
            label="Page",
        ),
    ),
    "multidoc_qa": Dataset(
        DatasetInfo(
            "multi_doc_qa", "f1",
            "Help-center questions over several government service documents (MultiDoc2Dial via L-Eval).",
            "leval/Open-ended-tasks/multidoc_qa.jsonl", f"{_LEVAL}; MultiDoc2Dial content: Apache-2.0", 64),
        Recipe(
            leval.BUILDER,
            "You are given documents from government service websites and a question about "
            "one of them. Answer the question briefly, in one or two sentences, based on "
            "that document.",
            label="Document",
        ),
    ),
    "financial_qa": Dataset(
        DatasetInfo(
            "single_doc_qa", "f1",
            "Questions on earnings-call transcripts (L-Eval financial_qa); one transcript per turn.",
            "leval/Open-ended-tasks/financial_qa.jsonl", f"{_LEVAL}; transcripts: terms of the original publishers", 128),
        Recipe(
            leval.BUILDER,
            "You are given transcripts of financial results conference calls and a question "
            "about one of them. Answer as a member of that call, in a few sentences.",
            label="Transcript",
        ),
    ),
    "squad_multi": Dataset(
        DatasetInfo(
            "multi_doc_qa", "substring",
            "SQuAD v2 questions among distractor paragraphs (RULER qa_1 style); the answer paragraph may be in an earlier turn.",
            "ruler_sources/squad.json", "CC BY-SA 4.0 (SQuAD 2.0)", 32),
        Recipe(
            squad.BUILDER,
            "Answer the question based on the passages given in this conversation. Only give "
            "me the answer and do not output any other words.",
        ),
    ),
    "qmsum": Dataset(
        DatasetInfo(
            "summarization", "rouge_l",
            "Query-based meeting summarization (QMSum via L-Eval meeting_summ); one transcript per turn.",
            "leval/Open-ended-tasks/meeting_summ.jsonl", f"{_LEVAL}; QMSum content: MIT", 200),
        Recipe(
            leval.BUILDER,
            "You are given meeting transcripts and a query about one of them. Answer the "
            "query in one or more sentences, based on that transcript.",
            question_format="Query: {question}",
            label="Transcript",
        ),
    ),
    "gov_report": Dataset(
        DatasetInfo(
            "summarization", "rouge_l",
            "Summaries of government reports (GovReport via L-Eval); a later turn may ask for an earlier report.",
            "leval/Open-ended-tasks/gov_report_summ.jsonl", f"{_LEVAL}; GovReport content: public US government reports", 200),
        Recipe(
            leval.BUILDER,
            "You are given reports by government agencies. Write a one-page summary of the "
            "report you are asked about.",
            question_format="Task: {question}",
            label="Report",
            locate=False,
            summary="Write a one-page summary of {ref}.",
        ),
    ),
    "multi_news": Dataset(
        DatasetInfo(
            "summarization", "rouge_l",
            "Multi-document news summarization (Multi-News via L-Eval news_summ).",
            "leval/Open-ended-tasks/news_summ.jsonl", f"{_LEVAL}; Multi-News content: terms of the original publishers", 200),
        Recipe(
            leval.BUILDER,
            "You are given groups of news passages. Write a one-page summary of all the "
            "news in the group you are asked about.",
            question_format="Task: {question}",
            label="News group",
            locate=False,
            summary="Write a one-page summary of all the news in {ref}.",
        ),
    ),
    "gsm_fewshot": Dataset(
        DatasetInfo(
            "few_shot", "gsm_accuracy",
            "GSM8K problems with the 16-shot chain-of-thought prompt spread over the turns (L-Eval gsm100).",
            "leval/Closed-ended-tasks/gsm100.jsonl", f"{_LEVAL}; GSM8K content: MIT", 128),
        Recipe(
            gsm.BUILDER,
            'Solve the grade-school math problem marked "Question to solve", following the '
            "worked examples. Think step by step and end with \"The answer is\" and the number.",
            question_format="Question to solve: {question}\nLet's think step by step.",
        ),
    ),
    "quality_mc": Dataset(
        DatasetInfo(
            "single_doc_qa", "mc_accuracy",
            "Four-option multiple-choice questions on stories (QuALITY via L-Eval); one story per turn.",
            "leval/Closed-ended-tasks/quality.jsonl", f"{_LEVAL}; QuALITY content: CC BY 4.0", 8),
        Recipe(
            leval.BUILDER,
            "You are given stories and a multiple-choice question about one of them. Answer "
            "with the letter (A, B, C or D) of the correct option only.",
            label="Story",
        ),
    ),
    "passkey": Dataset(
        DatasetInfo(
            "synthetic_retrieval", "substring",
            "Named 5-digit pass keys planted in Paul Graham essays, one per turn; a later turn may ask for an earlier key.",
            "ruler_sources/PaulGrahamEssays.json", "essays (c) Paul Graham, redistributed by RULER (Apache-2.0 code); test use", 16),
        Recipe(
            passkey.BUILDER,
            "There is important information hidden inside a lot of irrelevant text. Find it "
            "and memorize it; you may be asked about it now or later. Answer with the pass "
            "key only.",
        ),
    ),
    "turn_recall": Dataset(
        DatasetInfo(
            "synthetic_retrieval", "substring",
            "A pass key planted in the first turn's news passages, asked for in the last turn after "
            "summary turns in between (Multi-News via L-Eval news_summ); summaries scored with ROUGE-L.",
            "leval/Open-ended-tasks/news_summ.jsonl",
            f"{_LEVAL}; Multi-News content: terms of the original publishers", 64),
        Recipe(
            turn_recall.BUILDER,
            # No word of the pass key here: this instruction is repeated in every turn, and
            # the small model then answers every summary task with the key.
            "You are given news passages, one group per message, and a task about them.",
            question_format="Task: {question}",
        ),
    ),
}

DATASETS: dict[str, DatasetInfo] = {name: entry.info for name, entry in REGISTRY.items()}


def dataset_info(name: str) -> DatasetInfo:
    """Registry entry of ``name``; ValueError listing the known names otherwise."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(
            f"unknown benchmark dataset {name!r}; known datasets: {', '.join(DATASETS)}"
        ) from None


def dataset_path(out_dir: str | os.PathLike, name: str) -> Path:
    """Path of dataset ``name``'s JSONL file in ``out_dir`` (name validated)."""
    dataset_info(name)
    return Path(out_dir) / f"{name}.jsonl"
