"""deploy/ against the code: every YAML parses; every CTRSERVE_* variable the Dockerfile, compose
file and Kubernetes manifests set is a field of a settings class and validates there; ports and
probe paths are the gateway's; the model repository and config flavour are what ``ctrserve
export`` writes; the routing config validates with the gateway's loader; the image has no torch.

Kustomize overlays are rendered with ``kubectl kustomize`` when kubectl is installed, else with
the small renderer in ``kustomize_lite.py`` (resources, components, generators, strategic-merge
and JSON6902 patches, namespace, images). External checkers run when present and skip otherwise:
kubectl, kubernetes-validate (dev extra), ``docker compose`` / ``docker-compose``.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any, get_args
from unittest import mock

import pytest
import yaml
from kustomize_lite import REPO, load_docs, render_kubectl, render_lite

from ctrserve.contract.feature_map import FeatureMap

pytestmark = pytest.mark.quick

DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists())
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = REPO / "Dockerfile"
K8S_SCHEMA_VERSION = "1.30"  # oldest Kubernetes release the manifests target


# --- what the code says ------------------------------------------------------------------------
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


# --- every YAML in deploy/ ---------------------------------------------------------------------
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


# --- Dockerfile ---------------------------------------------------------------------------------
def dockerfile_stages(text: str) -> list[dict]:
    """[{name, base, instrs: [(INSTR, args)]}], continuation lines joined, ARG defaults applied."""
    lines = re.sub(r"\\\n", " ", text).splitlines()
    args: dict[str, str] = {}
    stages: list[dict] = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instr, _, rest = line.partition(" ")
        instr = instr.upper()
        if instr == "ARG" and not stages:
            k, _, v = rest.partition("=")
            args[k.strip()] = v.strip()
        elif instr == "FROM":
            parts = rest.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), ""), parts[0])
            name = parts[2] if len(parts) > 2 and parts[1].upper() == "AS" else str(len(stages))
            stages.append({"name": name, "base": base, "instrs": []})
        elif stages:
            stages[-1]["instrs"].append((instr, rest.strip()))
    return stages


def ancestry(stages: list[dict], name: str) -> list[dict]:
    """The stage and every stage it builds on (FROM) or copies from (COPY --from)."""
    by_name = {s["name"]: s for s in stages}
    seen: list[str] = []

    def visit(n: str) -> None:
        if n in seen or n not in by_name:
            return
        seen.append(n)
        s = by_name[n]
        visit(s["base"])
        for instr, rest in s["instrs"]:
            m = re.search(r"--from=(\S+)", rest) if instr == "COPY" else None
            if m:
                visit(m.group(1))

    visit(name)
    return [by_name[n] for n in seen]


def env_of(stage_chain: list[dict]) -> dict[str, str]:
    env: dict[str, str] = {}
    for s in stage_chain:
        for instr, rest in s["instrs"]:
            if instr == "ENV":
                for tok in shlex.split(rest):
                    k, _, v = tok.partition("=")
                    env[k] = v
    return env


@pytest.fixture(scope="module")
def stages() -> list[dict]:
    return dockerfile_stages(DOCKERFILE.read_text())


def pip_installs(chain: list[dict]) -> list[list[str]]:
    """The package arguments of every ``pip install`` along a chain of stages."""
    return [args for stage in chain for verb, args, _ in pip_commands(stage) if verb == "install"]


def test_dockerfile_gateway_installs_only_the_serving_dependencies(stages: list[dict]) -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base = " ".join(project["dependencies"]).lower()
    assert "torch" not in base, "pyproject's base dependencies (the serving set) must not include torch"
    final = stages[-1]
    assert final["name"] == "gateway", "the gateway must be the last (default) build target"
    installs = pip_installs(ancestry(stages, "gateway"))
    assert installs, "the gateway image installs nothing with pip?"
    for specs in installs:
        assert specs == ["."], f"the gateway image must `pip install .` without extras, found {specs}"
    # the load-test image adds exactly the `load` extra, itself free of torch
    for specs in pip_installs(ancestry(stages, "loadtest")):
        for spec in specs:
            for extra in re.findall(r"\[([^\]]+)\]", spec):
                for e in extra.split(","):
                    assert "torch" not in " ".join(project["optional-dependencies"][e.strip()]).lower()


def pip_commands(stage: dict) -> list[tuple[str, list[str], list[str]]]:
    """(verb, arguments, options) of every ``pip install|uninstall`` in one stage's RUN lines, in order."""
    out = []
    for instr, rest in stage["instrs"]:
        if instr != "RUN":
            continue
        cmd: list[str] = []
        for tok in [*shlex.split(rest), "&&"]:
            if tok not in ("&&", ";", "||"):
                cmd.append(tok)
                continue
            if len(cmd) > 1 and cmd[0].endswith("pip") and cmd[1] in ("install", "uninstall"):
                out.append((cmd[1], [t for t in cmd[2:] if not t.startswith("-")],
                            [t for t in cmd[2:] if t.startswith("-")]))
            cmd = []
    return out


