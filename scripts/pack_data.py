"""Rebuild the evaluation data shipped in src/loopserve/data from a full copy of the sources.

    python scripts/pack_data.py SOURCE_DIR [OUT_DIR]

SOURCE_DIR holds the upstream files as the data README lists them (leval/, ruler_sources/).
Only the files and fields that LoopServe's readers use are kept (see DATA_FILES), each
written xz-compressed next to the same relative path with ``.xz`` appended, so that the
benchmark built from the shipped copy is byte-identical to the one built from the full
sources (tests/bench/test_packaged_data.py checks this where a full copy is present).
"""

from __future__ import annotations

import argparse
import json
import lzma
import sys
from pathlib import Path

LEVAL_FIELDS = ("input", "instructions", "outputs", "evaluation")
# L-Eval files read by the benchmark builders and `bench fidelity`.
LEVAL_FILES = [
    "leval/Open-ended-tasks/scientific_qa.jsonl",
    "leval/Open-ended-tasks/natural_question.jsonl",
    "leval/Open-ended-tasks/multidoc_qa.jsonl",
    "leval/Open-ended-tasks/financial_qa.jsonl",
    "leval/Open-ended-tasks/meeting_summ.jsonl",
    "leval/Open-ended-tasks/gov_report_summ.jsonl",
    "leval/Open-ended-tasks/news_summ.jsonl",
    "leval/Closed-ended-tasks/quality.jsonl",
]
GSM = "leval/Closed-ended-tasks/gsm100.jsonl"
SQUAD = "ruler_sources/squad.json"
ESSAYS = "ruler_sources/PaulGrahamEssays.json"
DATA_FILES = [*LEVAL_FILES, GSM, SQUAD, ESSAYS]
LICENSES = {
    "leval/LICENSE.upstream-GPL-3.0.txt": "leval/LICENSE.upstream-GPL-3.0.txt",
}


def _rows(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def trim_leval(rows: list[dict]) -> list[dict]:
    return [{k: row[k] for k in LEVAL_FIELDS if k in row} for row in rows]


def trim_gsm(rows: list[dict]) -> list[dict]:
    # Every record repeats the same 16-shot prompt; the reader takes it from the first.
    return [
        {**({"input": row["input"]} if i == 0 else {}), "instructions": row["instructions"], "outputs": row["outputs"]}
        for i, row in enumerate(rows)
    ]


def trim_squad(data: dict) -> dict:
    # Unanswerable questions are never asked; a paragraph without answerable ones stays as
    # an empty placeholder so that article / paragraph indices (recorded in `origin`) hold.
    articles = []
    for article in data["data"]:
        paragraphs = []
        for para in article["paragraphs"]:
            qas = [
                {"id": qa["id"], "question": qa["question"], "answers": [{"text": a["text"]} for a in qa["answers"]]}
                for qa in para["qas"]
                if not qa.get("is_impossible") and qa["answers"]
            ]
            paragraphs.append({"context": para["context"], "qas": qas} if qas else {"qas": []})
        articles.append({"paragraphs": paragraphs})
    return {"data": articles}


def pack(source: Path, out: Path) -> list[Path]:
    written = []

    def write(rel: str, text: str) -> None:
        path = out / f"{rel}.xz"
        path.parent.mkdir(parents=True, exist_ok=True)
        with lzma.open(path, "wt", encoding="utf-8", preset=9 | lzma.PRESET_EXTREME) as fh:
            fh.write(text)
        written.append(path)

    for rel in LEVAL_FILES:
        write(rel, _jsonl(trim_leval(_rows(source / rel))))
    write(GSM, _jsonl(trim_gsm(_rows(source / GSM))))
    with (source / SQUAD).open(encoding="utf-8") as fh:
        write(SQUAD, json.dumps(trim_squad(json.load(fh)), ensure_ascii=False))
    with (source / ESSAYS).open(encoding="utf-8") as fh:
        write(ESSAYS, json.dumps({"text": json.load(fh)["text"]}, ensure_ascii=False))
    for src, dst in LICENSES.items():
        (out / dst).parent.mkdir(parents=True, exist_ok=True)
        (out / dst).write_bytes((source / src).read_bytes())
        written.append(out / dst)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", type=Path, help="full copy of the sources (with leval/ and ruler_sources/)")
    ap.add_argument("out", type=Path, nargs="?", default=Path(__file__).resolve().parents[1] / "src/loopserve/data")
    args = ap.parse_args(argv)
    missing = [rel for rel in DATA_FILES if not (args.source / rel).is_file()]
    if missing:
        print(f"error: {args.source} lacks {', '.join(missing)}", file=sys.stderr)
        return 2
    for path in pack(args.source, args.out):
        print(f"{path.stat().st_size:>9,}  {path.relative_to(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
