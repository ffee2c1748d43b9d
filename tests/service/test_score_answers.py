"""What ``POST /v1/score`` answers, case by case: status, body and headers for valid and invalid
requests, in the order the checks run (JSON, readiness, API key, validation, scoring).

``data/score_answers.json`` holds the answers the gateway gave before its request path was
rewritten (one function now serves both the direct path and the FastAPI route); every case must
still be answered exactly so, on both paths and with either body decoder (msgspec first, or
pydantic only)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from gateway_toy import running

pytestmark = pytest.mark.quick

ANSWERS = json.loads((Path(__file__).parent / "data" / "score_answers.json").read_text())
BODY = {"user_id": "u1", "context": {"device": 1, "hour": 9},
        "candidates": [{"item_id": "10"}, {"item_id": "12", "features": {"price": 3.0}}, {"item_id": 11}]}
JSON = {"content-type": "application/json"}


def _body(**patch: Any) -> bytes:
    return json.dumps({**BODY, **patch}).encode()


#: (name, body bytes or None for no body, headers)
CASES: list[tuple[str, bytes | None, dict[str, str]]] = [
    ("valid", _body(), JSON),
    ("request id", _body(request_id="abc-1"), JSON),
    ("model override", _body(model="toy"), JSON),
    ("model version", _body(model="toy:1"), JSON),
    ("unknown model", _body(model="nope"), JSON),
    ("bad model name", _body(model="bad name!"), JSON),
    ("arm header", _body(), {**JSON, "X-Ctrserve-Arm": "treatment"}),
    ("arm header, other case", _body(), {**JSON, "x-ctrserve-ARM": "control"}),
    ("unknown arm", _body(), {**JSON, "X-Ctrserve-Arm": "zzz"}),
    ("unknown experiment", _body(), {**JSON, "X-Ctrserve-Experiment": "zzz"}),
    ("json+suffix type", _body(), {"content-type": "application/vnd.ctr+json; charset=utf-8"}),
    ("upper-case type", _body(), {"content-type": "APPLICATION/JSON"}),
    ("text type", _body(), {"content-type": "text/plain"}),
    ("no content type", _body(), {}),
    ("malformed type", _body(), {"content-type": "json"}),
    ("no body", None, JSON),
    ("empty body", b"", JSON),
    ("not json", b"{not json", JSON),
    ("not json, text type", b"{not json", {"content-type": "text/plain"}),
    ("null", b"null", JSON),
    ("array", b"[1, 2]", JSON),
    ("string", b'"x"', JSON),
    ("number", b"1", JSON),
    ("not utf-8", b'{"user_id": "\xff\xfe"}', JSON),
    ("utf-16", _body().decode().encode("utf-16"), JSON),
    ("utf-8 bom", b"\xef\xbb\xbf" + _body(), JSON),
    ("NaN", b'{"user_id": "u1", "context": {"age": NaN}, "candidates": [{"item_id": "10"}]}', JSON),
    ("big int id", b'{"user_id": 123456789012345678901234567890, "candidates": [{"item_id": 1e400}]}', JSON),
    ("numeric ids", b'{"user_id": 7, "candidates": [{"item_id": 1.5}, {"item_id": 10}]}', JSON),
    ("bool id", b'{"user_id": true, "candidates": [{"item_id": "10"}]}', JSON),
    ("duplicate keys", b'{"user_id": "x", "user_id": "u2", "candidates": [{"item_id": "10"}]}', JSON),
    ("lone surrogate", b'{"user_id": "\\ud800", "candidates": [{"item_id": "10"}]}', JSON),
    ("extra field", _body(surprise=1), JSON),
    ("no candidates", _body(candidates=[]), JSON),
    ("too many candidates", _body(candidates=[{"item_id": "10"}] * 4), JSON),
    ("candidate extra", _body(candidates=[{"item_id": "10", "score": 1}]), JSON),
    ("many errors", _body(user_id=None, candidates=[{"x": i} for i in range(12)]), JSON),
    ("unknown feature", _body(context={"nope": 1}), JSON),
    ("bad feature value", _body(context={"age": "old"}), JSON),
    ("nested feature", _body(context={"age": {"nested": 1}}), JSON),
    ("too many features", _body(context={f"k{i}": 1 for i in range(9)}), JSON),
    ("bad request id", _body(request_id="has space"), JSON),
    ("too large", _body(context={"hist_item_id": ["10"] * 1000}), JSON),
]
KEY_CASES = [("no key", _body(), JSON), ("no key, not json", b"{x", JSON),
             ("no key, invalid", _body(user_id=None), JSON), ("no key, no body", None, JSON),
             ("wrong key", _body(), {**JSON, "x-api-key": "nope"}),
             ("right key", _body(), {**JSON, "x-api-key": "s3cret"}),
             ("right key, invalid", _body(candidates=[]), {**JSON, "x-api-key": "s3cret"})]
NOT_READY_CASES = [("not ready", _body()), ("not ready, not json", b"{x"), ("not ready, invalid", _body(user_id=None))]


async def _send(client: httpx.AsyncClient, body: bytes | None, headers: dict[str, str], rid: str,
                method: str = "POST") -> list[Any]:
    r = await client.request(method, "/v1/score", content=body, headers={**headers, "x-request-id": rid})
    try:
        content: Any = r.json()
    except ValueError:
        content = r.text
    kept = {k: v for k, v in r.headers.items() if k.startswith("x-") or k in ("content-type", "content-length")}
    return [r.status_code, content, kept]


@pytest.fixture(params=["direct", "through FastAPI"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways into scoring: the front's direct path and FastAPI's route (taken while FastAPI's
    OpenTelemetry instrumentation is on)."""
    from ctrserve.service.app import GatewayApp

    if request.param != "direct":
        monkeypatch.setattr(GatewayApp, "telemetry_on", lambda self: True)
    return request.param