def test_dockerfile_gpu_target_swaps_onnxruntime_for_the_gpu_wheel(stages: list[dict]) -> None:
    """`gateway-gpu`: the `gpu` extra installed, then both ONNX Runtime wheels removed and the GPU
    wheel put back alone at the extra's pin (both own the package `onnxruntime`); otherwise the
    gateway image, with CTRSERVE_BACKEND_PROVIDER=cuda. The test environment never gets the extra."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    [spec] = project["optional-dependencies"]["gpu"]
    m = re.fullmatch(r"onnxruntime-gpu(\[[a-z,]+\])?==([0-9.]+)", spec)
    assert m, f"the gpu extra must pin onnxruntime-gpu exactly, found {spec!r}"
    assert any(d.startswith("onnxruntime==") for d in project["dependencies"]), "the base set pins the CPU wheel"
    dev = " ".join(project["optional-dependencies"]["dev"])
    assert "gpu" not in re.findall(r"\[([^\]]+)\]", dev)[0].split(","), "dev must not pull onnxruntime-gpu"
    by_name = {s["name"]: s for s in stages}
    assert {"build-gpu", "gateway-gpu"} <= set(by_name) and stages[-1]["name"] == "gateway"
    assert by_name["build-gpu"]["base"] == "build", "build-gpu starts from the serving set"
    cmds = pip_commands(by_name["build-gpu"])
    assert cmds[0][:2] == ("install", [".[gpu]"]), cmds
    last_uninstall = max(i for i, c in enumerate(cmds) if c[0] == "uninstall")
    assert {"onnxruntime", "onnxruntime-gpu"} <= set(cmds[last_uninstall][1]), cmds
    assert "-y" in cmds[last_uninstall][2]
    assert cmds[last_uninstall + 1:] == [("install", [f"onnxruntime-gpu=={m.group(2)}"], ["--no-deps"])], \
        f"after removing both wheels only the GPU wheel at the extra's pin {m.group(2)} goes back: {cmds}"
    checks = " ".join(rest for instr, rest in by_name["build-gpu"]["instrs"] if instr == "RUN")
    assert "CUDAExecutionProvider" in checks and "'onnxruntime'" in checks, "the build checks what it installed"
    gpu = by_name["gateway-gpu"]
    copies = [rest for instr, rest in gpu["instrs"] if instr == "COPY"]
    assert copies == ["--from=build-gpu /opt/venv /opt/venv"], copies
    env_gpu, env_cpu = env_of(ancestry(stages, "gateway-gpu")), env_of(ancestry(stages, "gateway"))
    assert env_gpu.pop("CTRSERVE_BACKEND_PROVIDER") == "cuda" and "CTRSERVE_BACKEND_PROVIDER" not in env_cpu
    assert {k: v for k, v in env_gpu.items() if not k.startswith("NVIDIA_")} == env_cpu
    check_env(env_of(ancestry(stages, "gateway-gpu")), "Dockerfile ENV (gateway-gpu)")
    same = ("USER", "EXPOSE", "HEALTHCHECK", "ENTRYPOINT")
    assert [i for i in gpu["instrs"] if i[0] in same] == [i for i in stages[-1]["instrs"] if i[0] in same]


def test_dockerfile_runs_as_non_root_and_serves(stages: list[dict]) -> None:
    from ctrserve.cli import app as cli_app

    final = stages[-1]
    instrs = final["instrs"]
    users = [rest for instr, rest in instrs if instr == "USER"]
    assert users, "the gateway stage sets no USER: it would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"USER {users[-1]} is root"
    entry = [yaml.safe_load(rest) for instr, rest in instrs if instr == "ENTRYPOINT"][-1]
    assert entry[:2] == ["ctrserve", "serve"]
    assert "serve" in {c.name or c.callback.__name__ for c in cli_app.registered_commands}
    env = env_of(ancestry(stages, "gateway"))
    settings = check_env(env, "Dockerfile ENV")
    from ctrserve.service.settings import ServerSettings

    port = settings[ServerSettings].port
    assert port == default_port(), "the image moves the gateway off its default port"
    assert settings[ServerSettings].host == "0.0.0.0", "inside a container the gateway must bind 0.0.0.0"
    exposed = [int(p.split("/")[0]) for instr, rest in instrs if instr == "EXPOSE" for p in rest.split()]
    assert exposed == [port], f"EXPOSE {exposed} but the gateway listens on {port}"
    health = " ".join(rest for instr, rest in instrs if instr == "HEALTHCHECK")
    paths = re.findall(r"(/[a-z]+)'?, timeout", health) or re.findall(r"'(/\w+)'", health)
    assert paths == ["/healthz"] and "/healthz" in app_routes(), f"HEALTHCHECK must probe /healthz: {health}"
    assert "CTRSERVE_SERVER_PORT" in health and "urllib" in health and "curl" not in health


def test_dockerfile_copies_every_package_and_dockerignore_keeps_them(stages: list[dict]) -> None:
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    copied: set[str] = set()
    for s in ancestry(stages, "gateway"):
        for instr, rest in s["instrs"]:
            if instr == "COPY" and "--from" not in rest:
                copied.update(rest.split()[:-1])
    needed = set(tool["package-dir"].values()) | {"pyproject.toml", "README.md"}
    assert needed <= copied, f"the build stage does not copy {sorted(needed - copied)} (pip install . needs them)"
    ignored = [ln.strip().rstrip("/") for ln in (REPO / ".dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")]
    for must in (".venv", "work", ".git", "tests"):
        assert must in ignored, f".dockerignore must exclude {must}"
    assert not needed & set(ignored), f".dockerignore excludes what the build copies: {needed & set(ignored)}"


def test_serving_entry_point_imports_without_torch() -> None:
    """What the image runs, in a process where the training-only packages cannot be imported."""
    blocked = ["torch", "pandas", "sklearn", "matplotlib", "onnx", "onnxscript", "pytriton", "locust"]
    code = (f"import sys\nfor m in {blocked!r}: sys.modules[m] = None\n"
            "from typer.testing import CliRunner\nfrom ctrserve.cli import app\n"
            "r = CliRunner().invoke(app, ['serve', '--help'])\n"
            "assert r.exit_code == 0, r.output\nimport ctrserve.service.app\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"`ctrserve serve` needs a training-only package:\n{res.stderr[-2000:]}"


# --- compose --------------------------------------------------------------------------------------
_VAR = re.compile(r"\$\$|\$\{([A-Za-z_]\w*)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err} and $$, recursively."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.groups()
        v = env.get(name)
        if op == ":-":
            return v or arg
        if op == "-":
            return arg if v is None else v
        assert v, f"compose variable {name} has no default and is not set"
        return v

    return _VAR.sub(sub, value)


@pytest.fixture(scope="module")
def compose() -> dict:
    return interpolate(yaml.safe_load(COMPOSE.read_text()), {})


def compose_env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env)
    return {k: str(v) for k, v in env.items()}


def binds(service: dict) -> dict[str, Path]:
    """container path -> host path (relative to deploy/) of the service's bind mounts."""
    out = {}
    for v in service.get("volumes", []):
        if isinstance(v, str):
            src, dst = v.split(":")[:2]
            if not src.startswith((".", "/")):
                continue  # a named volume
        elif v.get("type") == "bind":
            src, dst = v["source"], v["target"]
        else:
            continue
        out[dst] = (DEPLOY / src).resolve()
    return out


