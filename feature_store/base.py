"""The online-store interface (in the spirit of Feast's ``OnlineStore``): write a batch,
read what one request needs. Backends live in their own modules (``redis_store``)."""

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
    """A blocking read that has been sent and not yet collected (``begin_read_blocking``).
    Exactly one of ``result()`` or ``cancel()`` finishes it; ``cancel()`` after ``result()`` is a no-op."""

    @abstractmethod
    def result(self) -> RequestFeatures | None:
        """The features (as ``online_read_blocking``); None: read again with ``online_read``."""

    @abstractmethod
    def cancel(self) -> None:
        """Drop the answer and give the connection back."""


class BlockingReader(ABC):
    """Interim stand-in for the interface the fstore branch defines."""

    timeout_s: float
    saturated: bool

    @abstractmethod
    def begin(self, user_id: str, item_ids: Sequence[str]) -> PendingRead | None: ...

    @abstractmethod
    def read(self, user_id: str, item_ids: Sequence[str]) -> RequestFeatures | None: ...


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

    def online_read_blocking(self, user_id: str, item_ids: Sequence[str], timeout_s: float | None = None
                             ) -> RequestFeatures | None:
        """``online_read`` without an event loop, bounded by ``timeout_s``, for callers that must not
        await; None means "use ``online_read``" (always, unless a backend implements it)."""
        pending = self.begin_read_blocking(user_id, item_ids, timeout_s)
        return None if pending is None else pending.result()

    def begin_read_blocking(self, user_id: str, item_ids: Sequence[str], timeout_s: float | None = None,
                            wait: bool = True) -> PendingRead | None:
        """The first half of ``online_read_blocking``: the request is sent, the caller does other
        work while the store answers, then calls ``result()`` (or ``cancel()``). None: use
        ``online_read`` (always, unless a backend implements it). ``wait=False``: None rather
        than wait for a connection that other uncollected reads hold."""
        return None

    def blocking_reader(self) -> BlockingReader | None:
        """Reads without an event loop, if the backend has them (interim; see the fstore branch)."""
        return None

    async def check_version(self) -> int | None:
        """The active version (None: nothing loaded) (interim; see the fstore branch)."""
        return 0

    @abstractmethod
    async def close(self) -> None: ...

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()
