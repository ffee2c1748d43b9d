"""Gateway configuration: one pydantic-settings class per component, every field documented.

Environment variables are ``CTRSERVE_<COMPONENT>_<FIELD>`` (e.g. ``CTRSERVE_API_MAX_CANDIDATES``).
The feature store's connection settings belong to ``ctrserve.feature_store`` (its own class);
the gateway only decides what to do when the store fails (``CTRSERVE_STORE_FAILURE``).
``docs/gateway.md`` carries the same table; ``tests/service/test_settings.py`` keeps them in step.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, get_args

from pydantic import BaseModel, Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ctrserve.paths import REPO_ROOT


class ServerSettings(BaseSettings):
    """The HTTP server (uvicorn) and logging."""

    model_config = SettingsConfigDict(env_prefix="CTRSERVE_SERVER_", extra="ignore")

    host: str = Field("127.0.0.1", description="Interface to bind; 0.0.0.0 inside a container.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on (0 picks a free port).")
    workers: int = Field(
        1, ge=1, description="Worker processes on one port (uvicorn's process manager); each loads its own model "
                             "sessions, Redis pool and item cache, and /metrics shows the worker that answers.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    log_json: bool = Field(True, description="One JSON object per log line (false: plain text for a terminal).")
    access_log: bool = Field(True, description="Log one line per request (method, path, status, ms, arm, id).")
    graceful_shutdown_s: float = Field(
        10.0, gt=0, description="On SIGTERM, seconds to let in-flight requests finish before closing.")


class ApiSettings(BaseSettings):
    """Request limits, deadlines, authentication and failure policy of ``/v1/score``."""

    model_config = SettingsConfigDict(env_prefix="CTRSERVE_API_", extra="ignore")

    max_candidates: int = Field(1000, ge=1, description="Most candidates one request may carry (422 above).")
    max_body_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="Largest request body accepted, in bytes (413 above).")
    max_feature_keys: int = Field(
        64, ge=0, description="Most keys in `context` or in one candidate's `features` (422 above).")
    deadline_ms: float = Field(
        1000.0, gt=0, description="Per-request deadline over fetch + assembly + inference (504 when exceeded).")
    decoder: Literal["msgspec", "pydantic"] = Field(
        "msgspec", description="`/v1/score` body decoding: `msgspec` parses and validates a well-formed body in one "
                               "compiled pass and hands anything else to `pydantic` (stdlib json + pydantic, which "
                               "gives every error answer); `pydantic` always takes that path. Same answers either way.")
    #: ``key``, not ``api_key``: the variable is CTRSERVE_API_KEY
    key: SecretStr | None = Field(
        None, description="If set, `/v1/score` requires header `X-API-Key` with this value (401 otherwise).")
    admin_token: SecretStr | None = Field(
        None, description="Bearer token for `/admin/*`; unset disables the admin endpoints (403).")

    @model_validator(mode="after")
    def _renamed_key(self) -> ApiSettings:
        # fail closed: a deployment still setting the old name would otherwise serve without a key
        if os.environ.get("CTRSERVE_API_API_KEY") is not None:
            raise ValueError("CTRSERVE_API_API_KEY was renamed to CTRSERVE_API_KEY: set CTRSERVE_API_KEY instead "
                             "(and unset the old variable)")
        return self


class StoreSettings(BaseSettings):
    """How the gateway uses the feature store (connection settings: ``CTRSERVE_REDIS_*``)."""

    model_config = SettingsConfigDict(env_prefix="CTRSERVE_STORE_", extra="ignore")

    namespace: str | None = Field(
        None, description="Store namespace every model reads. Unset: per model, the namespace its export "
                          "manifest records (the prepared dataset's name, what `ctrserve store load` uses).")
    timeout_ms: float = Field(
        100.0, gt=0, description="Budget for one feature-store read; slower counts as a store failure.")
    failure: Literal["fail", "degrade"] = Field(
        "fail", description="Redis down or slow: `fail` answers 503; `degrade` scores with cold-start features "
                            "and sets `flags.degraded`.")
    early_read: bool = Field(
        True, description="Inline and auto execution: send the feature-store read as soon as the body is decoded, "
                          "so Redis answers while the body is validated and routed (off: read after validation).")


class RoutingSettings(BaseSettings):
    """A/B routing: where the config lives, hot reload, QA override headers."""

    model_config = SettingsConfigDict(env_prefix="CTRSERVE_ROUTING_", extra="ignore")

    config: Path | None = Field(
        None, description="Routing YAML (experiments and arms). Unset: one arm serving the newest version of "
                          "the only model in the model repository.")
    watch: bool = Field(False, description="Poll the routing file and apply changes (bad configs are rejected).")
    watch_interval_s: float = Field(2.0, gt=0, description="Polling interval of the routing-file watcher.")
    arm_header: str = Field("X-Ctrserve-Arm", description="Header that forces an arm by name (QA).")
    experiment_header: str = Field(
        "X-Ctrserve-Experiment", description="Header that selects a non-default experiment.")


class BackendSettings(BaseSettings):
    """Model backends: the exported model repository, embedded ONNX Runtime or Triton."""

    model_config = SettingsConfigDict(env_prefix="CTRSERVE_BACKEND_", extra="ignore")

    model_repository: Path = Field(
        REPO_ROOT / "work" / "model_repository",
        description="Exported model repository (`ctrserve export`): manifests, vocabularies, ONNX files.")
    kind: Literal["auto", "onnxruntime", "triton"] = Field(
        "auto", description="`auto`: Triton when `triton_url` is set, else embedded ONNX Runtime.")
    triton_url: str | None = Field(None, description="Triton gRPC address host:port (e.g. localhost:8001).")
    timeout_ms: float = Field(500.0, gt=0, description="Budget of one inference call (504 when exceeded).")
    ort_intra_op_threads: int = Field(1, ge=0, description="ONNX Runtime threads inside one operator (0: ORT "
                                                           "default).")
    ort_inter_op_threads: int = Field(1, ge=0, description="ONNX Runtime threads across operators (0: default).")
    ort_spinning: bool = Field(False, description="Let ONNX Runtime's intra-op threads spin while waiting for "
                                                  "work (only with intra-op threads > 1; burns CPU other work "
                                                  "needs on a shared machine).")
    execution: Literal["thread", "inline", "auto"] = Field(
        "auto", description="Embedded ONNX Runtime only: where the store read, assembly and inference run. `auto`: "
                            "inline on the event loop while a request is the only one being scored, on the "
                            "version's inference threads when others are scored with it or were within "
                            "`auto_overlap_s`. `inline`: always on the event loop, one request at a time per worker "
                            "process (run one worker per core). `thread`: the store read is awaited and inference "
                            "runs on the inference threads (docs/gateway.md, \"Where a request runs\").")
    # 2: with `auto`, two requests that arrive together compute on both cores; 1 left the second
    # core to the event loop, Redis and the load generator (docs/decisions.md, "Two inference threads per
    # model version")
    pool_threads: int = Field(2, ge=1, description="Threads running one model version's embedded inference off the "
                                                   "event loop (each version has its own; `thread` and `auto` "
                                                   "execution).")
    auto_overlap_s: float = Field(0.5, ge=0, description="`auto` execution: after requests overlapped, even a lone "
                                                         "request takes the thread path for this long (0: only "
                                                         "requests scored together do).")
    batch_max_candidates: int = Field(0, ge=0, description="Embedded ONNX Runtime: run concurrent requests for one "
                                                            "model version as one call of its multi-user graph "
                                                            "(`ctrserve export --grouped`) holding up to this many "
                                                            "candidates; 0: off (docs/gateway.md, \"Batching "
                                                            "requests together\").")
    batch_max_wait_ms: float = Field(0.2, ge=0, description="Batching: how long the oldest queued request may wait "
                                                             "for batch-mates while another call of the version "
                                                             "runs (a lone request never waits).")
    provider: Literal["cpu", "cuda"] = Field(
        "cpu", description="Embedded ONNX Runtime: the execution provider. `cuda`: CUDAExecutionProvider (CPU after "
                           "it for the operators CUDA lacks); needs the onnxruntime-gpu wheel (the `gateway-gpu` "
                           "image). Without it, or without a usable GPU, the model runs on the CPU with a warning; "
                           "`/readyz` and `ctrserve_model_provider_info` show where each model runs.")
    cuda_device_id: int = Field(0, ge=0, description="`provider=cuda`: the GPU to run on (index among the GPUs the "
                                                     "process sees, after `CUDA_VISIBLE_DEVICES`).")
    io_binding: Literal["auto", "on", "off"] = Field(
        "auto", description="Embedded ONNX Runtime: run each call through I/O binding (inputs placed on the device "
                            "before the call, the output copied back once). `auto`: when the model runs on CUDA.")
    warmup_candidates: int = Field(16, ge=1, description="Candidates in the warm-up request run at model load.")
    load_timeout_s: float = Field(60.0, gt=0, description="Budget to load and warm one model (and wait for Triton).")

    @field_validator("provider", "io_binding", mode="before")
    @classmethod
    def _choice(cls, value: object, info: ValidationInfo) -> object:
        # the message names the variable and its values: pydantic's own names only the field
        choices = get_args(cls.model_fields[str(info.field_name)].annotation)
        text = value.strip().lower() if isinstance(value, str) else value
        if text not in choices:
            raise ValueError(f"CTRSERVE_BACKEND_{str(info.field_name).upper()} must be one of {', '.join(choices)}, "
                             f"not {value!r}")
        return text


class FeedbackSettings(BaseSettings):
    """The closed loop: the impression log, ``POST /v1/events`` and the outcomes per arm."""

    model_config = SettingsConfigDict(env_prefix="CTRSERVE_FEEDBACK_", extra="ignore")

    enabled: bool = Field(True, description="Log scored requests and accept events (off: `/v1/events` answers 503).")
    sample_rate: float = Field(
        1.0, ge=0, le=1, description="Share of scored requests logged (events for the others are counted as "
                                     "`unknown_request`).")
    request_ttl_s: int = Field(
        86_400, ge=1, description="How long a logged request can be joined by events, and how long an event id "
                                  "is remembered for idempotent retries.")
    log_max_len: int = Field(
        1_000_000, ge=1, description="Approximate cap on entries of each experiment's impression and event streams.")
    flush_interval_ms: float = Field(
        20.0, gt=0, description="The background writer waits this long after the first request queued since its "
                                "last write, then writes all queued ones in one pipelined round trip.")
    queue_max: int = Field(
        10_000, ge=1, description="Logged requests waiting for the writer; beyond it new ones are dropped "
                                  "(counted in `ctrserve_impressions_dropped_total`).")
    max_events: int = Field(1000, ge=1, description="Most events one `POST /v1/events` may carry (422 above).")
    log_inputs: bool = Field(
        True, description="Keep each logged request's model inputs (user side once, candidates' rows), so that "
                          "`ctrserve ab export` can write a dataset to retrain on.")
    append_clicks: bool = Field(
        True, description="A click prepends the item to the user's behaviour sequence in the feature store.")


class GatewaySettings(BaseModel):
    """All gateway settings together; ``GatewaySettings.from_env()`` reads the environment."""

    server: ServerSettings
    api: ApiSettings
    store: StoreSettings
    routing: RoutingSettings
    backend: BackendSettings
    feedback: FeedbackSettings = Field(default_factory=FeedbackSettings)

    @model_validator(mode="after")
    def _budgets(self) -> GatewaySettings:
        if self.store.timeout_ms >= self.api.deadline_ms:
            raise ValueError(f"CTRSERVE_STORE_TIMEOUT_MS ({self.store.timeout_ms:g}) must be below "
                             f"CTRSERVE_API_DEADLINE_MS ({self.api.deadline_ms:g}) so that time is left to score after "
                             "a slow store")
        return self

    @classmethod
    def from_env(cls, **overrides: BaseSettings) -> GatewaySettings:
        parts: dict[str, BaseSettings] = {
            "server": ServerSettings(), "api": ApiSettings(), "store": StoreSettings(), "routing": RoutingSettings(),
            "backend": BackendSettings(), "feedback": FeedbackSettings(),
        }
        parts.update(overrides)
        return cls(**parts)

    @property
    def backend_kind(self) -> Literal["onnxruntime", "triton"]:
        if self.backend.kind == "auto":
            return "triton" if self.backend.triton_url else "onnxruntime"
        return self.backend.kind


#: every settings class of the gateway, for docs and the deploy-manifest check
SETTINGS_CLASSES: tuple[type[BaseSettings], ...] = (ServerSettings, ApiSettings, StoreSettings, RoutingSettings,
                                                     BackendSettings, FeedbackSettings)