def triton_services(compose: dict) -> dict[str, dict]:
    return {n: s for n, s in compose["services"].items() if "tritonserver" in s.get("image", "")}


def test_compose_gateway_settings_ports_and_probes(compose: dict) -> None:
    from ctrserve.feature_store.config import RedisStoreConfig
    from ctrserve.service.settings import BackendSettings, RoutingSettings, ServerSettings

    services = compose["services"]
    gw = services["gateway"]
    s = check_env(compose_env(gw), "compose gateway")
    port = s[ServerSettings].port
    assert port == default_port(), "compose moves the gateway off its default port: keep them equal"
    targets = [int(str(p).rsplit(":", 1)[-1]) for p in gw["ports"]]
    assert targets == [port], f"gateway publishes {targets} but listens on {port}"
    health = " ".join(gw["healthcheck"]["test"])
    assert f"127.0.0.1:{port}/readyz" in health and "/readyz" in app_routes()
    # Redis: the URL's host is the redis service
    host = re.match(r"rediss?(?:\+cluster)?://([^:/]+)", s[RedisStoreConfig].url).group(1)
    assert host in services and "redis" in services[host]["image"]
    # Triton: the URL's host is an alias of every Triton service, its port their gRPC port
    backend = s[BackendSettings]
    assert backend.kind == "triton" and backend.triton_url
    host, tport = backend.triton_url.rsplit(":", 1)
    tritons = triton_services(compose)
    assert set(tritons) == {"triton", "triton-gpu"}
    for name, t in tritons.items():
        assert host in t["networks"]["default"]["aliases"], f"{name} does not answer to {host}"
        assert flag(t["command"], "grpc-port") == tport
    # the model repository: the same host folder Triton serves, where the gateway looks for it
    repo_dir = binds(gw)[str(backend.model_repository)]
    for name, t in tritons.items():
        assert binds(t)[flag(t["command"], "model-repository")] == repo_dir, f"{name} serves another folder"
    # routing: the file is inside a mounted folder and validates with the gateway's loader
    from ctrserve.service.routing import load_config

    cfg_path = s[RoutingSettings].config
    host_dir = binds(gw)[str(cfg_path.parent)]
    load_config(host_dir / cfg_path.name)
    assert depends(gw) == {"redis"}


