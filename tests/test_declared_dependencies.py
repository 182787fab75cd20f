"""Every third-party module the package, the scripts and the benchmarks import is declared
in pyproject.toml (a dependency or an extra), so no script fails on a missing import."""

import ast
import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Import name -> distribution name, where they differ.
DISTRIBUTION = {"yaml": "pyyaml", "rouge_score": "rouge-score"}


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503: prometheus_client == prometheus-client


def _requirement_name(req: str) -> str:
    for stop in "[<>=!~ ;":
        req = req.split(stop)[0]
    return _normalized(req.strip())


def _declared() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    reqs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    return {_requirement_name(r) for r in reqs}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_every_imported_third_party_module_is_declared():
    declared = _declared()
    files = [*(REPO / "src").rglob("*.py"), *(REPO / "benchmarks").glob("*.py"), *(REPO / "scripts").glob("*.py")]
    assert any(f.name == "load.py" for f in files)
    missing = {}
    for path in files:
        for name in _imports(path) - set(sys.stdlib_module_names) - {"loopserve", "__future__"}:
            if _normalized(DISTRIBUTION.get(name, name)) not in declared:
                missing.setdefault(name, []).append(str(path.relative_to(REPO)))
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
