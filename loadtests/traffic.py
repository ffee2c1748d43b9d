"""Traffic model of the load tests: who asks (Zipf-like over the feature store's users), how many
candidates (a configurable distribution), and the request bodies, built once and reused.

No Locust and no torch here, so the logic is unit-tested on its own and the locustfile stays a
thin shell. A *pool* file (JSON, written by the runner from the loaded feature store) lists the
users and items the traffic draws from; the same pool drives the gateway (raw ids, the gateway
fetches features) and the eager baseline (already-encoded features in the body).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson


class TrafficError(ValueError):
    """A bad traffic setting (distribution spec, pool file)."""


# -- candidate counts ------------------------------------------------------------------------
@dataclass(frozen=True)
class CandidateDist:
    """Candidates per request. Specs: ``uniform:LO:HI`` (inclusive), ``fixed:N`` (or just ``N``),
    ``choice:A,B,C`` (equally likely)."""

    kind: str
    values: tuple[int, ...]

    @classmethod
    def parse(cls, spec: str) -> CandidateDist:
        text = spec.strip().lower()
        kind, colon, rest = text.partition(":")
        if not colon:  # a bare count
            kind, rest = "fixed", text
        parts = {"fixed": [rest], "uniform": rest.split(":"), "choice": rest.split(",")}.get(kind)
        if parts is None:
            raise TrafficError(f"candidate distribution {spec!r}: use uniform:LO:HI, fixed:N or choice:A,B,...")
        try:
            values = tuple(int(x) for x in parts)
        except ValueError as exc:
            raise TrafficError(f"candidate distribution {spec!r}: numbers expected ({exc})") from None
        if kind == "uniform" and (len(values) != 2 or values[0] > values[1]):
            raise TrafficError(f"candidate distribution {spec!r}: uniform takes LO:HI with LO <= HI")
        if not values or min(values) < 1:
            raise TrafficError(f"candidate distribution {spec!r}: counts must be >= 1")
        return cls(kind, values)

    def sample(self, rng: np.random.Generator) -> int:
        if self.kind == "fixed":
            return self.values[0]
        if self.kind == "uniform":
            return int(rng.integers(self.values[0], self.values[1] + 1))
        return int(self.values[int(rng.integers(len(self.values)))])

    @property
    def max(self) -> int:
        return max(self.values)

    def __str__(self) -> str:
        return f"{self.kind}:" + (":" if self.kind == "uniform" else ",").join(map(str, self.values))


# -- users -----------------------------------------------------------------------------------
def zipf_probs(n: int, s: float) -> np.ndarray:
    """Bounded Zipf: P(rank k) ∝ 1 / k^s for k = 1..n (s = 0 is uniform)."""
    if n < 1:
        raise TrafficError("the pool has no users")
    if s < 0:
        raise TrafficError(f"Zipf exponent must be >= 0, got {s}")
    w = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** s
    return w / w.sum()


class ZipfSampler:
    """Draws user indices: rank k (0-based) with ``zipf_probs``; draws come in blocks (cheap per call)."""

    def __init__(self, n: int, s: float, rng: np.random.Generator, block: int = 1024):
        self.cdf = np.cumsum(zipf_probs(n, s))
        self.cdf[-1] = 1.0
        self.rng = rng
        self.block = block
        self._buf: list[int] = []

    def sample(self) -> int:
        if not self._buf:
            self._buf = np.searchsorted(self.cdf, self.rng.random(self.block), side="right").tolist()
        return self._buf.pop()


# -- pacing ----------------------------------------------------------------------------------
class Pacer:
    """When one paced client sends: one request per ``period``, at a uniformly random moment of
    each period (independent clients collide by chance, not by construction). Not "wait the
    period minus the last request's time": clients started together (Locust starts all of them at
    once) then stay phase-locked, and each period's requests arrive as one burst — seen: 4 users
    within 0.5 ms of each other every period, latencies stepping 4/8/12/17 ms; fixed random phases
    instead make the result depend on the seed (3 of 4 users within 0.5 ms with seed 0)."""

    def __init__(self, period: float, rng: np.random.Generator, now: float):
        if period <= 0:
            raise TrafficError(f"pacing period must be > 0, got {period}")
        self.period, self.rng, self.window = period, rng, now

    def first_delay(self) -> float:
        """Seconds from the start (``now`` at construction) to the first request."""
        return float(self.rng.uniform(0.0, self.period))

    def next_delay(self, now: float) -> float:
        """Seconds from ``now`` (a request just finished) to the next one: a random moment of the next
        period; more than a period behind (overload), the schedule restarts at ``now`` — no catch-up burst."""
        self.window += self.period
        if self.window < now - self.period:
            self.window = now
        return max(0.0, self.window + float(self.rng.uniform(0.0, self.period)) - now)


# -- the pool --------------------------------------------------------------------------------
@dataclass
class Pool:
    """Users (in Zipf rank order: index 0 is the most active) and items requests draw from.

    ``contexts[u]``: raw context values of user u's requests (gateway). For the baseline,
    ``encoded_users[u]`` holds u's encoded user-side inputs (name -> flat list) and
    ``encoded_items`` the encoded candidate-side columns per item (name -> list over items),
    ``encoded_contexts[u]`` u's encoded context-side candidate inputs (name -> one value)."""

    users: list[str]
    items: list[str]
    contexts: list[dict[str, Any]]
    encoded_users: list[dict[str, list]] | None = None
    encoded_items: dict[str, list] | None = None
    encoded_contexts: list[dict[str, Any]] | None = None

    def save(self, path: Path) -> None:
        Path(path).write_bytes(orjson.dumps(self.__dict__, option=orjson.OPT_SERIALIZE_NUMPY))

    @classmethod
    def load(cls, path: Path | str) -> Pool:
        p = Path(path)
        if not p.is_file():
            raise TrafficError(f"pool file {p} not found (the runner writes it; see `ctrserve bench load --help`)")
        try:
            return cls(**json.loads(p.read_bytes()))
        except (ValueError, TypeError) as exc:
            raise TrafficError(f"pool file {p} is not a valid pool: {exc}") from None


