"""The benchmark builder on the real evaluation data (the copy shipped in the package)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from loopserve.bench import (
    DATASETS,
    POSITIONS,
    DatasetFormatError,
    build_conversations,
    build_datasets,
    dataset_info,
    dataset_path,
    iter_conversations,
    load_dataset,
)
from loopserve.bench.metrics import METRICS, resolve_metric, score
from loopserve.bench.sources import DataDirError, resolve_data_dir
from loopserve.sourcedata import source_file

N = 8000
K = 2


def count_tokens(text: str) -> int:
    """Cheap stand-in for a tokenizer: whitespace words * 1.3."""
    return int(len(text.split()) * 1.3)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    out = tmp_path_factory.mktemp("bench")
    paths = build_datasets(
        out, context_tokens=N, seed=0, count_tokens=count_tokens, conversations_per_dataset=K
    )
    return out, paths


@pytest.fixture(scope="module")
def conversations(built) -> dict[str, list[dict]]:
    _, paths = built
    return {name: load_dataset(path) for name, path in paths.items()}


def _squash(text: str) -> str:
    return " ".join(text.split())


def test_data_is_found():
    assert (resolve_data_dir() / "leval").is_dir()


def test_registry_covers_the_task_families():
    assert len(DATASETS) == 12  # the paper's 11 shapes plus turn_recall
    tasks = {info.task for info in DATASETS.values()}
    assert tasks == {"single_doc_qa", "multi_doc_qa", "summarization", "few_shot", "synthetic_retrieval"}
    for name, info in DATASETS.items():
        assert resolve_metric(info.metric) in METRICS, name
        assert info.max_new_tokens > 0 and info.license and info.description
        assert source_file(resolve_data_dir(), info.source).is_file(), info.source


def test_builds_all_datasets(built):
    out, paths = built
    assert set(paths) == set(DATASETS)
    for name, path in paths.items():
        assert path == dataset_path(out, name) and path.is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["datasets"]) == set(DATASETS)


def test_record_fields(conversations):
    for name, convs in conversations.items():
        info = DATASETS[name]
        assert len(convs) == K
        for conv in convs:
            assert conv["dataset"] == name and conv["id"].startswith(name)
            assert conv["source"] == info.source and conv["metric"] == info.metric
            assert conv["max_new_tokens"] == info.max_new_tokens
            for turn in conv["turns"]:
                # turn_recall scores its summary turns with ROUGE-L, its recall turn by the key
                assert turn["metric"] == info.metric or (name, turn["metric"]) == ("turn_recall", "rouge_l")
                assert turn["answers"] and all(a.strip() for a in turn["answers"])
                # Each gold is a perfect answer under the dataset's metric.
                assert score(turn["metric"], turn["answers"][0], turn["answers"]) == pytest.approx(1.0)


def test_three_to_five_turns(conversations):
    for name, convs in conversations.items():
        for conv in convs:
            assert 3 <= len(conv["turns"]) <= 5, conv["id"]


def test_question_positions(conversations):
    for name, convs in conversations.items():
        for conv in convs:
            for turn in conv["turns"]:
                question = turn["question"]
                reference = _squash(f"{conv['instruction']} {turn['context']}")
                for pos in POSITIONS:
                    text = turn["user"][pos]
                    s, e = turn["question_span"][pos]
                    assert question in text[s:e], (conv["id"], pos)
                    # Removing the question block leaves instruction + context, intact.
                    assert _squash(text[:s] + " " + text[e:]) == reference, (conv["id"], pos)
                    if pos == "front":
                        assert s == 0
                    elif pos == "back":
                        assert e == len(text)
                    else:
                        centre = (s + e) / 2 / len(text)
                        assert 0.35 < centre < 0.65, (conv["id"], centre)
                        assert s > 0.25 * len(text) and len(text) - e > 0.25 * len(text)


def test_a_third_of_turns_depend_on_history(conversations):
    for name, convs in conversations.items():
        if name == "turn_recall":  # by design one dependent turn: the last, at the longest distance
            assert all(sum(bool(t["depends_on"]) for t in c["turns"]) == 1 for c in convs)
            continue
        turns = [t for c in convs for t in c["turns"]]
        dependent = [t for t in turns if t["depends_on"]]
        assert len(dependent) * 3 >= len(turns), name
        for t in turns:
            assert all(0 <= j < t["index"] for j in t["depends_on"])


def test_dependencies_point_at_the_needed_context(conversations):
    for conv in conversations["passkey"]:
        turns = conv["turns"]
        for t in turns:
            key = t["answers"][0]
            source = t["depends_on"][0] if t["depends_on"] else t["index"]
            assert key in turns[source]["context"]
            if t["depends_on"]:
                assert key not in t["context"]  # only the history has it
    for conv in conversations["squad_multi"]:
        turns = conv["turns"]
        for t in turns:
            source = t["depends_on"][0] if t["depends_on"] else t["index"]
            assert any(a in turns[source]["context"] for a in t["answers"])
    for name in ("qasper", "nq", "multidoc_qa", "financial_qa", "qmsum", "gov_report", "multi_news", "quality_mc"):
        for conv in conversations[name]:
            turns = conv["turns"]
            for t in turns:
                label = re.search(r"((?:Article|Page|Document|Transcript|Report|News group|Story) \d+)", t["question"])
                assert label, t["question"]
                header = f"{label.group(1)}:\n"
                source = t["depends_on"][0] if t["depends_on"] else t["index"]
                assert header in turns[source]["context"], (conv["id"], t["index"])
                if t["depends_on"]:
                    assert header not in t["context"]
    for conv in conversations["gsm_fewshot"]:
        for t in conv["turns"]:
            assert t["depends_on"] == list(range(t["index"]))


def test_total_length_near_target(conversations):
    for name, convs in conversations.items():
        for conv in convs:
            for pos in POSITIONS:
                total = sum(count_tokens(t["user"][pos]) for t in conv["turns"])
                assert abs(total / N - 1) <= 0.15, (conv["id"], pos, total)
            per_turn = [t["user_tokens"] for t in conv["turns"]]
            assert sum(per_turn) == conv["user_tokens"]
            # each turn carries about N / turns
            assert max(per_turn) <= 1.5 * N / len(per_turn), (conv["id"], per_turn)


def test_same_seed_same_bytes_other_seed_differs(built, tmp_path):
    out, paths = built
    names = list(DATASETS)
    again = build_datasets(
        tmp_path / "same", context_tokens=N, seed=0, count_tokens=count_tokens,
        conversations_per_dataset=K, datasets=names,
    )
    for name in names:
        assert again[name].read_bytes() == paths[name].read_bytes(), name
    assert (tmp_path / "same" / "manifest.json").read_bytes() == (out / "manifest.json").read_bytes()
    other = build_datasets(
        tmp_path / "other", context_tokens=N, seed=1, count_tokens=count_tokens,
        conversations_per_dataset=K, datasets=["qasper", "passkey"],
    )
    for name in other:
        assert other[name].read_bytes() != paths[name].read_bytes(), name


def test_subset_build_matches_full_build(built, tmp_path):
    # A conversation depends only on (seed, dataset, index), not on what else is built.
    _, paths = built
    one = build_datasets(
        tmp_path, context_tokens=N, seed=0, count_tokens=count_tokens,
        conversations_per_dataset=K, datasets=["gov_report"],
    )
    assert one["gov_report"].read_bytes() == paths["gov_report"].read_bytes()


def test_other_lengths_fit(tmp_path):
    for n_tokens in (2000, 16000):
        convs = build_conversations(
            "qmsum", context_tokens=n_tokens, seed=3, count_tokens=count_tokens, conversations=1
        )
        total = sum(count_tokens(t["user"]["back"]) for t in convs[0]["turns"])
        assert abs(total / n_tokens - 1) <= 0.15, (n_tokens, total)


def test_unknown_dataset_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark dataset 'hotpot'.*qasper"):
        build_datasets(tmp_path, datasets=["qasper", "hotpot"], count_tokens=count_tokens)
    assert not list(tmp_path.iterdir())  # nothing written before failing
    with pytest.raises(ValueError, match="passkey"):
        dataset_info("nope")


def test_missing_data_dir_is_an_error(tmp_path):
    with pytest.raises(DataDirError, match="data directory not found"):
        build_conversations("qasper", context_tokens=N, data_dir=tmp_path / "missing")


def test_malformed_lines_name_file_and_line(built, tmp_path):
    _, paths = built
    good = paths["passkey"].read_text().splitlines()
    bad = tmp_path / "bad.jsonl"

    bad.write_text(good[0] + "\n" + "{not json\n")
    with pytest.raises(DatasetFormatError, match=r"bad\.jsonl:2: invalid JSON"):
        load_dataset(bad)

    record = json.loads(good[1])
    del record["turns"][1]["answers"]
    bad.write_text(good[0] + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DatasetFormatError, match=r"bad\.jsonl:2: turn 1: missing field 'answers'"):
        load_dataset(bad)

    record = json.loads(good[0])
    record["turns"][2]["depends_on"] = [2]
    bad.write_text(json.dumps(record) + "\n")
    with pytest.raises(DatasetFormatError, match=r"bad\.jsonl:1: turn 2: 'depends_on'"):
        load_dataset(bad)

    record = json.loads(good[0])
    record["metric"] = "bleu"
    bad.write_text(json.dumps(record) + "\n")
    with pytest.raises(DatasetFormatError, match=r"bad\.jsonl:1: .*unknown metric 'bleu'"):
        load_dataset(bad)

    bad.write_text(good[0] + "\n\n" + good[1] + "\n")
    with pytest.raises(DatasetFormatError, match=r"bad\.jsonl:2: blank line"):
        list(iter_conversations(bad))


def test_turn_recall_plants_the_key_first_and_asks_for_it_last(conversations):
    for conv in conversations["turn_recall"]:
        turns = conv["turns"]
        key = turns[-1]["answers"][0]
        assert len(key) == 5 and key.isdigit()
        assert key in turns[0]["context"] and not any(key in t["context"] for t in turns[1:])
        assert turns[-1]["depends_on"] == [0] and turns[-1]["metric"] == "substring"
        assert all(t["depends_on"] == [] and t["metric"] == "rouge_l" for t in turns[:-1])
        assert "first message" in turns[-1]["question"]


def test_token_span_covers_every_token_touching_the_characters():
    from loopserve.bench.text import token_span

    offsets = [(0, 0), (0, 3), (3, 4), (4, 9), (9, 10)]  # a special token of width 0 first
    assert token_span(offsets, 4, 9) == (3, 4)
    assert token_span(offsets, 2, 5) == (1, 4)  # partly covered tokens count
    assert token_span(offsets, 9, 10) == (4, 5)
    with pytest.raises(ValueError, match="20-25"):
        token_span(offsets, 20, 25)
