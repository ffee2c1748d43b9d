"""Redis store settings, environment-overridable with the ``CTRSERVE_REDIS_`` prefix
(e.g. ``CTRSERVE_REDIS_URL=redis://cache:6379/0``, ``CTRSERVE_REDIS_TIMEOUT_MS=30``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class RedisStoreConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CTRSERVE_REDIS_", extra="forbid")

    #: ``redis://`` or ``rediss://`` (TLS); ``redis+cluster://host:port`` (or ``rediss+cluster://``) selects
    #: Redis Cluster, the host one node to discover it from; credentials may also be given in the URL
    url: str = "redis://localhost:6379/0"
    username: str | None = None
    password: SecretStr | None = None
    #: TLS pass-through (``rediss://`` in the URL turns TLS on as well)
    tls: bool = False
    tls_ca_certs: Path | None = None
    tls_certfile: Path | None = None
    tls_keyfile: Path | None = None
    tls_cert_reqs: Literal["required", "optional", "none"] = "required"

    #: budget of one online call (a request's read, an append), end to end
    timeout_ms: float = Field(100.0, gt=0)
    connect_timeout_ms: float = Field(200.0, gt=0)
    #: budget of one bulk-load pipeline (thousands of keys)
    bulk_timeout_ms: float = Field(30_000.0, gt=0)
    #: connections per process; a call waits for a free one within its timeout
    pool_size: int = Field(32, ge=1)

    #: keys are ``<key_prefix>:<namespace>:...``; the namespace defaults to the dataset name
    key_prefix: str = "ctrserve:fs"
    #: in-process LRU cache of item values (0 disables it); TTL bounds staleness after put-item
    item_cache_size: int = Field(50_000, ge=0)
    item_cache_ttl_s: float = Field(30.0, gt=0)

    #: users or items per bulk-load pipeline
    bulk_batch_size: int = Field(2_000, ge=1)
    #: wait after flipping ``active`` before deleting the previous version, so reads in flight finish
    cleanup_grace_s: float = Field(2.0, ge=0)
    #: Redis Cluster only: the active pointer travels with at most one read per this many ms (0: with
    #: every read). Bounds how long a reader serves the previous version after a flip; keeps the
    #: pointer's node from taking one GET per request. Must stay below the loaders' ``cleanup_grace_s``.
    pointer_check_ms: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _pointer_within_grace(self) -> RedisStoreConfig:
        if self.pointer_check_ms and self.pointer_check_ms >= self.cleanup_grace_s * 1000:
            raise ValueError(f"pointer_check_ms ({self.pointer_check_ms:g}) must be below cleanup_grace_s "
                             f"({self.cleanup_grace_s:g} s): a reader could still use a version a load already deleted")
        return self

    @property
    def cluster(self) -> bool:
        """The URL names a Redis Cluster (``redis+cluster://``, ``rediss+cluster://``)."""
        return self.url.split("://", 1)[0].endswith("+cluster")

    def effective_url(self) -> str:
        """The URL redis-py connects with: ``rediss://`` when ``tls`` is set (that scheme selects TLS
        connections); for a cluster, the seed node's URL (without ``+cluster``)."""
        if "://" not in self.url:
            return self.url
        scheme, _, rest = self.url.partition("://")
        scheme = scheme.removesuffix("+cluster")
        if self.tls and scheme == "redis":
            scheme = "rediss"
        return f"{scheme}://{rest}"

    def cluster_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``RedisCluster.from_url`` beyond the URL: ``client_kwargs`` without the
        pool wait (a cluster client keeps one pool per node and fails at once when it is full)."""
        kwargs = self.client_kwargs()
        del kwargs["timeout"]
        return kwargs

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for a ``BlockingConnectionPool.from_url`` (``redis`` or ``redis.asyncio``)
        beyond the URL: pool size and wait, socket timeouts, credentials, TLS."""
        kwargs: dict[str, Any] = {
            "max_connections": self.pool_size,
            "timeout": self.timeout_ms / 1000,  # the wait for a free connection
            "socket_timeout": self.timeout_ms / 1000,
            "socket_connect_timeout": self.connect_timeout_ms / 1000,
        }
        if self.username:
            kwargs["username"] = self.username
        if self.password is not None:
            kwargs["password"] = self.password.get_secret_value()
        if self.effective_url().startswith("rediss://"):
            kwargs.update(ssl_cert_reqs=self.tls_cert_reqs)
            for name in ("ca_certs", "certfile", "keyfile"):
                value = getattr(self, f"tls_{name}")
                if value is not None:
                    kwargs[f"ssl_{name}"] = str(value)
        return kwargs
