"""One request's read: the keys of its single ``MGET`` and the decoding of the reply, under the
version the store has adopted. The async read (redis_store.py) and the blocking read
(blocking.py) both send ``plan.keys`` and hand the reply to ``plan.decode``."""

from __future__ import annotations

import time

import numpy as np

from .base import RequestFeatures
from .cache import ItemCache
from .keys import VersionKeys
from .records import RecordCodec


class ReadView:
    """A version the store has adopted (its schema and vocabulary checked), as reads see it. The
    store replaces its view when it adopts another version; a view never changes."""

    __slots__ = ("_active_key", "_sequence_names", "cache", "codec", "keys", "version", "version_bytes")

    def __init__(self, version: int, version_bytes: bytes, active_key: str, keys: VersionKeys, codec: RecordCodec,
                 cache: ItemCache):
        self.version, self.version_bytes = version, version_bytes
        self.keys, self.codec, self.cache = keys, codec, cache
        self._active_key = active_key
        self._sequence_names = [s.name for s in codec.schema.sequences]

    @property
    def user_key_count(self) -> int:
        """Keys of one user in a plan (profile + sequences), after the pointer."""
        return 1 + len(self._sequence_names)

    def plan(self, user_id: str, item_ids: list[str]) -> ReadPlan:
        """Look the candidates up in the item cache; the MGET asks for the active pointer, the
        profile, the sequences and the uncached items (the pointer first, so a flip shows at once)."""
        now = time.monotonic()
        values = self.cache.get_many(item_ids, now)
        miss = [i for i, v in enumerate(values) if v is None]
        vkeys = self.keys
        keys = [self._active_key, vkeys.user(user_id)]
        keys += [vkeys.sequence(name, user_id) for name in self._sequence_names]
        keys += vkeys.items([item_ids[i] for i in miss])
        return ReadPlan(self, user_id, item_ids, values, miss, keys, now)


class ReadPlan:
    """The MGET ``keys`` of one request and what is needed to decode its reply."""

    __slots__ = ("_miss", "_now", "_values", "item_ids", "keys", "user_id", "view")

    def __init__(self, view: ReadView, user_id: str, item_ids: list[str], values: list[bytes | None],
                 miss: list[int], keys: list[str], now: float):
        self.view, self.user_id, self.item_ids, self.keys = view, user_id, item_ids, keys
        self._values, self._miss, self._now = values, miss, now

    @property
    def user_key_count(self) -> int:
        """``keys[1:1 + user_key_count]`` are the user's (one slot on a cluster); items follow."""
        return self.view.user_key_count

    def decode(self, reply: list[bytes | None]) -> RequestFeatures | None:
        """The features; None when the reply's active pointer is not the view's version (a flip, or
        a wiped store): adopt the active version and read again. Raises CorruptValue naming the key
        of a value that does not decode; only values that decoded enter the item cache."""
        view = self.view
        if reply[0] != view.version_bytes:
            return None
        codec, item_ids, values, miss = view.codec, self.item_ids, self._values, self._miss
        n_seq = len(codec.schema.sequences)
        fetched = reply[2 + n_seq:]
        missing = []
        for j, i in enumerate(miss):
            if fetched[j] is None:
                values[i] = codec.item_default
                missing.append(i)
            else:
                values[i] = fetched[j]
        items = codec.decode_items(values, key_of=lambda i: view.keys.item(item_ids[i]))
        for j, i in enumerate(miss):
            if fetched[j] is not None:
                view.cache.put(item_ids[i], fetched[j], self._now)
        profile = reply[1]
        user = codec.decode_user(profile, self.keys[1])
        sequences = reply[2:2 + n_seq]
        sequence, timestamps, lengths = codec.decode_sequences(sequences, self.keys[2:2 + n_seq])
        return RequestFeatures(
            user=user, sequence=sequence, timestamps=timestamps, sequence_length=lengths, items=items,
            user_missing=profile is None and all(v is None for v in sequences),
            profile_missing=profile is None, missing_items=np.asarray(missing, dtype=np.int64),
            version=view.version, item_cache_hits=len(item_ids) - len(miss),
        )