def depends(service: dict) -> set[str]:
    d = service.get("depends_on") or {}
    return set(d) if isinstance(d, (dict, list)) else set()


def test_compose_cluster_profile(compose: dict) -> None:
    """Six cluster nodes and the one-shot `redis-cli --cluster create` over exactly them; with
    REDIS_URL set as the header says, the gateway's settings select the cluster backend."""
    from ctrserve.feature_store.backends import store_class
    from ctrserve.feature_store.config import RedisStoreConfig
    from ctrserve.feature_store.redis_cluster_store import RedisClusterOnlineStore

    services = compose["services"]
    nodes = {n: s for n, s in services.items() if "--cluster-enabled" in s.get("command", [])}
    assert len(nodes) == 6 and all(s["profiles"] == ["cluster"] for s in nodes.values())
    for s in nodes.values():
        assert flag(s["command"], "cluster-require-full-coverage") == "no" and "redis" in s["image"]
    init = services["redis-cluster-init"]
    assert sorted(a for a in init["command"] if a.endswith(":6379")) == sorted(f"{n}:6379" for n in nodes)
    assert flag(init["command"], "cluster-replicas") == "1" and depends(init) == set(nodes)
    url = "redis+cluster://redis-cluster-0:6379"
    assert f"REDIS_URL={url} docker compose" in COMPOSE.read_text()
    clustered = interpolate(yaml.safe_load(COMPOSE.read_text()), {"REDIS_URL": url})
    config = check_env(compose_env(clustered["services"]["gateway"]), "compose gateway, cluster")[RedisStoreConfig]
    assert config.cluster and store_class(config) is RedisClusterOnlineStore
    assert re.match(r"redis\+cluster://([^:/]+)", config.url).group(1) in nodes


