"""deploy/k8s against the code, rendered with ``kubectl kustomize`` when installed, else ``kustomize_lite.py``;
kubernetes-validate (dev extra) checks the schemas when present."""

from __future__ import annotations

import base64
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_checks import (
    K8S,
    app_routes,
    check_env,
    check_repo_flavour,
    container_port,
    default_port,
    flag,
    probe_path,
    triton_local_flags,
)
from kustomize_lite import REPO, load_docs, render_kubectl, render_lite

from ctrserve.contract.feature_map import FeatureMap

pytestmark = pytest.mark.quick

OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists())
K8S_SCHEMA_VERSION = "1.30"  # oldest Kubernetes release the manifests target


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
