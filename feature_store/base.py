"""The online-store interface (in the spirit of Feast's ``OnlineStore``): write a batch, read
what one request needs, name the active version; optionally a ``BlockingReader`` for callers
without an event loop. Backends live in their own modules (``redis_store``)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

import numpy as np

from ctrserve.contract.store_schema import StoreSchema

Progress = Callable[[int], None]


@dataclass
class UserRecords:
    """Users to write, keyed by raw id. ``profile``: feature -> ``[N]`` encoded values;
    ``sequences``: field -> ``[N, L]`` ids, most recent first, PAD=0 where absent;
    ``timestamps``: sequence name -> ``[N, L]`` unix seconds (absent: 0)."""

    ids: Sequence[str]
    profile: dict[str, np.ndarray]
    sequences: dict[str, np.ndarray] = field(default_factory=dict)
    timestamps: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def validate(self, schema: StoreSchema) -> None:
        n = len(self.ids)
        need = schema.user_sparse + schema.user_dense
        missing = [f for f in need if f not in self.profile]
        missing += [f for s in schema.sequences for f in s.fields if f not in self.sequences]
        if missing:
            raise ValueError(f"user records lack {missing}")
        for name, arr in [*self.profile.items(), *self.sequences.items()]:
            if len(arr) != n:
                raise ValueError(f"user column {name!r} has {len(arr)} rows for {n} ids")
        for s in schema.sequences:
            shapes = {np.shape(self.sequences[f]) for f in s.fields}
            if len(shapes) != 1 or len(next(iter(shapes))) != 2:
                raise ValueError(f"sequence {s.name!r}: fields must be [N, L] arrays of one shape, got {shapes}")
            ts = self.timestamps.get(s.name)
            if ts is not None and np.shape(ts) != next(iter(shapes)):
                raise ValueError(f"sequence {s.name!r}: timestamps shape {np.shape(ts)} != fields {shapes}")


@dataclass
class ItemRecords:
    """Items to write, keyed by raw id; ``features``: item feature -> ``[M]`` encoded values."""

    ids: Sequence[str]
    features: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.ids)

    def validate(self, schema: StoreSchema) -> None:
        missing = [f for f in schema.item_sparse + schema.item_dense if f not in self.features]
        if missing:
            raise ValueError(f"item records lack {missing}")
        for name, arr in self.features.items():
            if len(arr) != len(self.ids):
                raise ValueError(f"item column {name!r} has {len(arr)} rows for {len(self.ids)} ids")


@dataclass
class RequestFeatures:
    """Everything stored that one request needs, as numpy arrays in feature-map dtypes
    (ids int64, dense float32), ready for tensor assembly.

    - ``user``: user feature -> 0-d array (the profile; cold start: OOV ids, dense 0)
    - ``sequence``: sequence field -> ``[L]`` ids, most recent first, PAD=0 after the last event
    - ``timestamps``: sequence name -> ``[L]`` unix seconds (0 = padding or unknown)
    - ``sequence_length``: sequence name -> number of real events
    - ``items``: item feature -> ``[B]`` in candidate order (missing items: OOV ids, dense 0)
    - ``user_missing``: nothing stored for the user; ``profile_missing``: no profile
    - ``missing_items``: indices of candidates not in the store
    """

    user: dict[str, np.ndarray]
    sequence: dict[str, np.ndarray]
    timestamps: dict[str, np.ndarray]
    sequence_length: dict[str, int]
    items: dict[str, np.ndarray]
    user_missing: bool
    profile_missing: bool
    missing_items: np.ndarray
    version: int
    item_cache_hits: int = 0


class PendingRead(ABC):
    """A blocking read that has been sent and not yet collected (``BlockingReader.begin``).
    Exactly one of ``result()`` or ``cancel()`` finishes it; ``cancel()`` after ``result()`` is a no-op."""

    __slots__ = ()

    @abstractmethod
    def result(self) -> RequestFeatures | None:
        """The features; None when the active version flipped since the store adopted its own:
        read again with ``OnlineStore.online_read`` (which adopts the new one)."""

    @abstractmethod
    def cancel(self) -> None:
        """Drop the answer and give the connection back."""


class BlockingReader(ABC):
    """Reads without an event loop (one thread runs a whole request): send now, collect later.

    Policy is the caller's: a blocking read is bounded by ``timeout_s`` (the socket timeout), so a
    caller with less time left reads with ``online_read`` under its own timeout; a caller that must
    not wait for a connection (an event loop sending reads ahead) checks ``saturated`` first."""

    #: the socket timeout that bounds one blocking read, in seconds
    timeout_s: float

    @property
    @abstractmethod
    def saturated(self) -> bool:
        """Every connection holds a read not yet collected (a new ``begin()`` would wait for one)."""

    @abstractmethod
    def begin(self, user_id: str, item_ids: Sequence[str]) -> PendingRead | None:
        """Send the read and return at once; None when the active version must first be adopted
        through the async ``online_read`` (before the first read, after a flip). Raises
        FeatureStoreError when the read cannot be sent."""

    def read(self, user_id: str, item_ids: Sequence[str]) -> RequestFeatures | None:
        """``begin()`` then ``result()``: the features, or None (read with ``online_read``)."""
        pending = self.begin(user_id, item_ids)
        return None if pending is None else pending.result()


class OnlineStore(ABC):
    """A feature store for online serving. Implementations are async; unknown ids are never errors."""

    schema: StoreSchema

    @abstractmethod
    async def online_write_batch(self, users: UserRecords | None = None, items: ItemRecords | None = None,
                                 progress: Progress | None = None) -> None:
        """Upsert users and items into the serving data; ``progress(n)`` after each batch of n records."""

    @abstractmethod
    async def online_read(self, user_id: str, item_ids: Sequence[str]) -> RequestFeatures:
        """The user's profile and sequences and every candidate item's features."""

    @abstractmethod
    async def check_version(self) -> int | None:
        """The active version (None: nothing loaded); adopts a newly active one after the
        backend's own checks (schema, vocabulary); raises FeatureStoreError when unreachable
        or mismatched. Used by readiness probes."""

    def blocking_reader(self) -> BlockingReader | None:
        """This store's reader for callers without an event loop; None: the store has none
        (every read goes through ``online_read``)."""
        return None

    @abstractmethod
    async def close(self) -> None: ...

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()
