"""Compact binary values: a fixed 8-byte header, then packed little-endian arrays.

Header (``<2sBBHH``, 8 bytes): magic ``b"CT"``, codec version (1), kind (``U`` user profile,
``I`` item, ``S`` sequence), then two uint16 counts:

- ``U``/``I`` rows: ``n_int``, ``n_float``; payload = ``int32[n_int]`` (vocabulary ids, in
  schema order) then ``float32[n_float]`` (normalised dense values). Fixed size.
- ``S`` sequences: ``n_cols`` (the sequence's fields + 1 timestamp column), 0; payload =
  ``int32[n, n_cols]`` row-major, one row per event, most recent first, ``0 <= n <= L``. The last
  column is the event's unix time as uint32 (0 = unknown). Prepending an event is prepending
  ``4 * n_cols`` bytes, which is what the Lua append script does.

The header is the same for every value of one kind under one schema, so the magic, version,
kind and counts detect a value written by something else (or another schema) and a length
check detects truncation: either raises :class:`CorruptValue`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence

import numpy as np

from .errors import CorruptValue

MAGIC = b"CT"
CODEC_VERSION = 1
KIND_USER, KIND_ITEM, KIND_SEQUENCE = ord("U"), ord("I"), ord("S")
HEADER = struct.Struct("<2sBBHH")
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def _int32(values: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.size and (arr.min() < INT32_MIN or arr.max() > INT32_MAX):
        raise ValueError(f"{what}: values outside int32 range")
    return arr.astype("<i4", copy=False)


def _describe(value: bytes) -> str:
    """Name what is wrong with a value's header (for the error message)."""
    if len(value) < HEADER.size:
        return f"value of {len(value)} bytes is shorter than the {HEADER.size}-byte header"
    magic, version, kind, a, b = HEADER.unpack_from(value)
    if magic != MAGIC:
        return f"bad magic {magic!r} (expected {MAGIC!r})"
    if version != CODEC_VERSION:
        return f"codec version {version} (this reader understands {CODEC_VERSION})"
    return f"kind {chr(kind)!r} with counts ({a}, {b}), length {len(value)}"


class RowCodec:
    """A fixed-size row of int32 ids and float32 values (a user profile or an item)."""

    def __init__(self, kind: int, n_int: int, n_float: int):
        self.kind, self.n_int, self.n_float = kind, n_int, n_float
        self.header = HEADER.pack(MAGIC, CODEC_VERSION, kind, n_int, n_float)
        self.dtype = np.dtype([("h", "V8"), ("i", "<i4", (n_int,)), ("f", "<f4", (n_float,))])
        self.size = self.dtype.itemsize

    def encode_many(self, ints: np.ndarray, floats: np.ndarray) -> list[bytes]:
        """``ints [N, n_int]``, ``floats [N, n_float]`` -> N values."""
        ints, floats = np.asarray(ints), np.asarray(floats)
        ints = ints.reshape(ints.shape[0] if ints.ndim else 1, self.n_int)
        floats = floats.reshape(floats.shape[0] if floats.ndim else 1, self.n_float)
        if len(ints) != len(floats):
            raise ValueError(f"{len(ints)} int rows but {len(floats)} float rows")
        rec = np.empty(len(ints), self.dtype)
        rec["h"] = np.frombuffer(self.header, "V8")[0]
        rec["i"] = _int32(ints, "ids")
        rec["f"] = floats.astype("<f4")
        raw = rec.tobytes()
        return [raw[k:k + self.size] for k in range(0, len(raw), self.size)]

    def encode(self, ints: np.ndarray, floats: np.ndarray) -> bytes:
        return self.encode_many(np.asarray(ints)[None], np.asarray(floats)[None])[0]

    def decode_many(self, values: Sequence[bytes],
                    key_of: Callable[[int], str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """N values -> ``(int32 [N, n_int], float32 [N, n_float])``; CorruptValue names the first bad one."""
        size = self.size
        if values and set(map(len, values)) != {size}:  # C-speed check; find the culprit only when it fails
            i = next(i for i, v in enumerate(values) if len(v) != size)
            raise CorruptValue(f"expected a {size}-byte {chr(self.kind)!r} row: {_describe(values[i])}",
                               key_of(i) if key_of else None)
        rec = np.frombuffer(b"".join(values), self.dtype)
        bad = np.flatnonzero(rec["h"] != np.frombuffer(self.header, "V8")[0])
        if bad.size:
            i = int(bad[0])
            raise CorruptValue(f"expected a {chr(self.kind)!r} row: {_describe(values[i])}",
                               key_of(i) if key_of else None)
        return rec["i"], rec["f"]


class SequenceCodec:
    """The most recent events of one behaviour sequence: ``int32 [n, fields + 1]``."""

    def __init__(self, n_fields: int):
        self.n_fields = n_fields
        self.n_cols = n_fields + 1
        self.header = HEADER.pack(MAGIC, CODEC_VERSION, KIND_SEQUENCE, self.n_cols, 0)
        self.event_size = 4 * self.n_cols

    def encode_event(self, fields: Sequence[int], ts: int) -> bytes:
        """One event row, without header (what the append script prepends)."""
        if len(fields) != self.n_fields:
            raise ValueError(f"an event has {self.n_fields} fields, got {len(fields)}")
        if not 0 <= ts < 2**32:
            raise ValueError(f"timestamp {ts} is not a uint32 unix time")
        row = _int32(np.asarray(fields, dtype=np.int64), "event fields")
        return row.tobytes() + np.asarray([ts], "<u4").tobytes()

    def encode(self, fields: np.ndarray, ts: np.ndarray | None = None) -> bytes:
        """``fields [n, n_fields]`` ids (most recent first), ``ts [n]`` -> one value."""
        fields = np.asarray(fields).reshape(-1, self.n_fields)
        rows = np.empty((len(fields), self.n_cols), "<i4")
        rows[:, :-1] = _int32(fields, "sequence fields")
        ts = np.zeros(len(fields), np.int64) if ts is None else np.asarray(ts, dtype=np.int64)
        if ts.size and (ts.min() < 0 or ts.max() >= 2**32):
            raise ValueError("timestamps must be uint32 unix times")
        rows[:, -1] = ts.astype("<u4").view("<i4")
        return self.header + rows.tobytes()

    def decode(self, value: bytes, key: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """One value -> ``(int32 [n, n_fields], uint32 [n])``."""
        if value[:HEADER.size] != self.header or (len(value) - HEADER.size) % self.event_size:
            raise CorruptValue(f"expected a sequence of {self.n_cols}-column events: {_describe(value)}", key)
        rows = np.frombuffer(value, "<i4", offset=HEADER.size).reshape(-1, self.n_cols)
        return rows[:, :-1], rows[:, -1].view("<u4")