def test_compose_triton_matches_export(compose: dict, tiny_fmap: FeatureMap, tmp_path: Path) -> None:
    from ctrserve.export.triton_repo import Flavour
    from ctrserve.service.settings import BackendSettings

    meta = compose["x-ctrserve"]
    assert meta["config-flavour"] in get_args(Flavour)
    # the default host folder is where the gateway (and the docs' export command) put the repository
    assert (DEPLOY / meta["model-repository"]).resolve() == BackendSettings.model_fields["model_repository"].default
    for name, t in triton_services(compose).items():
        assert t["image"] == "nvcr.io/nvidia/tritonserver:24.10-py3"
        cmd = t["command"]
        assert f"--model-control-mode={flag(cmd, 'model-control-mode')}" in triton_local_flags()
        assert flag(cmd, "load-model") == "*", f"{name}: explicit mode loads nothing unless told"
        mount = flag(cmd, "model-repository")
        assert binds(t)[mount] == (DEPLOY / meta["model-repository"]).resolve()
        gpu = bool(t.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices"))
        assert gpu == (name == "triton-gpu") and t["profiles"] == (["gpu"] if gpu else ["cpu"])
        check_repo_flavour(meta["config-flavour"], "KIND_GPU" if gpu else "KIND_CPU", tiny_fmap, tmp_path / name)
        health = " ".join(t["healthcheck"]["test"])
        assert f":{flag(cmd, 'http-port')}/v2/health/ready" in health


def test_compose_locust_targets_the_gateway(compose: dict) -> None:
    services = compose["services"]
    loc = services["locust"]
    assert loc["profiles"] == ["load"] and depends(loc) == {"gateway"}
    cmd = loc["command"]
    assert "--headless" in cmd
    assert cmd[cmd.index("--host") + 1] == f"http://gateway:{default_port()}"
    assert cmd[cmd.index("--pool") + 1].startswith("/work/")  # the locustfile needs a pool, under the work mount
    locustfile = Path(cmd[cmd.index("-f") + 1])
    host_dir = binds(loc)[str(locustfile.parent)]
    assert host_dir / locustfile.name == REPO / "loadtests" / "locustfile.py"
    check_env(compose_env(loc), "compose locust")
    for name, s in services.items():
        if name not in ("gateway", "locust"):
            check_env(compose_env(s), f"compose {name}")


def _compose_cli() -> list[str] | None:
    if shutil.which("docker"):
        res = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if res.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_compose_config_cli(tmp_path: Path) -> None:
    """The Compose implementation's own validation (no Docker engine needed)."""
    cli = _compose_cli()
    if cli is None:
        pytest.skip("neither `docker compose` (v2 plugin) nor `docker-compose` is installed")
    path = COMPOSE
    if cli == ["docker-compose"]:
        # Compose v1 predates the top-level `name`; validate everything else with it
        text = re.sub(r"(?m)^name: .*\n", "", COMPOSE.read_text())
        path = DEPLOY / f".compose-v1-check-{os.getpid()}.yaml"
        path.write_text(text)
    try:
        res = subprocess.run([*cli, "-f", str(path), "--profile", "cpu", "--profile", "gpu", "--profile", "load",
                              "config", "--quiet"], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "COMPOSE_PROJECT_NAME": "ctrserve-check"})
    finally:
        if path != COMPOSE:
            path.unlink()
    assert res.returncode == 0, f"{' '.join(cli)} config rejected deploy/compose.yaml:\n{res.stderr}"


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


# --- Kubernetes ---------------------------------------------------------------------------------------
def test_kustomizations_reference_existing_files() -> None:
    kfiles = sorted(K8S.rglob("kustomization.yaml"))
    assert {p.parent.name for p in kfiles} >= {"base", "dev", "prod", "gpu"}
    for kfile in kfiles:
        k = yaml.safe_load(kfile.read_text())
        here = kfile.parent
        refs = list(k.get("resources", [])) + list(k.get("components", []))
        refs += [p["path"] for p in k.get("patches", []) if "path" in p]
        for gen in k.get("configMapGenerator", []) + k.get("secretGenerator", []):
            refs += gen.get("envs", []) + [f.split("=", 1)[-1] for f in gen.get("files", [])]
        for ref in refs:
            target = (here / ref).resolve()
            assert target.exists(), f"{kfile.relative_to(REPO)}: {ref} does not exist"
            if target.is_dir():
                assert (target / "kustomization.yaml").exists(), f"{kfile.relative_to(REPO)}: {ref} is no kustomization"
        # every manifest in the folder is used (a forgotten file is a silent gap)
        used = {(here / r).resolve() for r in refs}
        for f in here.rglob("*.yaml"):
            if f.name != "kustomization.yaml" and not any(f.is_relative_to(p) for p in used if p.is_dir()):
                assert f.resolve() in used, f"{f.relative_to(REPO)} is not referenced by {kfile.relative_to(REPO)}"


def _component_overlay(tmp_path: Path, component: str, base_overlay: str = "prod") -> Path:
    """A throw-away overlay: prod + one component, in the prod namespace (generated names resolve per namespace)."""
    d = tmp_path / f"with-{component}"
    d.mkdir()
    ns = yaml.safe_load((K8S / "overlays" / base_overlay / "kustomization.yaml").read_text())["namespace"]
    (d / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "namespace": ns,
        "resources": [os.path.relpath(K8S / "overlays" / base_overlay, d)],
        "components": [os.path.relpath(K8S / "components" / component, d)]}))
    return d


COMPONENTS = sorted(p.name for p in (K8S / "components").iterdir() if p.is_dir())
TARGETS = [*OVERLAYS, *(f"prod+{c}" for c in COMPONENTS)]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, list[dict]]]:
    """target -> {"lite": docs, "kubectl": docs or absent}."""
    tmp = tmp_path_factory.mktemp("kustomize")
    out: dict[str, dict[str, list[dict]]] = {}
    for target in TARGETS:
        path = K8S / "overlays" / target if "+" not in target else _component_overlay(tmp, target.split("+")[1])
        out[target] = {"lite": render_lite(path)}
        docs = render_kubectl(path)
        if docs is not None:
            out[target]["kubectl"] = docs
    return out


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict], kind: str, name: str) -> dict:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def by_ref(docs: list[dict], kind: str, name: str) -> dict | None:
    """A ConfigMap/Secret by the name a pod refers to (kubectl's names carry a hash suffix, refs too)."""
    found = find(docs, kind, name)
    return found[0] if found else None


