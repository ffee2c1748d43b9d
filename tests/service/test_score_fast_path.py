"""POST /v1/score answered by the middleware's fast path (``api.score_asgi``) must answer exactly
as FastAPI's route does: the same status, body and headers for valid and invalid requests, the
same order of checks (JSON, readiness, API key, validation), the same metrics and request ids."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from gateway_toy import running

from ctrserve.service.api import GatewayMiddleware

pytestmark = pytest.mark.quick

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


async def _send(client: httpx.AsyncClient, body: bytes | None, headers: dict[str, str], rid: str,
                method: str = "POST") -> tuple[int, Any, dict[str, str]]:
    r = await client.request(method, "/v1/score", content=body, headers={**headers, "x-request-id": rid})
    try:
        content: Any = r.json()
    except ValueError:
        content = r.text
    kept = {k: v for k, v in r.headers.items() if k.startswith("x-") or k in ("content-type", "content-length")}
    return r.status_code, content, kept


async def _both(client: httpx.AsyncClient, app: Any, body: bytes | None, headers: dict[str, str], rid: str,
                method: str = "POST") -> tuple[Any, Any]:
    mw = app.gateway_middleware()
    out = []
    for fast in (False, True):
        mw.fast_score = fast
        out.append(await _send(client, body, headers, rid, method))
    mw.fast_score = True
    return out[0], out[1]


async def test_fast_path_answers_as_the_fastapi_route(make_settings) -> None:
    await _send_all(make_settings(max_candidates=3, max_feature_keys=8, max_body_bytes=4096))


async def test_fast_path_checks_in_fastapi_order(make_settings) -> None:
    async with running(make_settings(key="s3cret")) as (client, app, _):
        for name, body, headers in [("no key", _body(), JSON), ("no key, not json", b"{x", JSON),
                                    ("no key, invalid", _body(user_id=None), JSON), ("no key, no body", None, JSON),
                                    ("wrong key", _body(), {**JSON, "x-api-key": "nope"}),
                                    ("right key", _body(), {**JSON, "x-api-key": "s3cret"}),
                                    ("right key, invalid", _body(candidates=[]), {**JSON, "x-api-key": "s3cret"})]:
            old, new = await _both(client, app, body, headers, f"rid-{name}")
            assert old == new, name
        gw, app.state.gateway = app.state.gateway, None  # starting: 503 after the JSON check, before the key
        try:
            for name, body in [("not ready", _body()), ("not ready, not json", b"{x"),
                               ("not ready, invalid", _body(user_id=None))]:
                old, new = await _both(client, app, body, JSON, f"rid-{name}")
                assert old == new, name
            assert old[0] == 503
        finally:
            app.state.gateway = gw


async def _send_all(settings: Any) -> None:
    async with running(settings) as (client, app, _):
        statuses = set()
        for name, body, headers in CASES:
            old, new = await _both(client, app, body, headers, f"rid-{name}")
            assert old == new, name
            statuses.add(old[0])
        assert {200, 400, 404, 413, 422} <= statuses  # the cases reach every kind of answer
        for method in ("GET", "PUT"):  # other methods still go through FastAPI (405)
            old, new = await _both(client, app, _body(), JSON, "rid-method", method)
            assert old == new and old[0] == 405

        async def chunks():  # no content-length: the cap is enforced while reading
            for _ in range(10):
                yield b" " * 500

        r = await client.post("/v1/score", content=chunks(), headers=JSON)
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
        metrics = (await client.get("/metrics")).text
        assert 'ctrserve_requests_total{arm="control",route="/v1/score",status="200"}' in metrics
        assert 'ctrserve_stage_seconds_count{arm="control",stage="inference"}' in metrics


async def test_fast_path_is_on_by_default_and_keeps_the_openapi_schema(make_settings) -> None:
    async with running(make_settings()) as (client, app, _):
        assert isinstance(app.gateway_middleware(), GatewayMiddleware) and app.gateway_middleware().fast_score
        spec = (await client.get("/openapi.json")).json()
        op = spec["paths"]["/v1/score"]["post"]
        assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ScoreRequest")
        assert {"200", "400", "401", "404", "413", "422", "502", "503", "504"} <= set(op["responses"])


async def test_a_bug_in_the_fast_path_is_a_json_500(make_settings, monkeypatch) -> None:
    from ctrserve.service.gateway import Gateway

    async def boom(self, *args, **kwargs):
        raise RuntimeError("secret internals")

    async with running(make_settings()) as (client, app, _):
        monkeypatch.setattr(Gateway, "score", boom)
        old, new = await _both(client, app, _body(), JSON, "rid-bug")
        assert old == new and new[0] == 500 and "secret" not in json.dumps(new[1])


async def test_scoring_requests_skip_fastapis_layers_unless_telemetry_is_on(make_settings, monkeypatch) -> None:
    """POST /v1/score enters the gateway middleware directly (``GatewayApp``); everything else, and
    scoring while FastAPI's native telemetry is on, goes through FastAPI's whole stack."""
    async with running(make_settings()) as (client, app, _):
        assert (await client.get("/healthz")).status_code == 200  # builds the stack, finds the middleware
        stack, entered = app.middleware_stack, []

        async def counted(scope: Any, receive: Any, send: Any) -> None:
            entered.append(scope["path"])
            await stack(scope, receive, send)

        app.middleware_stack = counted
        r = await client.post("/v1/score", content=_body(), headers={**JSON, "x-request-id": "rid-front"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "rid-front" and len(r.json()["scores"]) == 3
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/v1/score")).status_code == 405  # not the fast path's method
        assert entered == ["/healthz", "/v1/score"]
        monkeypatch.setattr(app, "_native_telemetry", _NoTelemetry())
        r = await client.post("/v1/score", content=_body(), headers=JSON)
        assert r.status_code == 200 and entered[-1] == "/v1/score" and len(entered) == 3


class _NoTelemetry:
    """FastAPI's telemetry hook reporting itself on, passing requests through untraced."""

    def enabled(self) -> bool:
        return True

    async def __call__(self, app: Any, scope: Any, receive: Any, send: Any, **_: Any) -> None:
        await app(scope, receive, send)


async def test_request_ids_are_unique_when_the_client_sends_none(make_settings) -> None:
    async with running(make_settings()) as (client, _, _):
        ids = [(await client.post("/v1/score", content=_body(), headers=JSON)).headers["x-request-id"]
               for _ in range(3)]
        ids.append((await client.get("/healthz")).headers["x-request-id"])
    assert len(set(ids)) == 4 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
