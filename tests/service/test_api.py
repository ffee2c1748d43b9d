"""The HTTP API in-process (httpx ASGI transport) over the toy model: real ONNX Runtime, an
in-memory store. Request validation, error mapping, auth, admin reload, readiness, metrics."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from gateway_toy import ROUTING, VOCAB, MemoryStore, expected_scores, running, toy_manifest, toy_settings

from ctrserve.contract.store_schema import StoreSchema
from ctrserve.service.assemble import Assembler

pytestmark = pytest.mark.quick

BODY = {"user_id": "u1", "context": {"device": 1, "hour": 9},
        "candidates": [{"item_id": "10"}, {"item_id": "12", "features": {"price": 3.0}}, {"item_id": 11}]}


async def _expected(user: str, body: dict, version: int) -> np.ndarray:
    items = [str(c["item_id"]) for c in body["candidates"]]
    stored = await MemoryStore(StoreSchema.from_feature_map(toy_manifest().feature_map)).online_read(user, items)
    inputs = Assembler(toy_manifest(), VOCAB).assemble(user, items, stored, body.get("context"),
                                                       [c.get("features") for c in body["candidates"]])
    return expected_scores(inputs, version)


async def test_score_returns_scores_in_candidate_order(make_settings) -> None:
    async with running(make_settings()) as (client, _, _):
        r = await client.post("/v1/score", json={**BODY, "request_id": "req-1"})
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["request_id"] == "req-1" and r.headers["x-request-id"] == "req-1"
        assert out["model"] == "toy" and out["arm"] in ("control", "treatment")
        assert out["version"] == {"control": 1, "treatment": 2}[out["arm"]]
        np.testing.assert_allclose(out["scores"], await _expected("u1", BODY, out["version"]), atol=1e-6)
        assert "flags" not in out
        # the same user always lands on the same arm; another request id is generated when absent
        again = (await client.post("/v1/score", json=BODY)).json()
        assert again["arm"] == out["arm"] and len(again["request_id"]) == 32


async def test_flags_for_unknown_user_and_items(make_settings) -> None:
    async with running(make_settings()) as (client, _, _):
        body = {"user_id": "stranger", "candidates": [{"item_id": "10"}, {"item_id": "999"}]}
        out = (await client.post("/v1/score", json=body)).json()
        assert out["flags"] == {"user_missing": True, "missing_items": ["999"]}
        np.testing.assert_allclose(out["scores"], await _expected("stranger", body, out["version"]), atol=1e-6)


async def test_override_header_forces_an_arm_and_model_field_bypasses_the_split(make_settings) -> None:
    async with running(make_settings()) as (client, _, _):
        for arm, version in (("control", 1), ("treatment", 2)):
            r = await client.post("/v1/score", json=BODY, headers={"X-Ctrserve-Arm": arm})
            assert (r.json()["arm"], r.json()["version"]) == (arm, version)
        r = await client.post("/v1/score", json={**BODY, "model": "toy:1"})
        assert (r.json()["arm"], r.json()["version"]) == ("direct", 1)
        r = await client.post("/v1/score", json={**BODY, "model": "toy"})
        assert r.json()["version"] == 2


@pytest.mark.parametrize(("patch", "status", "message"), [
    ({"model": "nope"}, 404, "not served"),
    ({"model": "toy:9"}, 404, "no served version"),
    ({"candidates": []}, 422, "candidates: List should have at least 1 item"),
    ({"user_id": ""}, 422, "user_id"),
    ({"user_id": None}, 422, "user_id"),
    ({"surprise": 1}, 422, "surprise: Extra inputs are not permitted"),
    ({"candidates": [{"item_id": "10", "score": 1}]}, 422, r"candidates\[0\].score"),
    ({"candidates": [{"item_id": "10"}] * 4}, 422, "at most 3 per request"),
    ({"context": {"nope": 1}}, 422, "unknown features"),
    ({"context": {"age": "old"}}, 422, "expected a number"),
    ({"context": {"age": {"nested": 1}}}, 422, "context.age"),
    ({"context": {f"k{i}": 1 for i in range(9)}}, 422, "at most 8"),
    ({"candidates": [{"item_id": "10", "features": {"age": 1}}]}, 422, "unknown features"),
    ({"model": "bad name!"}, 422, "model"),
])
async def test_bad_requests_get_clear_4xx(make_settings, patch, status, message) -> None:
    async with running(make_settings(max_candidates=3, max_feature_keys=8)) as (client, _, _):
        r = await client.post("/v1/score", json={**BODY, **patch})
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert err["code"] and err["message"]
        import re

        assert re.search(message, err["message"]), err["message"]
        assert "Traceback" not in r.text


async def test_unknown_experiment_or_arm_headers_are_404(make_settings) -> None:
    async with running(make_settings()) as (client, _, _):
        r = await client.post("/v1/score", json=BODY, headers={"X-Ctrserve-Experiment": "zzz"})
        assert r.status_code == 404 and "unknown experiment" in r.text
        r = await client.post("/v1/score", json=BODY, headers={"X-Ctrserve-Arm": "zzz"})
        assert r.status_code == 404 and "no arm" in r.text


async def test_malformed_and_oversized_bodies(make_settings) -> None:
    async with running(make_settings(max_body_bytes=2048)) as (client, _, _):
        r = await client.post("/v1/score", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
        big = {**BODY, "context": {"hist_item_id": ["10"] * 600, "hist_cate_id": ["a"] * 600}}
        r = await client.post("/v1/score", json=big)
        assert r.status_code == 413 and "2048 bytes" in r.text

        async def chunks():  # no content-length: the cap is enforced while streaming
            for _ in range(10):
                yield b" " * 500

        r = await client.post("/v1/score", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        r = await client.post("/v1/score", content=b'{"user_id": "u1", "context": {"age": NaN}, '
                              b'"candidates": [{"item_id": "10"}]}', headers={"content-type": "application/json"})
        assert r.status_code in (400, 422), r.text


async def test_store_down_fails_or_degrades(make_settings) -> None:
    async with running(make_settings()) as (client, _, stores):
        stores[0].fail = True
        r = await client.post("/v1/score", json=BODY)
        assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable"
        assert (await client.get("/readyz")).status_code == 503
    async with running(make_settings(store_failure="degrade")) as (client, _, stores):
        stores[0].fail = True
        r = await client.post("/v1/score", json=BODY)
        assert r.status_code == 200 and r.json()["flags"] == {"degraded": True}
        assert len(r.json()["scores"]) == 3
        assert (await client.get("/readyz")).status_code == 200  # degrade mode serves without the store
        assert "ctrserve_degraded_total 1.0" in (await client.get("/metrics")).text


@pytest.mark.parametrize("execution", ["thread", "inline"])
async def test_backend_timeout(toy_repo, routing_file, monkeypatch, execution: str) -> None:
    """Thread mode answers 504 when inference overruns its budget; inline mode cannot interrupt the
    call it is running and answers when it ends (the documented cost of inline execution)."""
    import time

    from ctrserve.service.backends.onnxruntime import OnnxRuntimeBackend

    settings = toy_settings(toy_repo, routing_file)
    settings.backend.timeout_ms = 50
    settings.backend.execution = execution
    async with running(settings) as (client, _, _):
        run = OnnxRuntimeBackend._run
        monkeypatch.setattr(OnnxRuntimeBackend, "_run", lambda self, x: (time.sleep(0.3), run(self, x))[1])
        r = await client.post("/v1/score", json=BODY)
        metrics = (await client.get("/metrics")).text
        if execution == "thread":
            assert r.status_code == 504 and r.json()["error"]["code"] == "backend_timeout"
            assert 'ctrserve_backend_errors_total{kind="timeout"' in metrics
        else:
            assert r.status_code == 200 and len(r.json()["scores"]) == len(BODY["candidates"])
            assert 'ctrserve_backend_errors_total{kind="timeout"' not in metrics


async def test_auto_execution_runs_inline_alone_and_on_the_thread_under_load(toy_repo, routing_file,
                                                                             monkeypatch) -> None:
    """`auto`: a lone request runs inline; concurrent ones go to the inference thread (so the event
    loop keeps reading requests); every answer is the same as inline's."""
    import asyncio

    from ctrserve.service.backends.onnxruntime import OnnxRuntimeBackend

    calls = {"inline": 0, "thread": 0}
    inline, infer = OnnxRuntimeBackend.infer_inline, OnnxRuntimeBackend.infer

    def counted_inline(self, inputs):
        calls["inline"] += 1
        return inline(self, inputs)

    async def counted_infer(self, inputs, timeout):
        calls["thread"] += 1
        return await infer(self, inputs, timeout)

    monkeypatch.setattr(OnnxRuntimeBackend, "infer_inline", counted_inline)
    monkeypatch.setattr(OnnxRuntimeBackend, "infer", counted_infer)
    settings = toy_settings(toy_repo, routing_file)
    settings.backend.execution = "auto"
    settings.backend.auto_overlap_s = 0.3
    async with running(settings) as (client, _, _):
        calls.update(inline=0, thread=0)  # warm-up calls at load do not count
        alone = await client.post("/v1/score", json=BODY)
        assert alone.status_code == 200 and calls == {"inline": 1, "thread": 0}
        together = await asyncio.gather(*(client.post("/v1/score", json=BODY) for _ in range(6)))
        assert calls["thread"] >= 5 and calls["inline"] + calls["thread"] == 7
        for r in together:
            assert r.status_code == 200 and r.json()["scores"] == alone.json()["scores"]
        # right after an overlap a lone request stays on the thread path; once the window has passed, inline
        calls.update(inline=0, thread=0)
        assert (await client.post("/v1/score", json=BODY)).status_code == 200 and calls == {"inline": 0, "thread": 1}
        await asyncio.sleep(0.35)
        assert (await client.post("/v1/score", json=BODY)).status_code == 200 and calls == {"inline": 1, "thread": 1}
        settings.backend.auto_overlap_s = 0.0  # only requests scored together leave the event loop
        await asyncio.gather(*(client.post("/v1/score", json=BODY) for _ in range(3)))
        calls.update(inline=0, thread=0)
        assert (await client.post("/v1/score", json=BODY)).status_code == 200 and calls == {"inline": 1, "thread": 0}


