"""Which feature-store namespace a model reads (the manifest's, or CTRSERVE_STORE_NAMESPACE), how
store failures map to responses, and the feature store's item-cache metrics on /metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gateway_toy import ROUTING, TOY_NAMESPACE, MemoryStore, running, toy_manifest, toy_settings, write_toy_repo

from ctrserve.contract.manifest import StoreInfo
from ctrserve.feature_store.errors import StoreTimeout
from ctrserve.service.features import FeatureStores, NamespaceError, namespace_of

pytestmark = pytest.mark.quick

BODY_SIMPLE = {"user_id": "u1", "candidates": [{"item_id": "10"}, {"item_id": "11"}]}


def _old_manifest_repo(tmp_path: Path) -> Path:
    """A repository whose manifest predates `store` (schema 1), with a run_dir that does exist and
    names a prepared directory: the old run-dir fallback must not be used any more."""
    repo = write_toy_repo(tmp_path / "repo", "toy", versions=(1, 2))
    run = tmp_path / "run"
    run.mkdir()
    (run / "prepared_dir.txt").write_text(str(tmp_path / "processed" / "from-run-dir"))
    for v in (1, 2):
        path = repo / "toy" / str(v) / "manifest.json"
        data = json.loads(path.read_text())
        del data["store"]
        data["schema_version"], data["run_dir"] = 1, str(run)
        path.write_text(json.dumps(data))
    return repo


def _routing(tmp_path: Path) -> Path:
    p = tmp_path / "routing.yaml"
    p.write_text(ROUTING)
    return p


def test_namespace_comes_from_the_manifest_or_the_override() -> None:
    m = toy_manifest()
    assert namespace_of(m) == TOY_NAMESPACE
    assert namespace_of(m, "explicit") == "explicit"
    old = m.model_copy(update={"store": None})
    with pytest.raises(NamespaceError, match="CTRSERVE_STORE_NAMESPACE"):
        namespace_of(old)
    assert namespace_of(old, "explicit") == "explicit"


def test_models_of_one_namespace_share_a_store_unless_their_vocabularies_differ() -> None:
    made: list[tuple[str, str | None]] = []

    def factory(schema, namespace, vocab):
        made.append((namespace, vocab))
        return MemoryStore(schema, namespace, vocab)

    stores = FeatureStores(factory)
    v1, v2 = toy_manifest(version=1), toy_manifest(version=2)
    assert stores.for_model(v1) is stores.for_model(v2)
    assert made == [(TOY_NAMESPACE, "0" * 64)]  # the store is told which vocabulary to expect
    other = toy_manifest(version=3).model_copy(update={"store": StoreInfo(namespace=TOY_NAMESPACE,
                                                                          vocab_sha256="1" * 64)})
    with pytest.raises(ValueError, match="different preparations"):
        stores.for_model(other)


async def test_gateway_reads_the_manifest_namespace(make_settings) -> None:
    async with running(make_settings()) as (client, _, stores):
        assert (await client.post("/v1/score", json=BODY_SIMPLE)).status_code == 200
        assert [(s.namespace, s.vocab_sha256) for s in stores] == [(TOY_NAMESPACE, "0" * 64)]


async def test_old_manifest_needs_the_namespace_setting(tmp_path: Path) -> None:
    """No `store` in the manifest: not ready, with the remedy in /readyz; never a guess from the
    run directory or the dataset name. CTRSERVE_STORE_NAMESPACE makes it serve."""
    import asyncio

    import httpx

    from ctrserve.service.app import create_app

    repo, routing = _old_manifest_repo(tmp_path), _routing(tmp_path)
    app = create_app(toy_settings(repo, routing), store_factory=lambda s, n, v: MemoryStore(s, n, v))
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://g") as client:
        await asyncio.sleep(0.3)
        r = await client.get("/readyz")
        assert r.status_code == 503, r.text
        reason = r.json()["checks"]["routing"]
        assert "records no feature-store namespace" in reason and "CTRSERVE_STORE_NAMESPACE" in reason
        assert (await client.post("/v1/score", json=BODY_SIMPLE)).json()["error"]["code"] == "not_ready"

    settings = toy_settings(repo, routing)
    settings.store.namespace = "loaded-by-hand"
    async with running(settings) as (client, _, stores):
        assert (await client.post("/v1/score", json=BODY_SIMPLE)).status_code == 200
        assert [s.namespace for s in stores] == ["loaded-by-hand"]


async def test_store_timeout_is_503_or_degraded_never_504(make_settings) -> None:
    """feature_store/errors.py and docs/feature_store.md say what the gateway does: 503."""
    async with running(make_settings()) as (client, _, stores):
        stores[0].fail, stores[0].error = True, StoreTimeout("no answer within 50 ms")
        r = await client.post("/v1/score", json=BODY_SIMPLE)
        assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable", r.text
        assert 'ctrserve_store_errors_total{error="StoreTimeout"} 1.0' in (await client.get("/metrics")).text
    async with running(make_settings(store_failure="degrade")) as (client, _, stores):
        stores[0].fail, stores[0].error = True, StoreTimeout("no answer within 50 ms")
        r = await client.post("/v1/score", json=BODY_SIMPLE)
        assert r.status_code == 200 and r.json()["flags"] == {"degraded": True}


async def test_metrics_include_the_feature_store_item_cache(make_settings) -> None:
    """The families live in the feature store's module; the gateway's /metrics must show them (the
    hit/miss values after real Redis reads: tests/service/test_e2e.py)."""
    async with running(make_settings()) as (client, _, _):
        text = (await client.get("/metrics")).text
    assert "# TYPE ctrserve_feature_store_item_cache_lookups_total counter" in text
    assert "# TYPE ctrserve_feature_store_item_cache_hit_ratio gauge" in text
