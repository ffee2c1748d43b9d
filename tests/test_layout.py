"""The repository keeps its promises about layout and generated docs."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
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
    from ctrserve.models.train.results import RESULTS_JSON, RESULTS_MD, load_results, render_markdown

    if not RESULTS_JSON.exists():
        pytest.skip("no docs/results.json yet")
    assert RESULTS_MD.read_text() == render_markdown(load_results(RESULTS_JSON)), (
        "docs/results.md is stale or hand-edited: run `ctrserve results`"
    )


def test_cli_starts_without_torch() -> None:
    """The serving image has no torch: importing the CLI must not import it."""
    code = "import sys, ctrserve.cli; assert 'torch' not in sys.modules, 'torch imported by the CLI'"
    subprocess.run([sys.executable, "-c", code], check=True)
