"""The stored values of one schema: records to key/value bytes on the way in, one read's values
to the numpy arrays of a ``RequestFeatures`` on the way out. Byte formats are codec.py's; key
names are keys.py's; nothing here talks to Redis."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ctrserve.contract.feature_map import PAD_ID
from ctrserve.contract.store_schema import StoreSchema

from .base import ItemRecords, UserRecords
from .codec import KIND_ITEM, KIND_USER, RowCodec, SequenceCodec
from .keys import VersionKeys


def _columns(table: dict[str, np.ndarray], names: list[str], sl: slice, n: int, dtype: type) -> np.ndarray:
    """``[n, len(names)]``: the named columns' rows ``sl`` side by side (``[n, 0]`` for no names)."""
    if not names:
        return np.zeros((n, 0), dtype)
    return np.stack([np.asarray(table[f][sl]) for f in names], axis=1)


def _exact_row(values: dict[str, float], sparse: list[str], dense: list[str], what: str) -> tuple[list, list]:
    expected = set(sparse) | set(dense)
    if set(values) != expected:
        raise ValueError(f"{what} needs exactly {sorted(expected)}, got {sorted(values)}")
    return [int(values[f]) for f in sparse], [float(values[f]) for f in dense]


class RecordCodec:
    """Encodes and decodes the user, item and sequence values of one ``StoreSchema``."""

    def __init__(self, schema: StoreSchema):
        self.schema = schema
        self.user = RowCodec(KIND_USER, len(schema.user_sparse), len(schema.user_dense))
        self.item = RowCodec(KIND_ITEM, len(schema.item_sparse), len(schema.item_dense))
        self.sequences = {s.name: SequenceCodec(len(s.fields)) for s in schema.sequences}
        #: the value a missing item decodes as (OOV ids, dense 0)
        self.item_default = self.item.encode(*schema.item_defaults())
        self._user_default = schema.user_defaults()

    # -- writes ----------------------------------------------------------------------------
    def user_values(self, users: UserRecords, keys: VersionKeys, sl: slice) -> dict[str, bytes]:
        """Rows ``sl`` of ``users``: profile and sequence values by key (PAD item ids mark padding)."""
        schema = self.schema
        ids = [str(u) for u in users.ids[sl]]
        ints = _columns(users.profile, schema.user_sparse, sl, len(ids), np.int32)
        floats = _columns(users.profile, schema.user_dense, sl, len(ids), np.float32)
        out = {keys.user(uid): v for uid, v in zip(ids, self.user.encode_many(ints, floats), strict=True)}
        for s in schema.sequences:
            codec = self.sequences[s.name]
            fields = np.stack([np.asarray(users.sequences[f][sl]) for f in s.fields], axis=-1)  # [n, L, F]
            ts_all = users.timestamps.get(s.name)
            ts_all = np.zeros(fields.shape[:2], np.int64) if ts_all is None else np.asarray(ts_all[sl])
            present = fields[:, :, 0] != PAD_ID
            for k, uid in enumerate(ids):
                m = present[k]
                out[keys.sequence(s.name, uid)] = codec.encode(fields[k][m][:s.max_len], ts_all[k][m][:s.max_len])
        return out

    def item_values(self, items: ItemRecords, keys: VersionKeys, sl: slice) -> dict[str, bytes]:
        """Rows ``sl`` of ``items``: item values by key."""
        ids = [str(i) for i in items.ids[sl]]
        ints = _columns(items.features, self.schema.item_sparse, sl, len(ids), np.int32)
        floats = _columns(items.features, self.schema.item_dense, sl, len(ids), np.float32)
        return dict(zip(keys.items(ids), self.item.encode_many(ints, floats), strict=True))

    def user_row(self, profile: dict[str, float]) -> bytes:
        """One profile value from encoded values for exactly the schema's user features."""
        ints, floats = _exact_row(profile, self.schema.user_sparse, self.schema.user_dense, "a user profile")
        return self.user.encode(np.asarray(ints), np.asarray(floats))

    def item_row(self, features: dict[str, float]) -> bytes:
        """One item value from encoded values for exactly the schema's item features."""
        ints, floats = _exact_row(features, self.schema.item_sparse, self.schema.item_dense, "an item")
        return self.item.encode(np.asarray(ints), np.asarray(floats))

    # -- reads -----------------------------------------------------------------------------
    def decode_items(self, values: Sequence[bytes], key_of: Callable[[int], str]) -> dict[str, np.ndarray]:
        """Item values in candidate order -> item feature -> ``[B]`` (ids int64, dense float32)."""
        ints, floats = self.item.decode_many(values, key_of=key_of)
        items = {name: ints[:, k].astype(np.int64) for k, name in enumerate(self.schema.item_sparse)}
        items.update({name: floats[:, k].copy() for k, name in enumerate(self.schema.item_dense)})
        return items

    def decode_user(self, profile: bytes | None, key: str) -> dict[str, np.ndarray]:
        """A profile value (None: cold start) -> user feature -> 0-d array."""
        if profile is None:
            u_int, u_float = self._user_default
        else:
            u_ints, u_floats = self.user.decode_many([profile], key_of=lambda _: key)
            u_int, u_float = u_ints[0], u_floats[0]
        schema = self.schema
        user = {name: np.asarray(u_int[k], dtype=np.int64) for k, name in enumerate(schema.user_sparse)}
        user.update({name: np.asarray(u_float[k], dtype=np.float32) for k, name in enumerate(schema.user_dense)})
        return user

    def decode_sequences(self, values: Sequence[bytes | None], keys: Sequence[str]
                         ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, int]]:
        """One value per schema sequence (None: no events) -> fields ``[L]`` (PAD after the last
        event), timestamps ``[L]`` and lengths, by field and by sequence name."""
        sequence: dict[str, np.ndarray] = {}
        timestamps: dict[str, np.ndarray] = {}
        lengths: dict[str, int] = {}
        for s, value, key in zip(self.schema.sequences, values, keys, strict=True):
            fields_out = np.zeros((len(s.fields), s.max_len), dtype=np.int64)
            ts_out = np.zeros(s.max_len, dtype=np.int64)
            n = 0
            if value is not None:
                ev, ts = self.sequences[s.name].decode(value, key=key)
                n = min(len(ev), s.max_len)
                fields_out[:, :n] = ev[:n].T
                ts_out[:n] = ts[:n]
            sequence.update(zip(s.fields, fields_out, strict=True))
            timestamps[s.name], lengths[s.name] = ts_out, n
        return sequence, timestamps, lengths
