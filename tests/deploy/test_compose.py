"""deploy/compose.yaml against the code: settings, ports, probes, the Redis and Triton services, the
model repository and config flavour, the cluster and load profiles; ``docker compose config`` when present."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml
from deploy_checks import DEPLOY, app_routes, check_env, check_repo_flavour, default_port, flag, triton_local_flags
from kustomize_lite import REPO

from ctrserve.contract.feature_map import FeatureMap

pytestmark = pytest.mark.quick

COMPOSE = DEPLOY / "compose.yaml"


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