async def test_api_key(make_settings) -> None:
    async with running(make_settings(key="s3cret")) as (client, _, _):
        assert (await client.post("/v1/score", json=BODY)).status_code == 401
        assert (await client.post("/v1/score", json=BODY, headers={"X-API-Key": "nope"})).status_code == 401
        assert (await client.post("/v1/score", json=BODY, headers={"X-API-Key": "s3cret"})).status_code == 200
        assert (await client.get("/healthz")).status_code == 200  # probes stay open


async def test_admin_reload_swaps_or_rejects(make_settings) -> None:
    new = ROUTING.replace("weight: 50}", "weight: 0}", 1).replace("version: 2, weight: 50", "version: 2, weight: 100")
    async with running(make_settings(admin_token="tok")) as (client, _, _):
        assert (await client.put("/admin/routing", content=new)).status_code == 401
        auth = {"Authorization": "Bearer tok"}
        before = (await client.get("/admin/routing", headers=auth)).json()["digest"]
        for bad, why in (("experiments: [", "not valid YAML"),
                         (ROUTING.replace("weight: 50", "weight: 40", 1), "sum to 90"),
                         (ROUTING.replace("version: 2", "version: 7"), "version 7 is not in")):
            r = await client.put("/admin/routing", content=bad, headers=auth)
            assert r.status_code == 422 and why in r.json()["error"]["message"], r.text
            assert (await client.get("/admin/routing", headers=auth)).json()["digest"] == before
        r = await client.put("/admin/routing", content=new, headers=auth)
        assert r.status_code == 200 and r.json()["digest"] != before
        arms = {(await client.post("/v1/score", json={**BODY, "user_id": f"u{i}"})).json()["arm"] for i in range(20)}
        assert arms == {"treatment"}
        r = await client.put("/admin/routing", json={"experiments": [{"name": "e", "salt": "s", "arms": [
            {"name": "only", "model": "toy", "version": 1, "weight": 100}]}]}, headers=auth)
        assert r.status_code == 200
        assert (await client.post("/v1/score", json=BODY)).json()["arm"] == "only"
    async with running(make_settings()) as (client, _, _):
        assert (await client.get("/admin/routing", headers={"Authorization": "Bearer x"})).status_code == 403


