"""Redis online store: versioned namespaces, one-round-trip reads, atomic sequence appends.

All values are plain strings (key layout: keys.py), so one ``MGET`` returns the active pointer,
the user's profile and sequences and every uncached candidate: one round trip per request. The
pointer comes back in the same reply, so a reader notices a flip at once and re-reads under the
new version. Values: records.py (schema level) and codec.py (bytes); one read: reads.py; the
blocking connection pool for callers without an event loop: blocking.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any, ClassVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

from ctrserve.contract.feature_map import OOV_ID
from ctrserve.contract.store_schema import StoreSchema

from .base import ItemRecords, OnlineStore, Progress, RequestFeatures, UserRecords
from .blocking import BlockingPool, RedisBlockingReader
from .cache import ItemCache
from .codec import CODEC_VERSION
from .config import RedisStoreConfig
from .errors import CorruptValue, FeatureStoreError, SchemaMismatch, StoreNotLoaded, StoreUnavailable
from .keys import LUA_APPEND, LUA_FLIP, LUA_SET_ACTIVE, Keys, item_suffix, sequence_suffix, user_suffix
from .reads import ReadPlan, ReadView
from .records import RecordCodec
from .redis_errors import map_redis_error

LOADING_TTL_S = 300  # a bulk load refreshes its marker every batch; a dead load's marker expires
SCAN_BATCH = 2000  # keys per SCAN step and per UNLINK when removing stale versions


class RedisOnlineStore(OnlineStore):
    """The Redis backend. Create one per process and reuse it (it owns a connection pool).
    ``redis_cluster_store.RedisClusterOnlineStore`` is its Redis Cluster variant (``open_store``
    picks by the URL)."""

    #: hash-tagged keys (keys.py): only the cluster variant uses them
    tagged = False
    #: the Lua scripts this backend registers, by the name ``_under_active`` and ``bulk_load`` use
    SCRIPTS: ClassVar[dict[str, str]] = {"append": LUA_APPEND, "set": LUA_SET_ACTIVE, "flip": LUA_FLIP}

    def __init__(self, schema: StoreSchema, config: RedisStoreConfig | None = None, namespace: str | None = None,
                 vocab_sha256: str | None = None):
        """``vocab_sha256``: the vocabulary the reader's model was trained with (the export manifest
        records it); a version bulk-loaded from another preparation then raises ``SchemaMismatch``
        instead of serving ids of another vocabulary."""
        self.config = config or RedisStoreConfig()
        self.schema = schema
        self.vocab_sha256 = vocab_sha256
        self.namespace = namespace or schema.dataset
        self.keys = Keys(self.config.key_prefix, self.namespace, tagged=self.tagged)
        cfg = self.config
        self._client = self._connect()
        self._timeout_s = cfg.timeout_ms / 1000
        self._where = f"redis {cfg.url} ({self.keys.ns})"
        self._codec = RecordCodec(schema)
        self._cache = ItemCache(cfg.item_cache_size, cfg.item_cache_ttl_s)
        self._view: ReadView | None = None  # the adopted version; None until the first read and after a flip
        self._blocking: RedisBlockingReader | None = None  # created by the first blocking_reader()
        #: the active version's meta (schema, counts, source), after the first read
        self.meta: dict[str, Any] | None = None
        self._scripts = {name: self._client.register_script(lua) for name, lua in self.SCRIPTS.items()}

    def _connect(self) -> Any:
        """The asyncio client: one blocking connection pool of ``pool_size`` connections."""
        retry = Retry(NoBackoff(), 1)  # one immediate retry heals a connection broken by a server restart
        self._pool = aioredis.BlockingConnectionPool.from_url(self.config.effective_url(), retry=retry,
                                                             **self.config.client_kwargs())
        return aioredis.Redis(connection_pool=self._pool, retry=retry)

    @classmethod
    async def from_active(cls, namespace: str, config: RedisStoreConfig | None = None) -> RedisOnlineStore:
        """A store whose schema is the one the active version was written with (for tools)."""
        config = config or RedisStoreConfig()
        probe = cls(StoreSchema.empty(namespace), config, namespace)
        try:
            meta = await probe._guarded(probe._active_meta(), probe._timeout_s, "read the active version")
        finally:
            await probe.close()
        return cls(StoreSchema.model_validate(meta[1]["schema"]), config, namespace)

    @property
    def item_cache(self) -> ItemCache:
        return self._cache

    @property
    def codec(self) -> RecordCodec:
        """The schema's value codecs (what this store writes and expects to read)."""
        return self._codec

    def read_view(self) -> ReadView | None:
        """The adopted version as reads see it (None until the first read and after a flip)."""
        return self._view

    def blocking_reader(self) -> RedisBlockingReader:
        """The store's one blocking reader (its pool of ``pool_size`` connections opens lazily,
        closes with the store)."""
        if self._blocking is None:
            self._blocking = RedisBlockingReader(BlockingPool(self.config), self.read_view, self._where,
                                                 self._timeout_s)
        return self._blocking

    async def close(self) -> None:
        await self._client.aclose()
        await self._pool.disconnect()
        if self._blocking is not None:
            self._blocking.close()

    async def _guarded(self, coro: Any, timeout_s: float, what: str) -> Any:
        """Await ``coro`` within ``timeout_s``; every failure becomes a typed FeatureStoreError."""
        try:
            async with asyncio.timeout(timeout_s):
                return await coro
        except FeatureStoreError:
            raise
        except (RedisError, RedisClusterException, TimeoutError, OSError) as exc:
            raise map_redis_error(exc, what, self._where, timeout_s) from exc

    # -- versions ------------------------------------------------------------------------
    async def _active_meta(self) -> tuple[int, dict[str, Any], bytes]:
        raw = await self._client.get(self.keys.active)
        if raw is None:
            raise StoreNotLoaded(
                f"no active version at {self.keys.active!r}: run `ctrserve store load --dataset {self.namespace}`"
            )
        try:
            version = int(raw)
        except ValueError:
            raise CorruptValue(f"active pointer {raw[:40]!r} is not a version number", self.keys.active) from None
        meta_key = self.keys.meta(version)
        meta_raw = await self._client.get(meta_key)
        if meta_raw is None:
            raise CorruptValue(f"active version {version} has no meta", meta_key)
        try:
            meta = json.loads(meta_raw)
        except ValueError:
            raise CorruptValue("meta is not JSON", meta_key) from None
        return version, meta, raw

    def _check_meta(self, version: int, meta: dict[str, Any]) -> None:
        """Raise SchemaMismatch unless ``version`` was written with this reader's schema, codec and
        (when both are known) vocabulary."""
        try:
            stored = StoreSchema.model_validate(meta["schema"])
        except (KeyError, ValueError) as exc:
            raise CorruptValue(f"meta has no valid schema: {exc}", self.keys.meta(version)) from None
        if stored != self.schema or meta.get("codec_version") != CODEC_VERSION:
            mine, theirs = self.schema.model_dump(), stored.model_dump()
            diff = {k: (theirs[k], mine[k]) for k in mine if mine[k] != theirs[k]}
            raise SchemaMismatch(
                f"{self.keys.ns} version {version} was written with another schema or codec "
                f"(stored, expected): {diff or (meta.get('codec_version'), CODEC_VERSION)}"
            )
        loaded_vocab = meta.get("vocab_sha256")
        if self.vocab_sha256 and loaded_vocab and loaded_vocab != self.vocab_sha256:
            raise SchemaMismatch(
                f"{self.keys.ns} version {version} was bulk-loaded from {meta.get('source', 'another preparation')!r} "
                f"whose vocabulary (sha256 {loaded_vocab[:12]}...) is not the model's ({self.vocab_sha256[:12]}...): "
                "load the prepared dataset the model was trained on (`ctrserve store load`)"
            )

    async def _adopt(self) -> ReadView:
        """Adopt the active version after checking it (``_check_meta``); clears the item cache."""
        self._cache.clear()
        self._view = None
        version, meta, raw = await self._active_meta()
        self._check_meta(version, meta)
        self._view = ReadView(version, raw, self.keys.active, self.keys.version(version), self._codec, self._cache)
        self.meta = meta
        return self._view

    def _meta_json(self, version: int, **extra: Any) -> str:
        return json.dumps({
            "version": version, "codec_version": CODEC_VERSION, "schema": self.schema.model_dump(),
            "created": datetime.now(UTC).isoformat(timespec="seconds"), **extra,
        })

    async def ensure_active(self) -> int:
        """Create an empty active version if none exists (online writes before any bulk load)."""
        client, keys = self._client, self.keys

        async def run() -> int:
            if (raw := await client.get(keys.active)) is not None:
                return int(raw)
            version = int(await client.incr(keys.next_version))
            await client.set(keys.meta(version), self._meta_json(version, users=0, items=0, source="empty"))
            if not await client.set(keys.active, version, nx=True):
                await client.delete(keys.meta(version))  # someone else created one first
                return int(await client.get(keys.active))
            return version

        return await self._guarded(run(), self._timeout_s, "create a version")

    async def active_version(self) -> int | None:
        """The version ``active`` names now (None: nothing loaded), without adopting it."""
        raw = await self._guarded(self._client.get(self.keys.active), self._timeout_s, "read the active pointer")
        return None if raw is None else int(raw)

    async def check_version(self) -> int | None:
        version = await self.active_version()
        view = self._view
        if version is not None and (view is None or view.version != version):
            await self._guarded(self._adopt(), self._timeout_s, "check the active version")
        return version

    # -- read path -----------------------------------------------------------------------
    async def online_read(self, user_id: str, item_ids: Sequence[str]) -> RequestFeatures:
        return await self._guarded(self._read(str(user_id), [str(i) for i in item_ids]), self._timeout_s,
                                   f"read user {user_id!r} + {len(item_ids)} items")

    async def _read(self, user_id: str, item_ids: list[str]) -> RequestFeatures:
        for _ in range(3):
            view = self._view or await self._adopt()
            plan = view.plan(user_id, item_ids)
            got = plan.decode(await self._fetch(plan))
            if got is not None:
                return got
            await self._adopt()  # a flip (or a wiped store) since the last read
        raise StoreUnavailable(f"the active version of {self.keys.ns} changed three times during one read")

    async def _fetch(self, plan: ReadPlan) -> list[bytes | None]:
        """The reply to ``plan.keys``: one MGET, one round trip."""
        return await self._client.execute_command("MGET", *plan.keys)

    # -- bulk and batch writes -----------------------------------------------------------
    def _queue_values(self, pipe: Any, values: dict[str, bytes]) -> None:
        """Queue the writes of one batch on a non-transactional pipeline: one MSET."""
        pipe.mset(values)

    async def _write(self, version: int, users: UserRecords | None, items: ItemRecords | None,
                     progress: Progress | None, loading: bool) -> None:
        vkeys, size = self.keys.version(version), self.config.bulk_batch_size
        jobs = []
        if users is not None:
            users.validate(self.schema)
            jobs += [("users", users, s) for s in range(0, len(users), size)]
        if items is not None:
            items.validate(self.schema)
            jobs += [("items", items, s) for s in range(0, len(items), size)]
        timeout = self.config.bulk_timeout_ms / 1000
        for kind, records, start in jobs:
            sl = slice(start, start + size)
            encode = self._codec.user_values if kind == "users" else self._codec.item_values
            pipe = self._client.pipeline(transaction=False)
            self._queue_values(pipe, encode(records, vkeys, sl))
            if loading:
                pipe.set(self.keys.loading(version), 1, ex=LOADING_TTL_S)
            await self._guarded(pipe.execute(), timeout, f"write {kind} batch at {start} of version {version}")
            if progress is not None:
                progress(len(records.ids[sl]))

    async def online_write_batch(self, users: UserRecords | None = None, items: ItemRecords | None = None,
                                 progress: Progress | None = None) -> None:
        """Upsert into the active version (created empty if there is none)."""
        version = await self.ensure_active()
        await self._write(version, users, items, progress, loading=False)
        for item_id in (items.ids if items is not None else []):
            self._cache.discard(str(item_id))

    async def bulk_load(self, users: UserRecords | None, items: ItemRecords | None,
                        progress: Progress | None = None, **meta: Any) -> int:
        """Write a complete new version, flip ``active`` to it, then delete older versions.

        Readers keep serving the previous version until the flip; if this load dies half-way,
        its keys stay unreferenced and the next load (or :meth:`remove_stale_versions`) removes them.
        """
        timeout, keys = self._timeout_s, self.keys
        version = int(await self._guarded(self._client.incr(keys.next_version), timeout, "allocate a version"))
        await self._guarded(self._client.set(keys.loading(version), 1, ex=LOADING_TTL_S), timeout, "mark load")
        try:
            await self._write(version, users, items, progress, loading=True)
            counts = {"users": len(users) if users is not None else 0,
                      "items": len(items) if items is not None else 0}
            await self._guarded(self._client.set(keys.meta(version), self._meta_json(version, **counts, **meta)),
                                timeout, "write meta")
            flip = self._scripts["flip"](keys=[keys.active], args=[version])
            active = int(await self._guarded(flip, timeout, "flip"))
        finally:
            # unmarked, a failed load's keys are garbage for the next sweep; a killed load's marker expires
            with contextlib.suppress(Exception):
                await self._guarded(self._client.delete(keys.loading(version)), timeout, "unmark load")
        if active != version:
            await self.remove_stale_versions()
            raise FeatureStoreError(f"load of version {version} was superseded by version {active}; not activated")
        if self.config.cleanup_grace_s:
            await asyncio.sleep(self.config.cleanup_grace_s)  # reads in flight under the old version finish
        await self.remove_stale_versions()
        return version

    async def remove_stale_versions(self) -> int:
        """Delete every version that is neither active nor being loaded; returns the keys removed."""
        client, keys, timeout = self._client, self.keys, self.config.bulk_timeout_ms / 1000

        async def run() -> int:
            raw = await client.get(keys.active)
            active = int(raw) if raw is not None else None
            doomed: dict[int, bool] = {}
            batch: list[bytes] = []
            removed = 0
            async for key in self._scan_versioned():
                version = keys.version_of(key)
                if version is None or version == active:
                    continue
                if version not in doomed:
                    doomed[version] = not await client.exists(keys.loading(version))
                if doomed[version]:
                    batch.append(key)
                if len(batch) >= SCAN_BATCH:
                    removed += await client.unlink(*batch)
                    batch = []
            if batch:
                removed += await client.unlink(*batch)
            return removed

        return await self._guarded(run(), timeout, "remove stale versions")

    def _scan_versioned(self) -> AsyncIterator[bytes]:
        """Every key of every version of the namespace (SCAN)."""
        return self._client.scan_iter(match=self.keys.scan_pattern, count=SCAN_BATCH)

    # -- online updates ------------------------------------------------------------------
    async def _under_active(self, script: str, args: list[Any], what: str) -> Any:
        """Run ``SCRIPTS[script]`` with ``args`` (``ns``, key suffix, ...) under the active version,
        creating an empty one first if there is none."""
        run = self._scripts[script]
        try:
            return await self._guarded(run(keys=[self.keys.active], args=args), self._timeout_s, what)
        except StoreNotLoaded:
            await self.ensure_active()
            return await self._guarded(run(keys=[self.keys.active], args=args), self._timeout_s, what)

    async def append_event(self, user_id: str, item_id: str | None = None, ts: int | None = None,
                           fields: dict[str, int] | None = None, sequence: str | None = None) -> int:
        """Prepend one behaviour event to the user's sequence, keeping the newest ``max_len``.

        Give the event's encoded ``fields`` (sequence field -> id), or an ``item_id`` whose stored
        features fill them (each field copies its target item feature; unknown item -> OOV).
        Returns the sequence length after the append.
        """
        s = self.schema.sequence(sequence)
        if fields is None:
            if item_id is None:
                raise ValueError("append_event needs an item_id or the event's fields")
            try:
                got = await self.online_read(str(user_id), [str(item_id)])
            except StoreNotLoaded:
                await self.ensure_active()
                got = await self.online_read(str(user_id), [str(item_id)])
            fields = {f: int(got.items[t][0]) if t in got.items and t in self.schema.item_sparse else OOV_ID
                      for f, t in zip(s.fields, s.targets, strict=True)}
        unknown = set(fields) - set(s.fields)
        if unknown or len(fields) != len(s.fields):
            raise ValueError(f"event fields must be exactly {s.fields}, got {sorted(fields)}")
        codec = self._codec.sequences[s.name]
        event = codec.encode_event([fields[f] for f in s.fields], int(time.time()) if ts is None else int(ts))
        args = [self.keys.ns, sequence_suffix(s.name, str(user_id), self.tagged), codec.header, event, s.max_len]
        return int(await self._under_active("append", args, f"append an event for user {user_id!r}"))

    async def click_appends(self, user_id: str, clicks: Sequence[tuple[str, int]]) -> tuple[str, list[list[Any]]]:
        """What ``LUA_APPEND`` needs to prepend each click ``(item_id, ts)`` to the user's (first)
        sequence: ``(KEYS[1], [ARGV per click])``, for a caller that runs the appends inside its own
        script (the closed loop's event script: feature_store/feedback.py). One read for all the
        clicked items; each event's fields copy its item's stored features (unknown item -> OOV),
        as ``append_event`` does."""
        s = self.schema.sequence(None)
        got = await self.online_read(str(user_id), [str(item) for item, _ in clicks])
        codec = self._codec.sequences[s.name]
        suffix = sequence_suffix(s.name, str(user_id))
        args = []
        for k, (_, ts) in enumerate(clicks):
            fields = [int(got.items[t][k]) if t in got.items and t in self.schema.item_sparse else OOV_ID
                      for t in s.targets]
            args.append([self.keys.ns, suffix, codec.header, codec.encode_event(fields, int(ts)), s.max_len])
        return self.keys.active, args

    async def put_item(self, item_id: str, features: dict[str, float]) -> None:
        """Create or replace one item (encoded values for every item feature) in the active version."""
        value = self._codec.item_row(features)
        await self._under_active("set", [self.keys.ns, item_suffix(str(item_id), self.tagged), value],
                                 f"put item {item_id!r}")
        self._cache.discard(str(item_id))

    async def put_user(self, user_id: str, profile: dict[str, float]) -> None:
        """Create or replace one user's profile (encoded values) in the active version."""
        value = self._codec.user_row(profile)
        await self._under_active("set", [self.keys.ns, user_suffix(str(user_id), self.tagged), value],
                                 f"put user {user_id!r}")

    async def value_sizes(self, user_id: str) -> dict[str, int]:
        """Bytes of the user's stored values (profile, each sequence) in the active version."""
        view = self._view or await self._guarded(self._adopt(), self._timeout_s, "read the active version")
        keys = [view.keys.user(user_id)] + [view.keys.sequence(s.name, user_id) for s in self.schema.sequences]
        lengths = await self._guarded(asyncio.gather(*(self._client.strlen(k) for k in keys)), self._timeout_s,
                                      "measure values")
        return dict(zip(["profile"] + [s.name for s in self.schema.sequences], lengths, strict=True))
