"""The README and docs: links stay inside the repository, one command style, chat defaults as coded."""

import re
from pathlib import Path

from loopserve.cli import CHAT_REPETITION_PENALTY, CHAT_TEMPERATURE, CHAT_TOP_P

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "src" / "loopserve" / "data" / "README.md"]


def test_relative_links_resolve_inside_the_repository():
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)\)", doc.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+://", target):
                continue
            path = (doc.parent / target).resolve()
            assert path.is_relative_to(REPO), f"{doc.name}: link {target} leaves the repository"
            assert path.exists(), f"{doc.name}: link {target} is broken"


def test_commands_use_the_activated_venv_style():
    for doc in DOCS:
        for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", doc.read_text(encoding="utf-8"), flags=re.S):
            for line in block.splitlines():
                assert not re.match(r"\s*\.venv/bin/(?!activate)", line), f"{doc.name}: {line}"
    assert "source .venv/bin/activate" in (REPO / "README.md").read_text(encoding="utf-8")


def test_readme_states_the_chat_sampling_defaults():
    readme = " ".join((REPO / "README.md").read_text(encoding="utf-8").split())
    stated = f"temperature {CHAT_TEMPERATURE}, top-p {CHAT_TOP_P} and repetition penalty {CHAT_REPETITION_PENALTY}"
    assert stated in readme
