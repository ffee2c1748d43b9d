"""A small kustomize renderer for the tests, used when kubectl is not installed: enough of
kustomize for deploy/k8s (resources, components, config/secret generators with merge,
strategic-merge patches keyed by ``name``, ``$patch: delete``, JSON6902 add/replace/remove,
namespace, images, labels). Generated names keep no hash suffix; references stay consistent.
``test_lite_renderer_agrees_with_kubectl`` compares it with the real kustomize when available."""

from __future__ import annotations

import base64
import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "ClusterRole", "ClusterRoleBinding", "StorageClass"}


def load_docs(path: Path) -> list[Any]:
    with open(path) as fh:
        return [d for d in yaml.safe_load_all(fh) if d is not None]


def render_kubectl(path: Path) -> list[dict] | None:
    """``kubectl kustomize`` (kustomize built in), or None when kubectl is not installed."""
    if shutil.which("kubectl") is None:
        return None
    res = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        raise AssertionError(f"kubectl kustomize {path} failed:\n{res.stderr}")
    return [d for d in yaml.safe_load_all(res.stdout) if d]


def render_lite(path: Path) -> list[dict]:
    k = yaml.safe_load((path / "kustomization.yaml").read_text())
    docs: list[dict] = []
    for res in k.get("resources", []):
        target = path / res
        docs += render_lite(target) if target.is_dir() else copy.deepcopy(load_docs(target))
    for comp in k.get("components", []):  # after the resources, before this kustomization's own changes
        _apply(path / comp, yaml.safe_load((path / comp / "kustomization.yaml").read_text()), docs)
    _apply(path, k, docs)
    if "namespace" in k:
        for d in docs:
            if d["kind"] not in CLUSTER_SCOPED:
                d["metadata"]["namespace"] = k["namespace"]
    return docs


def _apply(path: Path, k: dict, docs: list[dict]) -> None:
    """Generators, patches, images and labels of one kustomization (or component) on ``docs``."""
    for kind, key in (("ConfigMap", "configMapGenerator"), ("Secret", "secretGenerator")):
        for gen in k.get(key, []):
            data = dict(lit.split("=", 1) for lit in gen.get("literals", []))
            for env in gen.get("envs", []):
                data.update(ln.split("=", 1) for ln in (path / env).read_text().splitlines()
                            if ln.strip() and not ln.startswith("#"))
            if kind == "Secret":
                data = {k2: base64.b64encode(v.encode()).decode() for k2, v in data.items()}
            existing = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == gen["name"]]
            if gen.get("behavior") == "merge":
                assert existing, f"{path}: merge into missing {kind} {gen['name']}"
                existing[0].setdefault("data", {}).update(data)
            else:
                assert not existing, f"{path}: {kind} {gen['name']} generated twice"
                doc = {"apiVersion": "v1", "kind": kind, "metadata": {"name": gen["name"]}, "data": data}
                if kind == "Secret":
                    doc["type"] = "Opaque"
                docs.append(doc)
    for patch in k.get("patches", []):
        text = (path / patch["path"]).read_text() if "path" in patch else patch["patch"]
        body = yaml.safe_load(text)
        target = patch.get("target") or {"kind": body["kind"], "name": body["metadata"]["name"]}
        hits = [d for d in docs if d["kind"] == target["kind"] and d["metadata"]["name"] == target["name"]]
        assert hits, f"{path}: patch target {target} not found"
        for doc in hits:
            if isinstance(body, list):
                _json6902(doc, body)
            elif body.get("$patch") == "delete":
                docs.remove(doc)
            else:
                merged = _merge(doc, body)
                doc.clear()
                doc.update(merged)
    for image in k.get("images", []):
        for d in docs:
            spec = d.get("spec", {}).get("template", {}).get("spec", {})
            for c in spec.get("containers", []) + spec.get("initContainers", []):
                name, _, tag = c["image"].partition(":")
                if name == image["name"]:
                    c["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}".rstrip(":")
    for label in k.get("labels", []):
        for d in docs:
            d["metadata"].setdefault("labels", {}).update(label["pairs"])


def _merge(base: Any, patch: Any) -> Any:
    """Strategic merge, as far as these manifests need: maps recurse, ``None`` deletes, lists of
    maps with ``name`` merge by name, other lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            elif key in out:
                out[key] = _merge(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
        return out
    if isinstance(base, list) and isinstance(patch, list) and all(isinstance(x, dict) and "name" in x
                                                                   for x in base + patch):
        out = [copy.deepcopy(x) for x in base]
        for item in patch:
            idx = next((i for i, x in enumerate(out) if x["name"] == item["name"]), None)
            if idx is None:
                out.append(copy.deepcopy({k: v for k, v in item.items() if v is not None}))
            else:
                out[idx] = _merge(out[idx], item)
        return out
    return copy.deepcopy(patch)


def _json6902(doc: dict, ops: list[dict]) -> None:
    for op in ops:
        *parents, leaf = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].strip("/").split("/")]
        node: Any = doc
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        if op["op"] == "test":  # the patch guards what it replaces (kustomize fails the build)
            found = node[int(leaf)] if isinstance(node, list) else node.get(leaf)
            assert found == op["value"], f"JSON6902 test of {op['path']}: {found!r} != {op['value']!r}"
            continue
        if isinstance(node, list):
            idx = len(node) if leaf == "-" else int(leaf)
            if op["op"] == "add":
                node.insert(idx, op["value"])
            elif op["op"] == "replace":
                node[idx] = op["value"]
            else:
                del node[idx]
        elif op["op"] in ("add", "replace"):
            assert op["op"] == "add" or leaf in node, f"JSON6902 replace of missing {op['path']}"
            node[leaf] = op["value"]
        elif op["op"] == "remove":
            del node[leaf]
        else:
            raise AssertionError(f"JSON6902 op {op['op']} is not supported by kustomize_lite")