async def test_watched_file_reload(toy_repo, routing_file) -> None:
    settings = toy_settings(toy_repo, routing_file)
    settings.routing.watch = True
    settings.routing.watch_interval_s = 0.05
    async with running(settings) as (client, _app, _):
        routing_file.write_text("experiments: [")  # rejected: the old config stays
        await asyncio.sleep(0.3)
        assert (await client.post("/v1/score", json=BODY)).json()["arm"] in ("control", "treatment")
        routing_file.write_text(ROUTING.replace("control", "ctl"))
        for _ in range(100):
            await asyncio.sleep(0.05)
            arms = {(await client.post("/v1/score", json={**BODY, "user_id": f"u{i}"})).json()["arm"]
                    for i in range(10)}
            if "ctl" in arms:
                break
        assert "ctl" in arms
        metrics = (await client.get("/metrics")).text
        assert 'ctrserve_routing_reloads_total{result="rejected",source="watch"} 1.0' in metrics


async def test_probes_metrics_and_docs(make_settings) -> None:
    async with running(make_settings()) as (client, _, _):
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        r = await client.get("/readyz")
        assert r.status_code == 200 and r.json()["status"] == "ready"
        await client.post("/v1/score", json=BODY, headers={"X-Ctrserve-Arm": "treatment"})
        await client.post("/v1/score", json={**BODY, "model": "nope"})
        text = (await client.get("/metrics")).text
        assert 'ctrserve_requests_total{arm="treatment",route="/v1/score",status="200"} 1.0' in text
        assert 'ctrserve_requests_total{arm="none",route="/v1/score",status="404"} 1.0' in text
        for stage in ("feature_fetch", "assembly", "inference"):
            assert f'ctrserve_stage_seconds_count{{arm="treatment",stage="{stage}"}} 1.0' in text
        assert 'ctrserve_store_lookups_total{kind="item",result="hit"} 3.0' in text
        spec = (await client.get("/openapi.json")).json()
        assert "/v1/score" in spec["paths"]
        assert (await client.get("/docs")).status_code == 200
        r = await client.get("/nope")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


