"""The repository keeps its promises about layout and generated docs."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_FILE_LINES, MAX_FUNCTION_LINES = 450, 80
PACKAGE_DIRS = {"ctrserve": "ctrserve", "ctrserve.models": "models", "ctrserve.service": "service",
                "ctrserve.export": "export", "ctrserve.feature_store": "feature_store",
                "ctrserve.loadtests": "loadtests"}

pytestmark = pytest.mark.quick


def test_every_package_folder_is_listed_in_pyproject() -> None:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert cfg["package-dir"] == PACKAGE_DIRS
    listed = set(cfg["packages"])
    found = set()
    for pkg, folder in PACKAGE_DIRS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([pkg, *rel.parts]))
    assert found == listed, f"missing from pyproject: {sorted(found - listed)}; stale: {sorted(listed - found)}"


def test_results_markdown_is_generated_from_json() -> None:
    from ctrserve.models.train.results import RESULTS_JSON, RESULTS_MD, load_results, markdown_for

    assert RESULTS_JSON.exists(), "docs/results.json is missing"
    assert RESULTS_MD.read_text() == markdown_for(load_results(RESULTS_JSON), RESULTS_MD), (
        "docs/results.md is stale or hand-edited: run `ctrserve results`"
    )


def test_cli_starts_without_torch() -> None:
    """The serving image has no torch: importing the CLI must not import it."""
    code = "import sys, ctrserve.cli; assert 'torch' not in sys.modules, 'torch imported by the CLI'"
    subprocess.run([sys.executable, "-c", code], check=True)


def _sources() -> list[Path]:
    return sorted(p for folder in [*PACKAGE_DIRS.values(), "tests"] for p in (ROOT / folder).rglob("*.py"))


def test_modules_and_functions_stay_short() -> None:
    """No module over 450 lines and no function over 80, tests included (readable units)."""
    import ast

    long_files, long_functions = [], []
    for path in _sources():
        text = path.read_text()
        rel = path.relative_to(ROOT)
        if text.count("\n") > MAX_FILE_LINES:
            long_files.append(f"{rel} ({text.count(chr(10))} lines)")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long_functions.append(f"{rel}:{node.lineno} {node.name} ({n} lines)")
    assert not long_files, f"modules over {MAX_FILE_LINES} lines: {long_files}"
    assert not long_functions, f"functions over {MAX_FUNCTION_LINES} lines: {long_functions}"


def test_the_benchmarks_are_no_larger_than_the_product() -> None:
    """loadtests/ holds the benchmarks users run, not finished experiments: no larger than service/."""
    def lines(folder: str) -> int:
        return sum(p.read_text().count("\n") for p in (ROOT / folder).rglob("*.py"))

    assert lines("loadtests") <= lines("service"), (lines("loadtests"), lines("service"))
