"""Every third-party module the package, the scripts and the benchmarks import is declared
in pyproject.toml (a dependency or an extra), so no script fails on a missing import."""

import ast
import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Import name -> distribution name, where they differ.
DISTRIBUTION = {"yaml": "pyyaml", "rouge_score": "rouge-score", "llama_cpp": "llama-cpp-python"}


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


def _optional(tree: ast.AST) -> set[int]:
    """ids of import nodes inside `try: ... except ImportError` (optional by construction:
    the script runs without them, e.g. flash_attn in the GPU benchmark)."""
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
            isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError") for h in node.handlers
        ):
            ids |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return ids


def _imports(path: Path) -> set[str]:
    """Top-level modules `path` imports, less optional ones and the scripts next to it."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    optional = _optional(tree)
    siblings = {p.stem for p in path.parent.glob("*.py")}
    names = set()
    for node in ast.walk(tree):
        if id(node) in optional:
            continue
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names - siblings


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


def test_optional_and_sibling_imports_are_not_dependencies(tmp_path):
    (tmp_path / "helper.py").write_text("X = 1\n")
    script = tmp_path / "script.py"
    script.write_text("import numpy\nfrom helper import X\ntry:\n    import flash_attn\nexcept ImportError:\n"
                      "    flash_attn = None\nimport notinstalled_pkg\n")
    assert _imports(script) == {"numpy", "notinstalled_pkg"}
