"""redis-py's exceptions (and socket errors) as the store's typed errors (errors.py), for the
async store and the blocking pool alike."""

from __future__ import annotations

from redis.exceptions import ClusterDownError, RedisClusterException, ResponseError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .errors import CorruptValue, FeatureStoreError, StoreNotLoaded, StoreTimeout, StoreUnavailable


def map_redis_error(exc: BaseException, what: str, where: str, timeout_s: float) -> FeatureStoreError:
    """``what`` failed talking to ``where`` (e.g. ``redis URL (ns)``) within ``timeout_s``. The Lua
    scripts' ``NOACTIVE``/``CORRUPT`` error replies become ``StoreNotLoaded``/``CorruptValue``."""
    if isinstance(exc, TimeoutError | RedisTimeoutError):
        return StoreTimeout(f"{what}: no answer from {where} within {timeout_s * 1000:.0f} ms")
    if isinstance(exc, RedisConnectionError | OSError):
        return StoreUnavailable(f"{what}: cannot reach {where}: {exc}")
    if isinstance(exc, RedisClusterException | ClusterDownError | TryAgainError):  # a slot without a master, ...
        return StoreUnavailable(f"{what}: {where} cannot serve the request now: {exc}")
    if isinstance(exc, ResponseError):
        msg = str(exc)
        if "NOACTIVE" in msg:
            return StoreNotLoaded(f"{what}: no active version in {where}")
        if "CORRUPT" in msg:
            return CorruptValue(f"{what}: stored value does not decode", msg.split("CORRUPT", 1)[1].strip())
    return FeatureStoreError(f"{what}: {where} answered with an error: {exc}")
