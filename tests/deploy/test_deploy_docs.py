"""docs/deploy.md against the code: its settings table lists every CTRSERVE_* setting with its default,
and the metrics it names are the gateway's."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
from deploy_checks import settings_classes
from kustomize_lite import REPO

pytestmark = pytest.mark.quick

DOC = REPO / "docs" / "deploy.md"


def _default(field: Any) -> str:
    d = field.default
    if d is None:
        return "unset"
    if isinstance(d, bool):
        return str(d).lower()
    if isinstance(d, Path):  # checkout-independent: relative to the repository
        return "<repo>/" + os.path.relpath(d, REPO)
    return str(d)


def test_docs_list_every_setting_with_its_default() -> None:
    rows = dict(re.findall(r"^\| `(CTRSERVE_[A-Z0-9_]+)` \| `([^`]*)` \|", DOC.read_text(), re.M))
    expected = {}
    for cls in settings_classes():
        prefix = cls.model_config["env_prefix"]
        for name, field in cls.model_fields.items():
            expected[(prefix + name).upper()] = _default(field)
    assert rows == expected, (
        f"docs/deploy.md settings table is out of date: missing {sorted(expected.keys() - rows)}, unknown "
        f"{sorted(rows.keys() - expected)}, wrong defaults {sorted(k for k in rows if rows[k] != expected.get(k))}")


def test_docs_name_real_metrics() -> None:
    """Every metric the docs name is on the gateway's /metrics registry (the feature store's item
    cache included), and the docs name every one of them."""
    from ctrserve.service.metrics import Metrics

    suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_sum", "_count", "_created"],
                "gauge": [""]}
    families = list(Metrics().registry.collect())
    names = {f.name + s for f in families for s in ["", *suffixes.get(f.type, [])]}
    mentioned = set(re.findall(r"\bctrserve_[a-z0-9_]+", DOC.read_text()))
    assert mentioned, "docs/deploy.md names no metric"
    assert mentioned <= names, f"docs/deploy.md names metrics the code does not export: {sorted(mentioned - names)}"
    bases = {re.sub(r"_(total|created|bucket|sum|count)$", "", n) for n in mentioned}
    missing = {f.name for f in Metrics().registry.collect()} - bases
    assert not missing, f"docs/deploy.md does not mention the gateway metrics {sorted(missing)}"
