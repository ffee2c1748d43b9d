"""What the code says, for the deploy tests: the CTRSERVE_* settings and their validation, the
gateway's routes and port, the flags tritonserver runs with, and what ``ctrserve export`` writes."""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from kustomize_lite import REPO

from ctrserve.contract.feature_map import FeatureMap

DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"


def settings_classes() -> list[type]:
    from ctrserve.feature_store.config import RedisStoreConfig
    from ctrserve.paths import PathSettings
    from ctrserve.service.settings import SETTINGS_CLASSES

    return [*SETTINGS_CLASSES, RedisStoreConfig, PathSettings]


def known_env() -> dict[str, type]:
    """CTRSERVE_* variable -> the settings class that reads it (prefix + field name)."""
    out: dict[str, type] = {}
    for cls in settings_classes():
        prefix = cls.model_config.get("env_prefix", "")
        for name, field in cls.model_fields.items():
            out[(prefix + (field.validation_alias if isinstance(field.validation_alias, str) else name)).upper()] = cls
    return out


def check_env(env: dict[str, str], where: str) -> dict[type, Any]:
    """Every CTRSERVE_* name is a setting and every value validates in its class."""
    known = known_env()
    ours = {k: str(v) for k, v in env.items() if k.startswith("CTRSERVE_")}
    unknown = sorted(k for k in ours if k not in known)
    assert not unknown, f"{where}: not a setting of any settings class: {unknown}"
    built: dict[type, Any] = {}
    with mock.patch.dict(os.environ, ours, clear=True):
        for cls in {known[k] for k in ours} | set(settings_classes()):
            try:
                built[cls] = cls()
            except Exception as exc:  # pydantic ValidationError: show where the bad value came from
                pytest.fail(f"{where}: invalid {cls.__name__} values: {exc}")
    return built


@functools.cache
def app_routes() -> frozenset[str]:
    """Paths the gateway app answers with GET (from its OpenAPI schema: routers may be nested)."""
    from ctrserve.service.app import create_app
    from ctrserve.service.settings import GatewaySettings

    with mock.patch.dict(os.environ, {}, clear=True):
        app = create_app(GatewaySettings.from_env())
    return frozenset(path for path, ops in app.openapi()["paths"].items() if "get" in ops)


def default_port() -> int:
    from ctrserve.service.settings import ServerSettings

    return ServerSettings.model_fields["port"].default


def triton_local_flags() -> set[str]:
    """The model-control flags the export code runs tritonserver with."""
    import inspect

    from ctrserve.export import triton_local

    return set(re.findall(r"--model-control-mode=\w+", inspect.getsource(triton_local.start)))


def flag(args: list[str], name: str) -> str | None:
    """The value of ``--name=value`` or ``--name value`` in ``args``."""
    for i, a in enumerate(args):
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
        if a == f"--{name}" and i + 1 < len(args):
            return args[i + 1]
    return None


def probe_path(container: dict, probe: str) -> tuple[str, Any]:
    get = container[probe]["httpGet"]
    return get["path"], get["port"]


def container_port(container: dict, ref: Any) -> int:
    """A probe's / Service's port (name or number) -> the container port number."""
    for p in container.get("ports", []):
        if ref in (p.get("name"), p["containerPort"]):
            return p["containerPort"]
    pytest.fail(f"container {container['name']}: no port {ref!r} (ports: {container.get('ports')})")


# --- the deploy config flavour, rendered by the export code ------------------------------------------
def check_repo_flavour(flavour: str, kind: str, fmap: FeatureMap, tmp: Path) -> None:
    """What `ctrserve export --flavour <flavour> [--gpu]` writes runs in the NVIDIA container:
    native backends (the container has no onnxruntime for the python backend's model.py) and the
    instance kind the manifests schedule for."""
    from datetime import UTC, datetime

    from ctrserve.contract.manifest import MODEL_FILES, ExporterInfo, Manifest, ParityResult, TensorSpec
    from ctrserve.export.triton_repo import CONFIG_FILE, RepoOptions, read_config, write_config

    assert flavour == "deploy", "the NVIDIA Triton container needs the deploy config flavour"
    user = next(f for f in fmap.features if f.side == "user" and f.kind == "sparse")
    cand = next(f for f in fmap.features if f.side == "item" and f.kind == "sparse")
    for fmt in MODEL_FILES:
        model_dir = tmp / fmt
        (model_dir / "1").mkdir(parents=True)
        Manifest(name=fmt, version=1, model="dnn", dataset=fmap.dataset, run_dir="/runs/x", format=fmt,
                 file=MODEL_FILES[fmt], feature_map=fmap,
                 inputs=[TensorSpec(name=user.name, dtype=user.dtype, shape=[1], side="user"),
                         TensorSpec(name=cand.name, dtype=cand.dtype, shape=[-1], side="candidate")],
                 parity=ParityResult(runtime="x", tolerance=1e-4, passed=True, max_abs_diff=0.0, splits=["test"],
                                     checks=[]),
                 exporter=ExporterInfo(tool="torch.onnx.dynamo", torch_version="x"),
                 exported_at=datetime.now(UTC)).save(model_dir / "1" / "manifest.json")
        write_config(model_dir, RepoOptions(flavour=flavour, gpu=kind == "KIND_GPU"))
        cfg = read_config(model_dir / CONFIG_FILE)
        from tritonclient.grpc import model_config_pb2 as mc

        assert cfg.backend in ("onnxruntime", "pytorch"), f"{fmt}: backend {cfg.backend!r} is not native to Triton"
        assert [mc.ModelInstanceGroup.Kind.Name(g.kind) for g in cfg.instance_group] == [kind]