async def test_not_ready_until_a_config_applies(toy_repo, tmp_path) -> None:
    """A routing file naming a model that is not exported: /readyz says why, /v1/score is 503."""
    import httpx

    from ctrserve.service.app import create_app

    bad = tmp_path / "r.yaml"
    bad.write_text(ROUTING.replace("version: 2", "version: 5"))
    app = create_app(toy_settings(toy_repo, bad), store_factory=lambda s, n, v: MemoryStore(s))
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://g") as client:
        await asyncio.sleep(0.3)
        r = await client.get("/readyz")
        assert r.status_code == 503 and "version 5 is not in" in r.json()["checks"]["routing"]
        assert "config_error" not in r.json()  # a model that may still appear: retried, not a config error
        r = await client.post("/v1/score", json=BODY)
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"


@pytest.mark.parametrize("case", ["unreadable file", "invalid file", "two models, no file"])
async def test_readyz_names_configuration_errors(toy_repo, tmp_path, case: str) -> None:
    """A start-up failure no retry can fix is reported as `config_error` (launchers stop waiting)."""
    import shutil

    import httpx

    from ctrserve.service.app import create_app

    routing, repo = tmp_path / "r.yaml", toy_repo
    if case == "invalid file":
        routing.write_text("experiments: [{name: x}]")
    elif case == "two models, no file":
        repo = tmp_path / "repo"
        shutil.copytree(toy_repo, repo)
        shutil.copytree(toy_repo / "toy", repo / "other")
        routing = None
    app = create_app(toy_settings(repo, routing), store_factory=lambda s, n, v: MemoryStore(s))
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://g") as client:
        await asyncio.sleep(0.3)
        r = await client.get("/readyz")
    expected = {"unreadable file": "cannot read routing config", "invalid file": "routing",
                "two models, no file": "no routing config given"}[case]
    assert r.status_code == 503 and expected in r.json()["config_error"], r.json()


async def test_an_unexpected_bug_is_a_json_500_without_a_trace(make_settings, monkeypatch) -> None:
    from ctrserve.service.gateway import Gateway

    async def boom(self, *args, **kwargs):
        raise RuntimeError("secret internals")

    async with running(make_settings()) as (client, _, _):
        monkeypatch.setattr(Gateway, "score", boom)
        r = await client.post("/v1/score", json={**BODY, "request_id": "bug-1"})
        assert r.status_code == 500
        assert r.json() == {"error": {"code": "internal", "message": "internal error; the request id is in the "
                                      "gateway log"}, "request_id": "bug-1"}
        assert "secret" not in r.text and "Traceback" not in r.text
