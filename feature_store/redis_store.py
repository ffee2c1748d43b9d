"""Redis online store: versioned namespaces, one-round-trip reads, atomic sequence appends.

Key layout (``ns`` = ``<key_prefix>:<namespace>``; see docs/feature_store.md)::

    ns:active                  version number currently served
    ns:next_version            INCR counter handing out version numbers
    ns:loading:<v>             marker (with TTL) while a bulk load writes version v
    ns:v<v>:meta               JSON: schema, counts, source; written last, before the flip
    ns:v<v>:u:<user_id>        user profile row          (codec kind U)
    ns:v<v>:s:<seq>:<user_id>  behaviour sequence        (codec kind S)
    ns:v<v>:i:<item_id>        item row                  (codec kind I)

All values are plain strings, so one ``MGET`` returns the active pointer, the user's profile and
sequences and every uncached candidate: one round trip per request. The pointer comes back in
the same reply, so a reader notices a flip at once and re-reads under the new version.
Single-node (or replicated) Redis: the keys of one request are not hash-tagged for Cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np
import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry as BlockingRetry

from ctrserve.contract.feature_map import OOV_ID, PAD_ID
from ctrserve.contract.store_schema import StoreSchema

from .base import ItemRecords, OnlineStore, PendingRead, Progress, RequestFeatures, UserRecords
from .cache import ItemCache
from .codec import CODEC_VERSION, KIND_ITEM, KIND_USER, RowCodec, SequenceCodec
from .config import RedisStoreConfig
from .errors import (
    CorruptValue,
    FeatureStoreError,
    SchemaMismatch,
    StoreNotLoaded,
    StoreTimeout,
    StoreUnavailable,
)

# Prepend one event to a sequence and keep the newest ARGV[5] events, atomically, under the
# version that is active when the script runs (so an append never lands in a half-loaded one).
LUA_APPEND = """
local ver = redis.call('GET', KEYS[1])
if not ver then return redis.error_reply('NOACTIVE no active version') end
local key = ARGV[1] .. ':v' .. ver .. ':' .. ARGV[2]
local hdr, ev = ARGV[3], ARGV[4]
local cur = redis.call('GET', key)
local body = ''
if cur then
  if string.sub(cur, 1, #hdr) ~= hdr or (#cur - #hdr) % #ev ~= 0 then
    return redis.error_reply('CORRUPT ' .. key)
  end
  body = string.sub(cur, #hdr + 1)
end
local new = ev .. body
local cap = tonumber(ARGV[5]) * #ev
if #new > cap then new = string.sub(new, 1, cap) end
redis.call('SET', key, hdr .. new)
return math.floor(#new / #ev)
"""

# SET one value under the active version.
LUA_SET_ACTIVE = """
local ver = redis.call('GET', KEYS[1])
if not ver then return redis.error_reply('NOACTIVE no active version') end
redis.call('SET', ARGV[1] .. ':v' .. ver .. ':' .. ARGV[2], ARGV[3])
return ver
"""

# Flip the active pointer to ARGV[1] unless a newer version is already active; returns the active one.
LUA_FLIP = """
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > cur then
  redis.call('SET', KEYS[1], ARGV[1])
  return tonumber(ARGV[1])
end
return cur
"""

LOADING_TTL_S = 300  # a bulk load refreshes its marker every batch; a dead load's marker expires


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class Keys:
    """Key names of one namespace."""

    def __init__(self, prefix: str, namespace: str):
        self.ns = f"{prefix}:{namespace}"
        self.active = f"{self.ns}:active"
        self.next_version = f"{self.ns}:next_version"

    def base(self, version: int) -> str:
        return f"{self.ns}:v{version}:"

    def loading(self, version: int) -> str:
        return f"{self.ns}:loading:{version}"

    def meta(self, version: int) -> str:
        return self.base(version) + "meta"

    @staticmethod
    def user_suffix(user_id: str) -> str:
        return "u:" + user_id

    @staticmethod
    def seq_suffix(sequence: str, user_id: str) -> str:
        return f"s:{sequence}:{user_id}"

    @staticmethod
    def item_suffix(item_id: str) -> str:
        return "i:" + item_id

    def version_of(self, key: bytes | str) -> int | None:
        """``ns:v<N>:...`` -> N (None for other keys of the namespace)."""
        text = key.decode() if isinstance(key, bytes) else key
        head = f"{self.ns}:v"
        if not text.startswith(head):
            return None
        num = text[len(head):].split(":", 1)[0]
        return int(num) if num.isdigit() else None


class RedisOnlineStore(OnlineStore):
    """The Redis backend. Create one per process and reuse it (it owns a connection pool)."""

    def __init__(self, schema: StoreSchema, config: RedisStoreConfig | None = None, namespace: str | None = None,
                 vocab_sha256: str | None = None):
        """``vocab_sha256``: the vocabulary the reader's model was trained with (the export manifest
        records it); a version bulk-loaded from another preparation then raises ``SchemaMismatch``
        instead of serving ids of another vocabulary."""
        self.config = config or RedisStoreConfig()
        self.schema = schema
        self.vocab_sha256 = vocab_sha256
        self.namespace = namespace or schema.dataset
        self.keys = Keys(self.config.key_prefix, self.namespace)
        cfg = self.config
        retry = Retry(NoBackoff(), 1)  # one immediate retry heals a connection broken by a server restart
        self._pool = aioredis.BlockingConnectionPool.from_url(cfg.effective_url(), retry=retry, **cfg.client_kwargs())
        self._client = aioredis.Redis(connection_pool=self._pool, retry=retry)
        self._blocking: redis.Redis | None = None  # created by the first online_read_blocking
        # blocking-pool connections between reads, handed out without the pool's per-checkout
        # checks (connect, can_read poll, pid) on every read. Every reply is read
        # before a connection comes back here (result or cancel); a broken one goes to the pool
        self._idle: list[Any] = []
        self._idle_pid = os.getpid()
        # blocking connections checked out now (reads sent, replies not collected): at the pool's
        # size the next checkout would wait for a free one, which ``begin_read_blocking(wait=False)``
        # declines to do
        self._busy = 0
        self._busy_lock = threading.Lock()
        self._timeout_s = cfg.timeout_ms / 1000
        self._user_codec = RowCodec(KIND_USER, len(schema.user_sparse), len(schema.user_dense))
        self._item_codec = RowCodec(KIND_ITEM, len(schema.item_sparse), len(schema.item_dense))
        self._seq_codecs = {s.name: SequenceCodec(len(s.fields)) for s in schema.sequences}
        self._item_default = self._item_codec.encode(*schema.item_defaults())
        self._user_default = schema.user_defaults()
        self._cache = ItemCache(cfg.item_cache_size, cfg.item_cache_ttl_s)
        self._version: int | None = None
        self._version_bytes: bytes | None = None
        #: the active version's meta (schema, counts, source), after the first read
        self.meta: dict[str, Any] | None = None
        self._append = self._client.register_script(LUA_APPEND)
        self._set_active = self._client.register_script(LUA_SET_ACTIVE)
        self._flip = self._client.register_script(LUA_FLIP)

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

    async def close(self) -> None:
        await self._client.aclose()
        await self._pool.disconnect()
        if self._blocking is not None:
            pool = self._blocking.connection_pool
            while self._idle:
                pool.release(self._idle.pop())
            self._blocking.close()
            pool.disconnect()
            self._blocking = None

    # -- error mapping -------------------------------------------------------------------
    def _map_error(self, exc: BaseException, what: str, timeout_s: float) -> FeatureStoreError:
        where = f"redis {self.config.url} ({self.keys.ns})"
        if isinstance(exc, TimeoutError | RedisTimeoutError):
            return StoreTimeout(f"{what}: no answer from {where} within {timeout_s * 1000:.0f} ms")
        if isinstance(exc, RedisConnectionError | OSError):
            return StoreUnavailable(f"{what}: cannot reach {where}: {exc}")
        if isinstance(exc, ResponseError):
            msg = str(exc)
            if "NOACTIVE" in msg:
                return StoreNotLoaded(f"{what}: no active version in {where}")
            if "CORRUPT" in msg:
                return CorruptValue(f"{what}: stored value does not decode", msg.split("CORRUPT", 1)[1].strip())
        return FeatureStoreError(f"{what}: {where} answered with an error: {exc}")

    async def _guarded(self, coro: Any, timeout_s: float, what: str) -> Any:
        """Await ``coro`` within ``timeout_s``; every failure becomes a typed FeatureStoreError."""
        try:
            async with asyncio.timeout(timeout_s):
                return await coro
        except FeatureStoreError:
            raise
        except (RedisError, TimeoutError, OSError) as exc:
            raise self._map_error(exc, what, timeout_s) from exc

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
        meta_raw = await self._client.get(self.keys.meta(version))
        if meta_raw is None:
            raise CorruptValue(f"active version {version} has no meta", self.keys.meta(version))
        try:
            meta = json.loads(meta_raw)
        except ValueError:
            raise CorruptValue("meta is not JSON", self.keys.meta(version)) from None
        return version, meta, raw

    async def _sync_version(self) -> None:
        """Adopt the active version after checking it was written with this reader's schema."""
        self._cache.clear()
        self._version = self._version_bytes = None
        version, meta, raw = await self._active_meta()
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
        self._version, self._version_bytes, self.meta = version, raw, meta

    def _meta(self, version: int, **extra: Any) -> str:
        return json.dumps({
            "version": version, "codec_version": CODEC_VERSION, "schema": self.schema.model_dump(),
            "created": datetime.now(UTC).isoformat(timespec="seconds"), **extra,
        })

    async def ensure_active(self) -> int:
        """Create an empty active version if none exists (online writes before any bulk load)."""
        async def run() -> int:
            if (raw := await self._client.get(self.keys.active)) is not None:
                return int(raw)
            version = int(await self._client.incr(self.keys.next_version))
            await self._client.set(self.keys.meta(version), self._meta(version, users=0, items=0, source="empty"))
            if not await self._client.set(self.keys.active, version, nx=True):
                await self._client.delete(self.keys.meta(version))  # someone else created one first
                return int(await self._client.get(self.keys.active))
            return version

        return await self._guarded(run(), self._timeout_s, "create a version")

    async def active_version(self) -> int | None:
        raw = await self._guarded(self._client.get(self.keys.active), self._timeout_s, "read the active pointer")
        return None if raw is None else int(raw)

    async def check_version(self) -> int | None:
        """The active version (None if nothing is loaded), adopted after the schema and vocabulary
        checks of ``_sync_version`` when it is not the one already in use (readiness probes)."""
        version = await self.active_version()
        if version is not None and version != self._version:
            await self._guarded(self._sync_version(), self._timeout_s, "check the active version")
        return version

    # -- read path -----------------------------------------------------------------------
    async def online_read(self, user_id: str, item_ids: Sequence[str]) -> RequestFeatures:
        return await self._guarded(self._read(str(user_id), [str(i) for i in item_ids]), self._timeout_s,
                                   f"read user {user_id!r} + {len(item_ids)} items")

    async def _read(self, user_id: str, item_ids: list[str]) -> RequestFeatures:
        for _ in range(3):
            if self._version is None:
                await self._sync_version()
            base, now = self.keys.base(self._version), time.monotonic()
            values, miss, keys = self._request_keys(user_id, item_ids, base, now)
            reply = await self._client.execute_command("MGET", *keys)
            if reply[0] != self._version_bytes:
                await self._sync_version()  # a flip (or a wiped store) since the last read
                continue
            return self._decode(user_id, item_ids, reply, values, miss, base, now)
        raise StoreUnavailable(f"the active version of {self.keys.ns} changed three times during one read")

    def begin_read_blocking(self, user_id: str, item_ids: Sequence[str], timeout_s: float | None = None,
                            wait: bool = True) -> PendingRead | None:
        """``online_read`` on a blocking connection (redis-py with hiredis, the socket timeout of
        ``timeout_ms``), for a caller that runs a whole request on one thread without awaiting
        (the gateway's inline and auto execution): no event-loop round trips, about half the client CPU of
        ``redis.asyncio`` (``ctrserve bench store``). This sends the MGET and returns; the caller
        may work while Redis answers, then collects it with ``result()`` (the gateway sends it
        before validating the request body). Returns None when the active version must first be
        adopted — before the first read and after a flip — because adopting it checks the schema
        through the async client: the caller then reads with ``online_read`` — and when
        ``timeout_s`` is shorter than the socket timeout (``timeout_ms``), which bounds a blocking
        read: the caller's ``asyncio.timeout`` then bounds the async read instead. ``wait=False``:
        also None when every connection of the blocking pool holds a read not yet collected (the
        checkout would wait for one: an event loop sending reads ahead for many requests at once
        must not block on that)."""
        if self._version is None or (timeout_s is not None and timeout_s < self._timeout_s - 1e-6):
            return None
        if not wait and self._busy >= self.config.pool_size:
            return None
        user_id, items = str(user_id), [str(i) for i in item_ids]
        base, now = self.keys.base(self._version), time.monotonic()
        values, miss, keys = self._request_keys(user_id, items, base, now)
        pending = _PendingMget(self, user_id, items, values, miss, base, now, keys)
        pending.send()
        return pending

    def _blocking_client(self) -> redis.Redis:
        if self._blocking is None:
            cfg = self.config
            pool = redis.BlockingConnectionPool.from_url(cfg.effective_url(), **cfg.client_kwargs())
            self._blocking = redis.Redis(connection_pool=pool, retry=BlockingRetry(NoBackoff(), 1))
        return self._blocking

    def _checkout(self) -> Any:
        """A blocking connection: an idle one, else one from the pool (which connects it)."""
        if self._idle_pid != os.getpid():  # a forked child must not share its parent's sockets
            self._idle, self._idle_pid, self._busy = [], os.getpid(), 0
        try:
            conn = self._idle.pop()  # atomic: threads may share the store
        except IndexError:
            conn = self._blocking_client().connection_pool.get_connection()
        with self._busy_lock:
            self._busy += 1
        return conn

    def _checkin(self, conn: Any, broken: bool = False) -> None:
        with self._busy_lock:
            self._busy -= 1
        if broken or self._blocking is None:  # broken, or the store was closed meanwhile
            conn.disconnect()
            if self._blocking is not None:
                self._blocking.connection_pool.release(conn)
            return
        self._idle.append(conn)

    def _request_keys(self, user_id: str, item_ids: list[str], base: str, now: float
                      ) -> tuple[list[bytes | None], list[int], list[str]]:
        """Cached item values, the indices of the uncached ones, and the MGET keys: the active
        pointer, the profile, the sequences, the uncached items."""
        values = self._cache.get_many(item_ids, now)
        miss = [i for i, v in enumerate(values) if v is None]
        keys = [self.keys.active, base + "u:" + user_id]
        keys += [base + Keys.seq_suffix(s.name, user_id) for s in self.schema.sequences]
        keys += [base + "i:" + item_ids[i] for i in miss]
        return values, miss, keys

    def _decode(self, user_id: str, item_ids: list[str], reply: list[bytes | None], values: list[bytes | None],
                miss: list[int], base: str, now: float) -> RequestFeatures:
        schema, n_seq = self.schema, len(self.schema.sequences)
        fetched = reply[2 + n_seq:]
        missing = []
        for j, i in enumerate(miss):
            if fetched[j] is None:
                values[i] = self._item_default
                missing.append(i)
            else:
                values[i] = fetched[j]
        ints, floats = self._item_codec.decode_many(values, key_of=lambda i: base + "i:" + item_ids[i])
        for j, i in enumerate(miss):
            if fetched[j] is not None:
                self._cache.put(item_ids[i], fetched[j], now)
        items = {name: ints[:, k].astype(np.int64) for k, name in enumerate(schema.item_sparse)}
        items.update({name: floats[:, k].copy() for k, name in enumerate(schema.item_dense)})

        profile = reply[1]
        if profile is None:
            u_int, u_float = self._user_default
        else:
            u_ints, u_floats = self._user_codec.decode_many([profile], key_of=lambda _: base + "u:" + user_id)
            u_int, u_float = u_ints[0], u_floats[0]
        user = {name: np.asarray(u_int[k], dtype=np.int64) for k, name in enumerate(schema.user_sparse)}
        user.update({name: np.asarray(u_float[k], dtype=np.float32) for k, name in enumerate(schema.user_dense)})

        sequence: dict[str, np.ndarray] = {}
        timestamps: dict[str, np.ndarray] = {}
        lengths: dict[str, int] = {}
        for s, value in zip(schema.sequences, reply[2:2 + n_seq], strict=True):
            fields_out = np.zeros((len(s.fields), s.max_len), dtype=np.int64)
            ts_out = np.zeros(s.max_len, dtype=np.int64)
            n = 0
            if value is not None:
                ev, ts = self._seq_codecs[s.name].decode(value, key=base + Keys.seq_suffix(s.name, user_id))
                n = min(len(ev), s.max_len)
                fields_out[:, :n] = ev[:n].T
                ts_out[:n] = ts[:n]
            sequence.update(zip(s.fields, fields_out, strict=True))
            timestamps[s.name], lengths[s.name] = ts_out, n
        return RequestFeatures(
            user=user, sequence=sequence, timestamps=timestamps, sequence_length=lengths, items=items,
            user_missing=profile is None and all(v is None for v in reply[2:2 + n_seq]),
            profile_missing=profile is None, missing_items=np.asarray(missing, dtype=np.int64),
            version=int(self._version), item_cache_hits=len(item_ids) - len(miss),
        )

    # -- bulk and batch writes -----------------------------------------------------------
    def _user_values(self, users: UserRecords, base: str, sl: slice) -> dict[str, bytes]:
        schema = self.schema
        ids = [str(u) for u in users.ids[sl]]
        n = len(ids)
        ints = np.stack([np.asarray(users.profile[f][sl]) for f in schema.user_sparse], axis=1) \
            if schema.user_sparse else np.zeros((n, 0), np.int32)
        floats = np.stack([np.asarray(users.profile[f][sl]) for f in schema.user_dense], axis=1) \
            if schema.user_dense else np.zeros((n, 0), np.float32)
        out = {base + "u:" + uid: v for uid, v in zip(ids, self._user_codec.encode_many(ints, floats), strict=True)}
        for s in schema.sequences:
            codec = self._seq_codecs[s.name]
            fields = np.stack([np.asarray(users.sequences[f][sl]) for f in s.fields], axis=-1)  # [n, L, F]
            ts_all = users.timestamps.get(s.name)
            ts_all = np.zeros(fields.shape[:2], np.int64) if ts_all is None else np.asarray(ts_all[sl])
            present = fields[:, :, 0] != PAD_ID  # a PAD item id marks padding
            for k, uid in enumerate(ids):
                m = present[k]
                out[base + Keys.seq_suffix(s.name, uid)] = codec.encode(fields[k][m][:s.max_len],
                                                                        ts_all[k][m][:s.max_len])
        return out

    def _item_values(self, items: ItemRecords, base: str, sl: slice) -> dict[str, bytes]:
        schema = self.schema
        ids = [str(i) for i in items.ids[sl]]
        n = len(ids)
        ints = np.stack([np.asarray(items.features[f][sl]) for f in schema.item_sparse], axis=1)
        floats = np.stack([np.asarray(items.features[f][sl]) for f in schema.item_dense], axis=1) \
            if schema.item_dense else np.zeros((n, 0), np.float32)
        return {base + "i:" + iid: v for iid, v in zip(ids, self._item_codec.encode_many(ints, floats), strict=True)}

    async def _write(self, version: int, users: UserRecords | None, items: ItemRecords | None,
                     progress: Progress | None, loading: bool) -> None:
        base, size = self.keys.base(version), self.config.bulk_batch_size
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
            values = self._user_values(records, base, sl) if kind == "users" else self._item_values(records, base, sl)
            pipe = self._client.pipeline(transaction=False)
            pipe.mset(values)
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
        timeout = self._timeout_s
        version = int(await self._guarded(self._client.incr(self.keys.next_version), timeout, "allocate a version"))
        await self._guarded(self._client.set(self.keys.loading(version), 1, ex=LOADING_TTL_S), timeout, "mark load")
        try:
            await self._write(version, users, items, progress, loading=True)
            counts = {"users": len(users) if users is not None else 0,
                      "items": len(items) if items is not None else 0}
            await self._guarded(self._client.set(self.keys.meta(version), self._meta(version, **counts, **meta)),
                                timeout, "write meta")
            active = int(await self._guarded(self._flip(keys=[self.keys.active], args=[version]), timeout, "flip"))
        finally:
            # unmarked, a failed load's keys are garbage for the next sweep; a killed load's marker expires
            with contextlib.suppress(Exception):
                await self._guarded(self._client.delete(self.keys.loading(version)), timeout, "unmark load")
        if active != version:
            await self.remove_stale_versions()
            raise FeatureStoreError(f"load of version {version} was superseded by version {active}; not activated")
        if self.config.cleanup_grace_s:
            await asyncio.sleep(self.config.cleanup_grace_s)  # reads in flight under the old version finish
        await self.remove_stale_versions()
        return version

    async def remove_stale_versions(self) -> int:
        """Delete every version that is neither active nor being loaded; returns the keys removed."""
        client, timeout = self._client, self.config.bulk_timeout_ms / 1000

        async def run() -> int:
            raw = await client.get(self.keys.active)
            active = int(raw) if raw is not None else None
            pattern = _glob_escape(self.keys.ns) + ":v*"
            doomed: dict[int, bool] = {}
            batch: list[bytes] = []
            removed = 0
            async for key in client.scan_iter(match=pattern, count=2000):
                version = self.keys.version_of(key)
                if version is None or version == active:
                    continue
                if version not in doomed:
                    doomed[version] = not await client.exists(self.keys.loading(version))
                if doomed[version]:
                    batch.append(key)
                if len(batch) >= 2000:
                    removed += await client.unlink(*batch)
                    batch = []
            if batch:
                removed += await client.unlink(*batch)
            return removed

        return await self._guarded(run(), timeout, "remove stale versions")

    # -- online updates ------------------------------------------------------------------
    async def _under_active(self, script: Any, args: list[Any], what: str) -> Any:
        try:
            return await self._guarded(script(keys=[self.keys.active], args=args), self._timeout_s, what)
        except StoreNotLoaded:
            await self.ensure_active()
            return await self._guarded(script(keys=[self.keys.active], args=args), self._timeout_s, what)

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
        codec = self._seq_codecs[s.name]
        event = codec.encode_event([fields[f] for f in s.fields], int(time.time()) if ts is None else int(ts))
        args = [self.keys.ns, Keys.seq_suffix(s.name, str(user_id)), codec.header, event, s.max_len]
        return int(await self._under_active(self._append, args, f"append an event for user {user_id!r}"))

    def _row(self, values: dict[str, float], sparse: list[str], dense: list[str], what: str) -> tuple[list, list]:
        expected = set(sparse) | set(dense)
        if set(values) != expected:
            raise ValueError(f"{what} needs exactly {sorted(expected)}, got {sorted(values)}")
        return [int(values[f]) for f in sparse], [float(values[f]) for f in dense]

    async def put_item(self, item_id: str, features: dict[str, float]) -> None:
        """Create or replace one item (encoded values for every item feature) in the active version."""
        ints, floats = self._row(features, self.schema.item_sparse, self.schema.item_dense, "an item")
        value = self._item_codec.encode(np.asarray(ints), np.asarray(floats))
        await self._under_active(self._set_active, [self.keys.ns, Keys.item_suffix(str(item_id)), value],
                                 f"put item {item_id!r}")
        self._cache.discard(str(item_id))

    async def put_user(self, user_id: str, profile: dict[str, float]) -> None:
        """Create or replace one user's profile (encoded values) in the active version."""
        ints, floats = self._row(profile, self.schema.user_sparse, self.schema.user_dense, "a user profile")
        value = self._user_codec.encode(np.asarray(ints), np.asarray(floats))
        await self._under_active(self._set_active, [self.keys.ns, Keys.user_suffix(str(user_id)), value],
                                 f"put user {user_id!r}")

    async def value_sizes(self, user_id: str) -> dict[str, int]:
        """Bytes of the user's stored values (profile, each sequence) in the active version."""
        if self._version is None:
            await self._guarded(self._sync_version(), self._timeout_s, "read the active version")
        base = self.keys.base(self._version)
        keys = [base + "u:" + user_id] + [base + Keys.seq_suffix(s.name, user_id) for s in self.schema.sequences]
        lengths = await self._guarded(asyncio.gather(*(self._client.strlen(k) for k in keys)), self._timeout_s,
                                      "measure values")
        return dict(zip(["profile"] + [s.name for s in self.schema.sequences], lengths, strict=True))


class _PendingMget(PendingRead):
    """One MGET sent on a connection of the store's blocking pool, the reply not yet read. The
    connection stays checked out until ``result()`` or ``cancel()``: its next bytes are this reply."""

    def __init__(self, store: RedisOnlineStore, user_id: str, items: list[str], values: list[bytes | None],
                 miss: list[int], base: str, now: float, keys: list[str]):
        self._store, self._user_id, self._items = store, user_id, items
        self._values, self._miss, self._base, self._now, self._keys = values, miss, base, now, keys
        self._conn: Any = None

    def _error(self, exc: BaseException) -> FeatureStoreError:
        return self._store._map_error(exc, f"read user {self._user_id!r} + {len(self._items)} items",
                                      self._store._timeout_s)

    def send(self) -> None:
        try:
            self._conn = self._store._checkout()
        except (RedisError, OSError) as exc:
            raise self._error(exc) from exc
        try:
            try:
                self._conn.send_command("MGET", *self._keys)
            except RedisConnectionError:  # one immediate retry heals a connection broken by a server restart
                self._resend()
        except (RedisError, OSError) as exc:
            self._release()
            raise self._error(exc) from exc

    def _resend(self) -> None:
        self._conn.disconnect()
        self._conn.send_command("MGET", *self._keys)

    def _release(self, broken: bool = False) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._store._checkin(conn, broken)

    def result(self) -> RequestFeatures | None:
        if self._conn is None:
            raise RuntimeError("this read was already collected or cancelled")
        try:
            try:
                reply = self._conn.read_response()
            except RedisConnectionError:  # the server restarted since the send: send once more
                self._resend()
                reply = self._conn.read_response()
        except (RedisError, OSError) as exc:
            self._release(broken=True)
            raise self._error(exc) from exc
        self._release()
        store = self._store
        if reply[0] != store._version_bytes:
            return None
        return store._decode(self._user_id, self._items, reply, self._values, self._miss, self._base, self._now)

    def cancel(self) -> None:
        if self._conn is None:
            return
        try:
            self._conn.read_response()  # the reply must leave the socket before the connection is reused
        except (RedisError, OSError):
            self._release(broken=True)
        else:
            self._release()
