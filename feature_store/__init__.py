"""Online feature store: user profiles, behaviour sequences and item features in Redis.

``OnlineStore`` is the small interface (``online_write_batch``, ``online_read``,
``check_version``, optionally a ``BlockingReader``); ``RedisOnlineStore`` (module
``redis_store``) the Redis backend, configured by ``RedisStoreConfig`` (env prefix
``CTRSERVE_REDIS_``). No torch anywhere in this package.
"""

from ctrserve.contract.store_schema import SequenceSchema, StoreSchema

from .base import BlockingReader, ItemRecords, OnlineStore, PendingRead, RequestFeatures, UserRecords
from .config import RedisStoreConfig
from .errors import CorruptValue, FeatureStoreError, SchemaMismatch, StoreNotLoaded, StoreTimeout, StoreUnavailable

__all__ = [
    "BlockingReader", "CorruptValue", "FeatureStoreError", "ItemRecords", "OnlineStore", "PendingRead",
    "RedisStoreConfig", "RequestFeatures", "SchemaMismatch", "SequenceSchema", "StoreNotLoaded", "StoreSchema",
    "StoreTimeout", "StoreUnavailable", "UserRecords",
]