@pytest.fixture(params=["msgspec", "pydantic"])
def decoder(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """``CTRSERVE_API_DECODER``, which the settings the tests make read from the environment."""
    monkeypatch.setenv("CTRSERVE_API_DECODER", request.param)
    return request.param


async def test_every_case_is_answered_as_before(make_settings, path: str, decoder: str) -> None:
    statuses = set()
    async with running(make_settings(max_candidates=3, max_feature_keys=8, max_body_bytes=4096)) as (client, _, _):
        for name, body, headers in CASES:
            got = await _send(client, body, headers, f"rid-{name}")
            assert got == ANSWERS[name], name
            statuses.add(got[0])
        for method in ("GET", "PUT"):  # other methods go through FastAPI (405)
            assert await _send(client, _body(), JSON, "rid-method", method) == ANSWERS[f"method {method}"]
    assert {200, 400, 404, 413, 422} <= statuses  # the cases reach every kind of answer


async def test_checks_run_in_order(make_settings, path: str, decoder: str) -> None:
    """JSON before readiness before the API key before validation."""
    async with running(make_settings(key="s3cret")) as (client, app, _):
        for name, body, headers in KEY_CASES:
            assert await _send(client, body, headers, f"rid-{name}") == ANSWERS[f"key: {name}"], name
        gw, app.state.gateway = app.state.gateway, None  # starting: 503 after the JSON check, before the key
        try:
            for name, body in NOT_READY_CASES:
                assert await _send(client, body, JSON, f"rid-{name}") == ANSWERS[f"nr: {name}"], name
        finally:
            app.state.gateway = gw


async def test_the_body_cap_holds_without_a_content_length(make_settings) -> None:
    async with running(make_settings(max_body_bytes=4096)) as (client, _, _):
        async def chunks():
            for _ in range(10):
                yield b" " * 500

        r = await client.post("/v1/score", content=chunks(), headers=JSON)
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
        metrics = (await client.get("/metrics")).text
        assert 'ctrserve_requests_total{arm="none",route="/v1/score",status="413"}' in metrics


async def test_metrics_count_answers_under_their_arm(make_settings, path: str) -> None:
    async with running(make_settings(max_feature_keys=8)) as (client, _, _):
        assert (await client.post("/v1/score", content=_body(), headers=JSON)).status_code == 200
        r = await client.post("/v1/score", content=_body(context={"nope": 1}), headers=JSON)
        assert r.status_code == 422 and r.headers["x-ctrserve-arm"] == "treatment"
        metrics = (await client.get("/metrics")).text
    assert 'ctrserve_requests_total{arm="treatment",route="/v1/score",status="200"} 1.0' in metrics
    assert 'ctrserve_requests_total{arm="treatment",route="/v1/score",status="422"} 1.0' in metrics
    assert 'ctrserve_stage_seconds_count{arm="treatment",stage="inference"} 1.0' in metrics


async def test_scoring_skips_fastapi_unless_traced(make_settings, monkeypatch) -> None:
    """POST /v1/score is answered by the front directly; every other request, and scoring while
    FastAPI's OpenTelemetry instrumentation is on, goes through FastAPI."""
    from fastapi import FastAPI

    entered: list[str] = []
    fastapi_call = FastAPI.__call__

    async def counted(self: Any, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            entered.append(scope["path"])
        await fastapi_call(self, scope, receive, send)

    monkeypatch.setattr(FastAPI, "__call__", counted)
    async with running(make_settings()) as (client, app, _):
        r = await client.post("/v1/score", content=_body(), headers={**JSON, "x-request-id": "rid-front"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "rid-front" and len(r.json()["scores"]) == 3
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/v1/score")).status_code == 405
        assert entered == ["/healthz", "/v1/score"]
        monkeypatch.setattr(app.front, "traced", lambda: True)
        r = await client.post("/v1/score", content=_body(), headers=JSON)
        assert r.status_code == 200 and entered[-1] == "/v1/score" and len(entered) == 3


async def test_openapi_declares_the_score_request(make_settings) -> None:
    async with running(make_settings()) as (client, _, _):
        spec = (await client.get("/openapi.json")).json()
    op = spec["paths"]["/v1/score"]["post"]
    assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"] == "#/components/schemas/ScoreRequest"
    assert {"ScoreRequest", "Candidate", "ScoreResponse"} <= set(spec["components"]["schemas"])
    assert spec["components"]["schemas"]["ScoreRequest"]["properties"]["candidates"]["items"]["$ref"] == \
        "#/components/schemas/Candidate"
    assert {"200", "400", "401", "404", "413", "422", "502", "503", "504"} <= set(op["responses"])


async def test_a_bug_is_a_json_500_without_a_trace(make_settings, monkeypatch, path: str) -> None:
    from ctrserve.service.gateway import Gateway

    async def boom(self, *args, **kwargs):
        raise RuntimeError("secret internals")

    async with running(make_settings()) as (client, _, _):
        monkeypatch.setattr(Gateway, "score", boom)
        status, body, headers = await _send(client, _body(), JSON, "rid-bug")
    assert status == 500 and body["error"]["code"] == "internal" and "secret" not in json.dumps(body)
    assert headers["x-request-id"] == "rid-bug"


async def test_request_ids_are_unique_when_the_client_sends_none(make_settings) -> None:
    async with running(make_settings()) as (client, _, _):
        ids = [(await client.post("/v1/score", content=_body(), headers=JSON)).headers["x-request-id"]
               for _ in range(3)]
        ids.append((await client.get("/healthz")).headers["x-request-id"])
    assert len(set(ids)) == 4 and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids), ids
