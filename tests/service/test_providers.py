"""The embedded backend's execution provider (service/backends/providers.py) on this CPU-only
machine: the settings validate, the provider list handed to InferenceSession is right, CUDA asked
for falls back to the CPU with one warning saying why, the provider in use is reported, and I/O
binding gives the plain run's scores."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from gateway_toy import expected_scores, running, toy_manifest, toy_onnx, toy_settings, write_toy_repo
from pydantic import ValidationError
from test_batching import grouped_manifest, grouped_toy_onnx, request

from ctrserve.service.backends import providers as prov
from ctrserve.service.backends.batching import BatchingBackend
from ctrserve.service.backends.onnxruntime import OnnxRuntimeBackend
from ctrserve.service.backends.providers import ProviderOptions, session_providers
from ctrserve.service.settings import BackendSettings

pytestmark = pytest.mark.quick
CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


# -- settings --------------------------------------------------------------------------------
@pytest.mark.parametrize(("var", "value"), [("CTRSERVE_BACKEND_PROVIDER", "gpu"),
                                            ("CTRSERVE_BACKEND_PROVIDER", "CUDAExecutionProvider"),
                                            ("CTRSERVE_BACKEND_IO_BINDING", "yes")])
def test_a_bad_value_names_the_variable_and_its_choices(monkeypatch: pytest.MonkeyPatch, var: str,
                                                        value: str) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ValidationError, match=f"{var} must be one of .*, not '{value}'"):
        BackendSettings()


def test_serve_refuses_a_bad_provider_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from ctrserve.cli import app

    monkeypatch.setenv("CTRSERVE_BACKEND_PROVIDER", "gpu")
    result = CliRunner().invoke(app, ["serve"])
    assert result.exit_code == 2, result.output
    assert "CTRSERVE_BACKEND_PROVIDER must be one of cpu, cuda, not 'gpu'" in result.output
    assert "Traceback" not in result.output


def test_provider_settings_default_to_the_cpu_and_accept_any_case(monkeypatch: pytest.MonkeyPatch) -> None:
    s = BackendSettings()
    assert (s.provider, s.cuda_device_id, s.io_binding) == ("cpu", 0, "auto")
    monkeypatch.setenv("CTRSERVE_BACKEND_PROVIDER", " CUDA")
    monkeypatch.setenv("CTRSERVE_BACKEND_CUDA_DEVICE_ID", "1")
    s = BackendSettings()
    assert (s.provider, s.cuda_device_id) == ("cuda", 1)
    monkeypatch.setenv("CTRSERVE_BACKEND_CUDA_DEVICE_ID", "-1")
    with pytest.raises(ValidationError, match="cuda_device_id"):
        BackendSettings()


# -- the provider list -----------------------------------------------------------------------
def test_the_provider_list_handed_to_onnx_runtime() -> None:
    assert session_providers(ProviderOptions("cpu"), [CUDA, CPU]) == ([CPU], None)
    assert session_providers(ProviderOptions("cuda", device_id=1), [CUDA, CPU]) == \
        ([(CUDA, {"device_id": "1"}), CPU], None)
    providers, reason = session_providers(ProviderOptions("cuda"), ["AzureExecutionProvider", CPU])
    assert providers == [CPU] and "onnxruntime-gpu" in str(reason) and CUDA in str(reason)


def test_io_binding_auto_follows_the_provider_in_use() -> None:
    assert not ProviderOptions("cuda", io_binding="auto").binds("cpu")
    assert ProviderOptions("cuda", io_binding="auto").binds("cuda")
    assert ProviderOptions("cpu", io_binding="on").binds("cpu")
    assert not ProviderOptions("cuda", io_binding="off").binds("cuda")


# -- loading on this CPU-only machine ----------------------------------------------------------
def toy_backend(tmp_path: Path, **options: Any) -> OnnxRuntimeBackend:
    m = toy_manifest()
    toy_onnx(m, tmp_path / "model.onnx")
    return OnnxRuntimeBackend("toy", 1, tmp_path / "model.onnx", m.output.name, providers=ProviderOptions(**options))


def fallback_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "PROVIDER" in r.getMessage()]


async def test_cuda_asked_for_on_a_cpu_build_runs_on_the_cpu_and_says_so(tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    assert CUDA not in ort.get_available_providers(), "this test expects the CPU onnxruntime wheel"
    backend = toy_backend(tmp_path, provider="cuda")
    with caplog.at_level(logging.INFO):
        await backend.start()
    [line] = fallback_warnings(caplog)
    assert "CTRSERVE_BACKEND_PROVIDER=cuda" in line and "running on cpu" in line and "onnxruntime-gpu" in line
    assert backend.provider == "cpu" and not backend.io_binding  # auto: no binding on the CPU
    r = request(np.random.default_rng(0), 5)
    np.testing.assert_allclose(await backend.infer(r, 5.0), expected_scores(r), atol=1e-6)
    await backend.close()


class SessionSpy:
    """``onnxruntime.InferenceSession`` recording its ``providers``; with CUDA in the list it either
    raises as the CUDA provider does without a GPU, or builds the CPU session and claims CUDA."""

    def __init__(self, real: Any, cuda: str):
        self.real, self.cuda, self.calls = real, cuda, []

    def __call__(self, path: str, sess_options: Any = None, providers: Any = None, **kwargs: Any) -> Any:
        self.calls.append((providers, kwargs))
        names = [p[0] if isinstance(p, tuple) else p for p in providers]
        session = self.real(path, sess_options=sess_options, providers=[CPU])
        if CUDA not in names:
            return session
        if self.cuda == "fails":
            raise RuntimeError("CUDA failure 100: no CUDA-capable device is detected")
        if self.cuda == "ignored":  # what ORT does when the provider library loads but finds no device
            return session
        session.get_providers = lambda: [CUDA, CPU]
        return session


@pytest.fixture()
def cuda_build(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """An onnxruntime that lists the CUDA provider (as the GPU wheel does); records preload calls."""
    preloads: list[str] = []
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(ort, "preload_dlls", lambda *a, **k: preloads.append("called"), raising=False)
    monkeypatch.setattr(prov, "_preloaded", False)
    return preloads


@pytest.mark.parametrize("cuda", ["fails", "ignored"])
async def test_a_cuda_provider_that_cannot_run_falls_back_to_the_cpu(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        cuda_build: list[str], cuda: str) -> None:
    spy = SessionSpy(ort.InferenceSession, cuda)
    monkeypatch.setattr(ort, "InferenceSession", spy)
    backend = toy_backend(tmp_path, provider="cuda", device_id=2)
    with caplog.at_level(logging.INFO):
        await backend.start()
    (providers, kwargs), *rest = spy.calls
    assert providers == [(CUDA, {"device_id": "2"}), CPU] and kwargs == {"enable_fallback": 0}
    assert [p for p, _ in rest] == ([[CPU]] if cuda == "fails" else [])
    [line] = fallback_warnings(caplog)
    assert "running on cpu" in line and ("no CUDA-capable device" in line if cuda == "fails" else "did not register"
                                         in line)
    assert backend.provider == "cpu" and cuda_build == ["called"]
    await backend.close()


async def test_a_session_on_cuda_is_reported_and_binds_by_default(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        cuda_build: list[str]) -> None:
    monkeypatch.setattr(ort, "InferenceSession", SessionSpy(ort.InferenceSession, "claimed"))
    backend = toy_backend(tmp_path, provider="cuda")
    with caplog.at_level(logging.INFO):
        await backend.start()
    assert backend.provider == "cuda" and backend.io_binding and not fallback_warnings(caplog)
    await backend.close()


async def test_the_cpu_provider_never_asks_for_cuda(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    cuda_build: list[str]) -> None:
    spy = SessionSpy(ort.InferenceSession, "claimed")
    monkeypatch.setattr(ort, "InferenceSession", spy)
    backend = toy_backend(tmp_path)
    await backend.start()
    assert [p for p, _ in spy.calls] == [[CPU]] and backend.provider == "cpu" and cuda_build == []
    await backend.close()


# -- I/O binding -------------------------------------------------------------------------------
async def test_io_binding_gives_the_plain_runs_scores(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    reqs = [request(rng, b) for b in (1, 4, 9)]
    scores = {}
    for mode in ("off", "on"):
        backend = toy_backend(tmp_path, io_binding=mode)
        await backend.start()
        assert backend.io_binding is (mode == "on")
        scores[mode] = [await backend.infer(r, 5.0) for r in reqs] + [backend.infer_inline(r) for r in reqs]
        await backend.close()
    for plain, bound in zip(scores["off"], scores["on"], strict=True):
        np.testing.assert_array_equal(plain, bound)


async def test_io_binding_on_the_batched_call_gives_the_plain_runs_scores(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    reqs = [request(rng, b) for b in (3, 1, 7, 2, 5)]
    got = {}
    m = grouped_manifest()
    grouped_toy_onnx(m, tmp_path / "model.grouped.onnx")
    for mode in ("off", "on"):
        inner = OnnxRuntimeBackend("toy", 1, tmp_path / "model.grouped.onnx", m.output.name,
                                   providers=ProviderOptions(io_binding=mode))
        backend = BatchingBackend(m, inner, 1000, 0.0)
        await backend.start()
        assert backend.grouped.io_binding is (mode == "on")
        got[mode] = await asyncio.gather(*(backend.infer(r, 5.0) for r in reqs))
        assert backend.stats.calls < len(reqs)  # they did run batched
        await backend.close()
    for r, plain, bound in zip(reqs, got["off"], got["on"], strict=True):
        np.testing.assert_array_equal(plain, bound)
        np.testing.assert_allclose(bound, expected_scores(r), atol=1e-6)


# -- the gateway reports where each model runs ---------------------------------------------------
async def test_readyz_and_metrics_show_the_provider_in_use(tmp_path: Path) -> None:
    repo = write_toy_repo(tmp_path / "repo")
    settings = toy_settings(repo)
    settings.backend.provider = "cuda"  # not available here: the model runs on the CPU
    settings.backend.io_binding = "on"
    async with running(settings) as (client, app, _):
        ready = (await client.get("/readyz")).json()
        assert ready["providers"] == {"toy v1": "cpu"}
        backend = app.state.gateway.registry.get(("toy", 1)).backend
        assert backend.providers == ProviderOptions("cuda", 0, "on") and backend.io_binding
        r = await client.post("/v1/score", json={"user_id": "u1", "candidates": [{"item_id": "10"}]})
        assert r.status_code == 200, r.text
        metrics = (await client.get("/metrics")).text
        assert 'ctrserve_model_provider_info{model="toy",provider="cpu",version="1"} 1.0' in metrics