def out_of_band_secret(target: str, name: str) -> dict[str, str] | None:
    """A Secret the overlay expects created by hand: its `<name without ctrserve->.example.env`."""
    overlay = target.split("+")[0]
    chain = [K8S / "overlays" / overlay]
    for res in yaml.safe_load((chain[0] / "kustomization.yaml").read_text()).get("resources", []):
        if (chain[0] / res / "kustomization.yaml").exists():
            chain.append((chain[0] / res).resolve())
    for d in chain:
        f = d / f"{name.removeprefix('ctrserve-')}.example.env"
        if f.exists():
            return dict(ln.split("=", 1) for ln in f.read_text().splitlines() if ln.strip() and not ln.startswith("#"))
    return None


def pod_env(docs: list[dict], container: dict, target: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for src in container.get("envFrom", []):
        if "configMapRef" in src:
            cm = by_ref(docs, "ConfigMap", src["configMapRef"]["name"])
            assert cm or src["configMapRef"].get("optional"), f"{target}: ConfigMap {src['configMapRef']} missing"
            env.update((cm or {}).get("data", {}))
        else:
            ref = src["secretRef"]
            sec = by_ref(docs, "Secret", ref["name"])
            if sec is not None:
                env.update({k: base64.b64decode(v).decode() for k, v in sec.get("data", {}).items()})
                env.update(sec.get("stringData", {}))
            else:
                example = out_of_band_secret(target, ref["name"])
                assert example is not None or ref.get("optional"), (
                    f"{target}: Secret {ref['name']} is neither rendered nor documented by an .example.env file")
                env.update(example or {})
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
    return env


def pod_spec(docs: list[dict], name: str) -> dict:
    return one(docs, "Deployment", name)["spec"]["template"]["spec"]


def mounts(pod: dict, container: dict) -> dict[str, dict]:
    """mountPath -> the volume (by name) mounted there."""
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    out = {}
    for m in container.get("volumeMounts", []):
        assert "subPath" not in m or m["name"] != "routing", "a subPath mount never sees ConfigMap updates"
        out[m["mountPath"]] = vols[m["name"]]
    return out


def volume_source(vol: dict) -> tuple[str, str]:
    if "persistentVolumeClaim" in vol:
        return ("pvc", vol["persistentVolumeClaim"]["claimName"])
    return next((k, "") for k in vol if k != "name")


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("renderer", ["lite", "kubectl"])
def test_k8s_gateway(rendered: dict, target: str, renderer: str) -> None:
    from ctrserve.feature_store.config import RedisStoreConfig
    from ctrserve.service.routing import parse_yaml
    from ctrserve.service.settings import BackendSettings, RoutingSettings, ServerSettings

    if renderer not in rendered[target]:
        pytest.skip("kubectl (with its built-in kustomize) is not installed; the lite renderer covers this")
    docs = rendered[target][renderer]
    pod = pod_spec(docs, "ctrserve-gateway")
    (gw,) = [c for c in pod["containers"] if c["name"] == "gateway"]
    env = pod_env(docs, gw, target)
    s = check_env(env, f"{target} gateway")
    port = s[ServerSettings].port
    assert port == default_port(), f"{target}: the gateway runs off its default port {default_port()}"
    assert s[ServerSettings].host == "0.0.0.0"
    routes = app_routes()
    assert probe_path(gw, "readinessProbe")[0] == "/readyz" and "/readyz" in routes
    assert probe_path(gw, "livenessProbe")[0] == "/healthz" and "/healthz" in routes
    for probe in ("readinessProbe", "livenessProbe"):
        assert container_port(gw, probe_path(gw, probe)[1]) == port, f"{probe} probes another port than {port}"
    annotations = one(docs, "Deployment", "ctrserve-gateway")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port) and annotations["prometheus.io/path"] in routes
    # Service, HPA, PDB point at the gateway pods
    labels = one(docs, "Deployment", "ctrserve-gateway")["spec"]["template"]["metadata"]["labels"]
    svc = one(docs, "Service", "ctrserve-gateway")["spec"]
    assert svc["selector"].items() <= labels.items()
    assert container_port(gw, svc["ports"][0]["targetPort"]) == port
    hpa = one(docs, "HorizontalPodAutoscaler", "ctrserve-gateway")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "ctrserve-gateway"}
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"] and "cpu" in gw["resources"]["requests"]
    assert "replicas" not in one(docs, "Deployment", "ctrserve-gateway")["spec"], "the HPA owns the replica count"
    pdb = one(docs, "PodDisruptionBudget", "ctrserve-gateway")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    # security: the image's non-root user
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
    # Triton: the gRPC URL names the Triton Service and its gRPC port
    backend = s[BackendSettings]
    assert backend.kind == "triton"
    host, tport = backend.triton_url.rsplit(":", 1)
    tsvc = one(docs, "Service", host)["spec"]
    (grpc,) = [p for p in tsvc["ports"] if p["port"] == int(tport)]
    tpod = pod_spec(docs, "ctrserve-triton")
    (triton,) = tpod["containers"]
    assert container_port(triton, grpc["targetPort"]) == int(flag(triton["args"], "grpc-port"))
    # the model repository: the gateway mounts the same source Triton serves, where its setting says
    gw_repo = mounts(pod, gw)[str(backend.model_repository)]
    tr_repo = mounts(tpod, triton)[flag(triton["args"], "model-repository")]
    assert volume_source(gw_repo) == volume_source(tr_repo)
    if volume_source(gw_repo)[0] == "pvc":
        one(docs, "PersistentVolumeClaim", volume_source(gw_repo)[1])
    else:  # object storage: each pod syncs its copy before starting
        for p in (pod, tpod):
            assert any(m["name"] == gw_repo["name"] for c in p.get("initContainers", []) for m in c["volumeMounts"])
    # routing: the file lives in a mounted ConfigMap and validates with the gateway's loader
    cfg = s[RoutingSettings].config
    vol = mounts(pod, gw)[str(cfg.parent)]
    cm = by_ref(docs, "ConfigMap", vol["configMap"]["name"])
    parse_yaml(cm["data"][cfg.name], f"{target} ConfigMap {cm['metadata']['name']}")
    assert s[RoutingSettings].watch, "without the watcher a ConfigMap edit takes effect only on restart"
    # Redis: in-cluster (dev) the URL names a Service of the overlay
    url = s[RedisStoreConfig].url
    host = re.match(r"rediss?(?:\+cluster)?://(?:[^@/]*@)?([^:/]+)", url).group(1)
    if find(docs, "StatefulSet"):
        redis_svc = one(docs, "Service", host)["spec"]
        assert any(p["port"] == int(re.search(r":(\d+)", url.split("@")[-1]).group(1)) for p in redis_svc["ports"])


