"""Typed failures of the feature store.

The gateway (service/gateway.py) treats every ``FeatureStoreError`` -- and its own read budget
running out -- as "the store failed": with ``CTRSERVE_STORE_FAILURE=fail`` it answers 503
``store_unavailable`` (``StoreTimeout`` included: 504 is reserved for the model backend and the
request deadline), with ``degrade`` it scores with cold-start features and sets
``flags.degraded``. The class name is the ``error`` label of ``ctrserve_store_errors_total``.
Unknown user or item ids are NOT errors (they get cold-start defaults and a flag)."""

from __future__ import annotations


class FeatureStoreError(Exception):
    """Base class of every feature-store failure."""


class StoreUnavailable(FeatureStoreError):
    """The store cannot be reached: connection refused or reset, authentication failed."""


class StoreNotLoaded(StoreUnavailable):
    """The store answers but holds no active version (nothing bulk-loaded or created yet)."""


class StoreTimeout(FeatureStoreError):
    """A call did not finish within its time budget (``timeout_ms``)."""


class CorruptValue(FeatureStoreError):
    """A stored value does not decode: wrong magic, codec version, kind or length."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(f"{message} (key {key!r})" if key else message)
        self.key = key


class SchemaMismatch(FeatureStoreError):
    """The active version was written with a different schema than this reader expects."""
