"""Hooks the load tests rely on: the arm / model-version response headers, ``serve --workers``,
and the Redis timeout the gateway reads with."""

from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

import pytest
from gateway_toy import running

pytestmark = pytest.mark.quick

BODY = {"user_id": "u1", "candidates": [{"item_id": "10"}, {"item_id": "11"}]}


async def test_score_responses_name_arm_and_model_version(make_settings) -> None:
    async with running(make_settings()) as (client, _, stores):
        for arm, version in (("control", 1), ("treatment", 2)):
            r = await client.post("/v1/score", json=BODY, headers={"X-Ctrserve-Arm": arm})
            assert r.status_code == 200, r.text
            assert r.headers["x-ctrserve-arm"] == arm == r.json()["arm"]
            assert r.headers["x-ctrserve-model-version"] == f"toy:{version}"
        r = await client.post("/v1/score", json={**BODY, "model": "toy:1"})
        assert (r.headers["x-ctrserve-arm"], r.headers["x-ctrserve-model-version"]) == ("direct", "toy:1")
        # an error after routing still names the arm (per-arm failure attribution)
        stores[0].fail = True
        r = await client.post("/v1/score", json=BODY, headers={"X-Ctrserve-Arm": "treatment"})
        assert r.status_code == 503
        assert (r.headers["x-ctrserve-arm"], r.headers["x-ctrserve-model-version"]) == ("treatment", "toy:2")
        stores[0].fail = False
        r = await client.post("/v1/score", json={**BODY, "context": {"nope": 1}}, headers={"X-Ctrserve-Arm": "control"})
        assert r.status_code == 422 and r.headers["x-ctrserve-arm"] == "control"
        # no arm known: no header (rather than a made-up one)
        r = await client.post("/v1/score", json=BODY, headers={"X-Ctrserve-Arm": "zzz"})
        assert r.status_code == 404 and "x-ctrserve-arm" not in r.headers
        r = await client.post("/v1/score", json={"user_id": "u1", "candidates": []})
        assert r.status_code == 422 and "x-ctrserve-arm" not in r.headers
        assert "x-ctrserve-arm" not in (await client.get("/healthz")).headers


def _serve(args: list[str], env: dict[str, str]) -> tuple[object, dict[str, str]]:
    """Run ``ctrserve serve ARGS`` with uvicorn stubbed; returns (the uvicorn.run call, env seen by it)."""
    from typer.testing import CliRunner

    from ctrserve.cli import app

    seen: dict[str, object] = {}

    def fake_run(*a: object, **kw: object) -> None:
        seen["call"] = (a, kw)
        seen["env"] = {k: v for k, v in os.environ.items() if k.startswith("CTRSERVE_")}

    with mock.patch.dict(os.environ, env, clear=False), mock.patch("uvicorn.run", fake_run), \
            mock.patch("ctrserve.service.logs.configure_logging"):
        for k in [k for k in os.environ if k.startswith("CTRSERVE_") and k not in env]:
            del os.environ[k]
        result = CliRunner().invoke(app, ["serve", *args])
    assert result.exit_code == 0, result.output
    return seen["call"], seen["env"]  # type: ignore[return-value]


def test_serve_workers_starts_uvicorn_factory_processes(toy_repo: Path) -> None:
    from ctrserve.service.app import WORKER_FACTORY, create_app_from_env

    (args, kw), env = _serve(["--workers", "3", "--port", "8123", "--model-repository", str(toy_repo),
                              "--redis-url", "redis://cache:6379/1", "--store-failure", "degrade", "--log-text"], {})
    assert args == (WORKER_FACTORY,) and WORKER_FACTORY == "ctrserve.service.app:create_app_from_env"
    assert callable(create_app_from_env)
    assert kw["factory"] is True and kw["workers"] == 3
    assert (kw["port"], kw["loop"], kw["http"], kw["lifespan"]) == (8123, "uvloop", "httptools", "on")
    # worker processes rebuild their settings from the environment: the options must be there
    assert env["CTRSERVE_SERVER_PORT"] == "8123" and env["CTRSERVE_BACKEND_MODEL_REPOSITORY"] == str(toy_repo)
    assert env["CTRSERVE_REDIS_URL"] == "redis://cache:6379/1" and env["CTRSERVE_STORE_FAILURE"] == "degrade"
    assert env["CTRSERVE_SERVER_LOG_JSON"] == "false"


def test_serve_rejects_zero_workers() -> None:
    from typer.testing import CliRunner

    from ctrserve.cli import app

    result = CliRunner().invoke(app, ["serve", "--workers", "0"])
    assert result.exit_code == 2 and "workers" in result.output


def test_redis_timeout_defaults_to_the_store_budget() -> None:
    from ctrserve.service.features import gateway_store_config

    with mock.patch.dict(os.environ, {}, clear=True):
        assert gateway_store_config(100.0).timeout_ms == 100.0
        assert gateway_store_config(80.0, url="redis://x:1/0").timeout_ms == 80.0
    with mock.patch.dict(os.environ, {"CTRSERVE_REDIS_TIMEOUT_MS": "30"}, clear=True):
        assert gateway_store_config(100.0).timeout_ms == 30.0  # an explicit value wins


async def test_each_model_version_has_its_own_inference_threads(make_settings) -> None:
    async with running(make_settings()) as (_, app, _):
        backends = [m.backend for m in app.state.gateway.registry.loaded.values()]
        assert len(backends) == 2
        pools = {id(b.pool) for b in backends}
        assert len(pools) == 2 and all(b.pool.threads == 2 for b in backends)  # the default


@pytest.mark.parametrize("spinning", [False, True])
def test_ort_spinning_setting_reaches_the_session(toy_repo: Path, spinning: bool) -> None:
    from ctrserve.service.backends.onnxruntime import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend("toy", 1, toy_repo / "toy" / "1" / "model.onnx", "score", threads=1,
                                 intra_op_threads=2, spinning=spinning)
    opts = backend._load().get_session_options()
    assert opts.intra_op_num_threads == 2
    if spinning:  # ORT's own default (spin) is left alone
        with pytest.raises(RuntimeError, match="does not have configuration"):
            opts.get_session_config_entry("session.intra_op.allow_spinning")
    else:
        assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    backend.pool.close()
