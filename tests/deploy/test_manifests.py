"""Every YAML in deploy/ parses (Kubernetes documents carry apiVersion and kind), and the routing
example validates with the gateway's loader."""

from __future__ import annotations

from pathlib import Path

import pytest
from deploy_checks import DEPLOY, K8S
from kustomize_lite import load_docs

pytestmark = pytest.mark.quick

ALL_YAML = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_parses(path: Path) -> None:
    docs = load_docs(path)
    assert docs, f"{path}: no YAML document"
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: a document is {type(doc).__name__}, not a mapping"
        if path.is_relative_to(K8S):
            assert {"apiVersion", "kind"} <= doc.keys(), f"{path}: a Kubernetes document lacks apiVersion/kind"


def test_routing_example_validates() -> None:
    from ctrserve.service.routing import load_config

    load_config(DEPLOY / "routing.example.yaml")