class Bodies:
    """Request bodies, built once per (user, candidate count) and kept in a bounded LRU cache.

    Every user has a fixed candidate order (a seeded sample of the pool's items), so the
    candidate set of (user, n) is that order's first n items: a user asking again for the same
    number of candidates sends the same request, as a feed page would. Gateway bodies are joined
    from pre-serialised item fragments; baseline bodies carry the encoded features."""

    def __init__(self, pool: Pool, max_candidates: int, mode: str = "gateway", seed: int = 0,
                 cache_size: int = 4096):
        if mode not in ("gateway", "baseline"):
            raise TrafficError(f"mode must be gateway or baseline, got {mode!r}")
        if mode == "baseline" and (pool.encoded_users is None or pool.encoded_items is None):
            raise TrafficError("the pool has no encoded features: rebuild it with the baseline enabled")
        if max_candidates > len(pool.items):
            raise TrafficError(f"{max_candidates} candidates asked but the pool has {len(pool.items)} items")
        self.pool, self.mode, self.seed, self.max_candidates = pool, mode, seed, max_candidates
        #: ``get(user, n)``: the body, built once and then served from a bounded LRU cache
        self.get: Callable[[int, int], bytes] = functools.lru_cache(maxsize=cache_size)(self.build)
        self._frags = [orjson.dumps({"item_id": i}) for i in pool.items] if mode == "gateway" else []
        #: ``order(user)``: the user's fixed candidate order, drawn once
        self.order: Callable[[int], np.ndarray] = functools.cache(self._order)
        self._items_np = ({k: np.asarray(v) for k, v in pool.encoded_items.items()}
                          if mode == "baseline" and pool.encoded_items else {})

    def _order(self, user: int) -> np.ndarray:
        rng = np.random.default_rng((self.seed, user))
        return rng.choice(len(self.pool.items), self.max_candidates, replace=False)

    def build(self, user: int, n: int) -> bytes:
        idx = self.order(user)[:n]
        if self.mode == "gateway":
            head = orjson.dumps({"user_id": self.pool.users[user], "context": self.pool.contexts[user]})[:-1]
            return head + b',"candidates":[' + b",".join([self._frags[i] for i in idx.tolist()]) + b"]}"
        assert self.pool.encoded_users is not None and self.pool.encoded_contexts is not None
        cands: dict[str, Any] = {name: col[idx] for name, col in self._items_np.items()}
        for name, value in self.pool.encoded_contexts[user].items():
            cands[name] = [value] * n
        return orjson.dumps({"user": self.pool.encoded_users[user], "candidates": cands},
                            option=orjson.OPT_SERIALIZE_NUMPY)


# -- checking a response ---------------------------------------------------------------------
def check_response(status: int, content: bytes | None, expected: int) -> tuple[str | None, str]:
    """``(error or None, arm)`` for one scoring response: status 200, one score per candidate,
    every score a finite number in [0, 1]. The arm is ``?`` when the body does not say."""
    if status != 200:
        snippet = (content or b"")[:200].decode("utf-8", "replace")
        return f"HTTP {status}: {snippet}", "?"
    try:
        doc = orjson.loads(content or b"")
    except orjson.JSONDecodeError:
        return "response is not JSON", "?"
    if not isinstance(doc, dict):
        return "response is not a JSON object", "?"
    arm = str(doc.get("arm", "?"))
    scores = doc.get("scores")
    if not isinstance(scores, list):
        return "response has no scores list", arm
    if len(scores) != expected:
        return f"{len(scores)} scores for {expected} candidates", arm
    bad = [s for s in scores if not isinstance(s, int | float) or isinstance(s, bool) or not 0.0 <= s <= 1.0]
    if bad:
        return f"{len(bad)} scores outside [0, 1] (e.g. {bad[0]!r})", arm
    return None, arm
