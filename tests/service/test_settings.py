"""Gateway settings: documented, environment-overridable, and listed in docs/gateway.md."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from ctrserve.service.settings import SETTINGS_CLASSES, ApiSettings, GatewaySettings, StoreSettings

pytestmark = pytest.mark.quick

DOC = Path(__file__).resolve().parents[2] / "docs" / "gateway.md"


def _env_names() -> list[str]:
    return [f"{cls.model_config['env_prefix']}{name.upper()}" for cls in SETTINGS_CLASSES for name in cls.model_fields]


def test_every_setting_is_described_and_in_the_docs() -> None:
    doc = DOC.read_text()
    for cls in SETTINGS_CLASSES:
        assert cls.__doc__, cls
        for name, field in cls.model_fields.items():
            assert field.description, f"{cls.__name__}.{name} has no description"
    missing = [v for v in _env_names() if f"`{v}`" not in doc]
    assert not missing, f"docs/gateway.md lacks {missing}"


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CTRSERVE_API_MAX_CANDIDATES", "12")
    monkeypatch.setenv("CTRSERVE_STORE_FAILURE", "degrade")
    monkeypatch.setenv("CTRSERVE_BACKEND_TRITON_URL", "triton:8001")
    s = GatewaySettings.from_env()
    assert s.api.max_candidates == 12 and s.store.failure == "degrade"
    assert s.backend_kind == "triton"
    monkeypatch.setenv("CTRSERVE_STORE_FAILURE", "sometimes")
    with pytest.raises(ValidationError, match="failure"):
        StoreSettings()


def test_store_budget_must_leave_time_to_score() -> None:
    with pytest.raises(ValidationError, match="must be below"):
        GatewaySettings.from_env(api=ApiSettings(deadline_ms=100), store=StoreSettings(timeout_ms=100))


def test_service_never_imports_torch() -> None:
    """The serving image has no torch: every gateway module must import without it."""
    import subprocess
    import sys

    modules = ["app", "api", "admin", "assemble", "cli", "errors", "execution", "features", "gateway", "http", "logs",
               "metrics", "reader", "registry", "request", "routing", "events", "impressions", "outcomes",
               "settings", "backends", "backends.onnxruntime", "backends.triton"]
    code = ("import sys\n" + "".join(f"import ctrserve.service.{m}\n" for m in modules) +
            "bad = [m for m in ('torch', 'onnx') if m in sys.modules]\nassert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_json_log_lines_carry_the_request_id() -> None:
    import json
    import logging

    from ctrserve.service.logs import JsonFormatter, request_id_var

    record = logging.LogRecord("ctrserve.access", logging.INFO, __file__, 1, "request %s", ("done",), None)
    record.arm = "control"
    token = request_id_var.set("rid-1")
    try:
        line = JsonFormatter().format(record)
    finally:
        request_id_var.reset(token)
    out = json.loads(line)
    assert (out["msg"], out["request_id"], out["arm"], out["level"]) == ("request done", "rid-1", "control", "info")


def test_api_key_variable_and_its_old_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """CTRSERVE_API_KEY sets the key; the old CTRSERVE_API_API_KEY is refused (fail closed) instead of
    being ignored, which would serve /v1/score without authentication."""
    monkeypatch.setenv("CTRSERVE_API_KEY", "s3cret")
    assert ApiSettings().key is not None and ApiSettings().key.get_secret_value() == "s3cret"
    monkeypatch.setenv("CTRSERVE_API_API_KEY", "old")
    with pytest.raises(ValidationError, match="renamed to CTRSERVE_API_KEY"):
        GatewaySettings.from_env()