@pytest.mark.parametrize("renderer", ["lite", "kubectl"])
def test_k8s_redis_cluster_overlay(rendered: dict, renderer: str) -> None:
    """The gateway reads the cluster's Secret (documented by its .example.env) and its URL selects
    the Redis Cluster backend."""
    from ctrserve.feature_store.backends import store_class
    from ctrserve.feature_store.config import RedisStoreConfig
    from ctrserve.feature_store.redis_cluster_store import RedisClusterOnlineStore

    if renderer not in rendered["redis-cluster"]:
        pytest.skip("kubectl (with its built-in kustomize) is not installed; the lite renderer covers this")
    docs = rendered["redis-cluster"][renderer]
    (gw,) = [c for c in pod_spec(docs, "ctrserve-gateway")["containers"] if c["name"] == "gateway"]
    secrets = [src["secretRef"]["name"] for src in gw["envFrom"] if "secretRef" in src]
    assert "ctrserve-redis-cluster" in secrets and "ctrserve-redis" not in secrets
    config = check_env(pod_env(docs, gw, "redis-cluster"), "redis-cluster gateway")[RedisStoreConfig]
    assert config.cluster and store_class(config) is RedisClusterOnlineStore


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("renderer", ["lite", "kubectl"])
def test_k8s_triton(rendered: dict, target: str, renderer: str, tiny_fmap: FeatureMap, tmp_path: Path) -> None:
    if renderer not in rendered[target]:
        pytest.skip("kubectl (with its built-in kustomize) is not installed; the lite renderer covers this")
    docs = rendered[target][renderer]
    dep = one(docs, "Deployment", "ctrserve-triton")
    tpod = dep["spec"]["template"]["spec"]
    (triton,) = tpod["containers"]
    assert triton["image"] == "nvcr.io/nvidia/tritonserver:24.10-py3"
    args = triton["args"]
    assert f"--model-control-mode={flag(args, 'model-control-mode')}" in triton_local_flags()
    assert flag(args, "load-model") == "*"
    assert probe_path(triton, "readinessProbe")[0] == "/v2/health/ready"
    assert container_port(triton, probe_path(triton, "readinessProbe")[1]) == int(flag(args, "http-port"))
    kind = dep["metadata"]["annotations"]["ctrserve.io/instance-kind"]
    gpus = {int(r.get("nvidia.com/gpu", 0)) for r in triton["resources"].values()}
    assert (gpus != {0}) == (kind == "KIND_GPU"), f"{target}: instance kind {kind} but GPU resources {gpus}"
    assert (target == "gpu") == (kind == "KIND_GPU")
    check_repo_flavour(dep["metadata"]["annotations"]["ctrserve.io/config-flavour"], kind, tiny_fmap, tmp_path)
    svc = one(docs, "Service", "ctrserve-triton")["spec"]
    for p in svc["ports"]:
        container_port(triton, p["targetPort"])
    assert svc["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()


def test_lite_renderer_agrees_with_kubectl(rendered: dict) -> None:
    """The fallback renderer reaches the same gateway environment and Triton spec as kustomize."""
    if not all("kubectl" in r for r in rendered.values()):
        pytest.skip("kubectl is not installed")

    def summary(docs: list[dict], target: str) -> dict:
        pod = pod_spec(docs, "ctrserve-gateway")
        tpod = pod_spec(docs, "ctrserve-triton")
        strip = re.compile(r"-[a-z0-9]{10}$")  # kustomize's content-hash suffix
        return {
            "objects": sorted((d["kind"], strip.sub("", d["metadata"]["name"]), d["metadata"].get("namespace", ""))
                              for d in docs),
            "env": pod_env(docs, pod["containers"][0], target),
            "triton": {k: v for k, v in tpod["containers"][0].items() if k != "image"} | {"vol": tpod["volumes"]},
            "gateway_volumes": pod["volumes"], "init": [c["name"] for c in pod.get("initContainers", [])],
            "hpa": one(docs, "HorizontalPodAutoscaler", "ctrserve-gateway")["spec"],
            "images": sorted(c["image"] for d in find(docs, "Deployment")
                             for c in d["spec"]["template"]["spec"]["containers"]),
        }

    def norm(x: Any) -> str:  # key order aside; ConfigMap references differ only by the hash suffix
        return re.sub(r'-[a-z0-9]{10}"', '"', json.dumps(x, sort_keys=True, indent=1))

    for target, r in rendered.items():
        lite, kube = summary(r["lite"], target), summary(r["kubectl"], target)
        for key in lite:
            assert norm(lite[key]) == norm(kube[key]), f"{target}: {key} differs between kustomize_lite and kubectl"


def test_k8s_schemas(rendered: dict) -> None:
    """Every rendered object (and the upload tool pod) against the Kubernetes OpenAPI schemas, offline."""
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (dev extra) is not installed")
    docs = [(t, d) for t, r in rendered.items() for d in r.get("kubectl", r["lite"])]
    docs += [("tools", d) for f in sorted((K8S / "tools").glob("*.yaml")) for d in load_docs(f)]
    for where, doc in docs:
        try:
            kv.validate(doc, K8S_SCHEMA_VERSION, strict=True)
        except kv.ValidationError as exc:
            pytest.fail(f"{where}: {doc['kind']}/{doc['metadata']['name']}: {exc}")


def test_k8s_secrets_are_placeholders() -> None:
    """No real secret is committed: prod Secrets are documented with CHANGE_ME placeholders only,
    dev literals say so in their value, and every variable named there is a setting."""
    for f in sorted(K8S.rglob("*.example.env")):
        env = dict(ln.split("=", 1) for ln in f.read_text().splitlines() if ln.strip() and not ln.startswith("#"))
        check_env(env, str(f.relative_to(REPO)))
        for k, v in env.items():
            if any(w in k for w in ("PASSWORD", "KEY", "TOKEN")):
                assert v == "CHANGE_ME", f"{f.name}: {k} must be a placeholder"
    for kfile in K8S.rglob("kustomization.yaml"):
        for gen in (yaml.safe_load(kfile.read_text()) or {}).get("secretGenerator", []):
            literals = dict(lit.split("=", 1) for lit in gen.get("literals", []))
            check_env(literals, str(kfile.relative_to(REPO)))
            for k, v in literals.items():
                if any(w in k for w in ("PASSWORD", "KEY", "TOKEN")):
                    assert "not-a-secret" in v, f"{kfile}: {k} literal must be an obvious dev placeholder"


# --- docs/deploy.md ---------------------------------------------------------------------------------
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
