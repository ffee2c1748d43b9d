"""The A/B replay: a prepared split sent through the gateway as live traffic, its true labels
sent back as the users' clicks (``POST /v1/events``), then the loop's outcomes checked against
the models' offline scores on the same rows. ``bench_ab.py`` runs it at full size; the CI test
(tests/service/test_events_e2e.py) on the tiny dataset.

A user's rows of the split are the candidates of the user's requests: each row with its own
context, each request with its rows' behaviour sequence in ``context`` (rows of one history
share a request; an item twice goes to a second request, since events join by request and
item). So every row is scored with the features it has in the dataset, whatever the store holds
and whatever the clicks sent back (which prepend to the stored sequence) did to it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np


@dataclass
class Replayed:
    """One request of the replay: its body and the split's rows and labels of its candidates."""

    body: dict[str, Any]
    rows: np.ndarray
    labels: np.ndarray


def replay_requests(prepared: Path, split: str = "test", max_candidates: int = 200) -> list[list[Replayed]]:
    """Every user of the split with raw-recoverable ids, as the user's requests (rows in split
    order, no item twice in one request)."""
    from ctrserve.contract.feature_map import FeatureMap
    from ctrserve.contract.prepared import load_split

    fmap = FeatureMap.load(prepared / "feature_map.json")
    vocab = json.loads((prepared / "vocab.json").read_text())
    arrays = load_split(prepared, split)
    context = [f.name for f in fmap.features if f.side == "context"]

    def raw(feature: str, ids: np.ndarray) -> list[str]:
        table = vocab[fmap.feature(feature).embedding or feature]
        return [table[int(i) - 2] for i in ids]

    ok = (arrays["user_id"] >= 2) & (arrays["item_id"] >= 2)  # raw ids recoverable (not PAD/OOV)
    for c in context:
        ok &= arrays[c] >= 2
    rows_ok = np.flatnonzero(ok)
    order = rows_ok[np.argsort(arrays["user_id"][rows_ok], kind="stable")]
    bounds = np.flatnonzero(np.r_[True, np.diff(arrays["user_id"][order]) != 0, True])
    out = []
    sequences = [f.name for f in fmap.sequence_fields]

    def history(row: int) -> dict[str, list[str]]:
        """The row's own behaviour sequence as raw values, most recent first (OOV kept as OOV)."""
        out = {}
        for name in sequences:
            ids = arrays[name][row]
            ids = ids[: int(np.argmax(ids == 0)) if (ids == 0).any() else len(ids)]
            table = vocab[fmap.feature(name).embedding or name]
            out[name] = [table[int(i) - 2] if i >= 2 else "\x00oov" for i in ids]
        return out

    for a, b in itertools.pairwise(bounds):
        user_rows = np.sort(order[a:b])
        user = raw("user_id", arrays["user_id"][user_rows[:1]])[0]
        rounds: list[list[int]] = []
        for row in user_rows:  # the first request with this history and without this item takes the row
            item, hist = arrays["item_id"][row], [arrays[n][row] for n in sequences]
            free = next((r for r in rounds if len(r) < max_candidates and item not in arrays["item_id"][r]
                         and all(np.array_equal(arrays[n][r[0]], h) for n, h in zip(sequences, hist, strict=True))),
                        None)
            rounds.append([row]) if free is None else free.append(row)
        group = []
        for picked in rounds:
            rows = np.asarray(picked)
            ctx = {c: raw(c, arrays[c][rows]) for c in context}
            cands = [{"item_id": item, "features": {c: ctx[c][k] for c in context}}
                     for k, item in enumerate(raw("item_id", arrays["item_id"][rows]))]
            body = {"user_id": user, "candidates": cands, "context": history(int(rows[0]))}
            group.append(Replayed(body, rows, arrays[fmap.label][rows] > 0.5))
        out.append(group)
    return out


@dataclass
class ReplayResult:
    arms: list[str] = field(default_factory=list)  # per request
    scores: list[np.ndarray] = field(default_factory=list)
    events_sent: int = 0
    events_accepted: int = 0
    #: the gateway's answers to the events, by result (accepted, duplicate, unknown_...)
    event_results: dict[str, int] = field(default_factory=dict)
    failures: int = 0
    errors: list[str] = field(default_factory=list)  # the first few failures' answers
    #: (requests done, the experiment's outcomes then) every ``snapshot_every`` requests
    snapshots: list[tuple[int, dict[str, Any]]] = field(default_factory=list)


async def replay(url: str, users: list[list[Replayed]], experiment: str, events_every: int = 5,
                 concurrency: int = 4, snapshot_every: int = 0, prefix: str = "replay") -> ReplayResult:
    """Score every user's requests (``concurrency`` users at a time); after every
    ``events_every`` scored requests, one ``POST /v1/events`` with the clicks of the users done
    (a row labelled 1 = a click on its item). Results are per request, in ``flatten(users)`` order."""
    requests = flatten(users)
    result = ReplayResult(arms=[""] * len(requests), scores=[np.zeros(0)] * len(requests))
    pending: list[dict[str, Any]] = []
    starts = np.cumsum([0] + [len(g) for g in users])
    todo = iter(range(len(users)))
    done = 0

    async def send_events(client: httpx.AsyncClient, events: list[dict[str, Any]]) -> None:
        for _ in range(20):  # 503 (Redis busy): the same ids again, counted once
            r = await client.post("/v1/events", json={"events": events})
            if r.status_code == 200:
                result.events_accepted += r.json()["accepted"]
                for res in r.json()["results"]:
                    result.event_results[res] = result.event_results.get(res, 0) + 1
                return
            await asyncio.sleep(0.1)
        result.failures += 1
        result.errors = [*result.errors, f"events {r.status_code}: {r.text[:200]}"][:5]

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal done, pending
        for u in todo:
            clicks = []
            for i in range(starts[u], starts[u + 1]):
                rid = f"{prefix}-{i}"
                r = await client.post("/v1/score", json={**requests[i].body, "request_id": rid})
                if r.status_code != 200:
                    result.failures += 1
                    result.errors = [*result.errors, f"score {r.status_code}: {r.text[:200]}"][:5]
                    continue
                out = r.json()
                result.arms[i], result.scores[i] = out["arm"], np.asarray(out["scores"])
                items = requests[i].body["candidates"]
                clicks += [{"event_id": f"{rid}:{k}", "request_id": rid, "item_id": items[k]["item_id"],
                            "type": "click"} for k in np.flatnonzero(requests[i].labels)]
            pending += clicks
            done += 1
            if done % events_every == 0 and pending:
                batch, pending = pending, []
                result.events_sent += len(batch)
                await send_events(client, batch)
            if snapshot_every and done >= (len(result.snapshots) + 1) * snapshot_every:
                result.snapshots.append((done, (await client.get(f"/v1/experiments/{experiment}")).json()))

    async with httpx.AsyncClient(base_url=url, timeout=30, limits=httpx.Limits(max_connections=concurrency)) as c:
        await asyncio.gather(*(worker(c) for _ in range(concurrency)))
        if pending:
            result.events_sent += len(pending)
            await send_events(c, pending)
        if snapshot_every:
            result.snapshots.append((done, (await c.get(f"/v1/experiments/{experiment}")).json()))
    return result


def flatten(users: list[list[Replayed]]) -> list[Replayed]:
    return [r for group in users for r in group]


def offline_scores(run_dir: Path, prepared: Path, rows: np.ndarray, split: str = "test") -> np.ndarray:
    """The trained PyTorch model's click probabilities on the prepared rows (the trainer's own
    ``predict``, as its test evaluation computes them)."""
    from ctrserve.contract.prepared import load_split
    from ctrserve.models.train.trainer import load_run, predict

    _, fmap, model = load_run(run_dir)
    arrays = load_split(prepared, split)
    if not len(rows):
        return np.zeros(0)
    return predict(model, {k: v[rows] for k, v in arrays.items()}, fmap, 4096).astype(np.float64)


def evaluate(url: str, users: list[list[Replayed]], result: ReplayResult, experiment: str, runs: dict[str, Path],
             prepared: Path, redis_url: str, accepted_before: int = 0) -> dict[str, Any]:
    """Online AUC per arm (the gateway's histograms), offline AUC of the arm's model on the same
    rows (exact, and from the same histogram bins), the report from the exported log, and the
    events lost (accepted by the gateway but absent from the log or from the shared counters)."""
    from ctrserve.ab import read_log, report, weighted_auc
    from ctrserve.service.outcomes import BINS, auc_from_histograms, score_bins

    requests = flatten(users)
    outcome = httpx.get(f"{url}/v1/experiments/{experiment}", timeout=30).json()
    figures: dict[str, Any] = {"arms": {}}
    for arm, run in runs.items():
        idx = [i for i, a in enumerate(result.arms) if a == arm]
        rows = np.concatenate([requests[i].rows for i in idx]) if idx else np.zeros(0, dtype=np.int64)
        labels = np.concatenate([requests[i].labels for i in idx]) if idx else np.zeros(0, dtype=bool)
        served = np.concatenate([result.scores[i] for i in idx]) if idx else np.zeros(0)
        offline = offline_scores(run, prepared, rows)
        bins = score_bins(offline)
        binned = auc_from_histograms(np.bincount(bins[labels], minlength=BINS).astype(float),
                                     np.bincount(bins[~labels], minlength=BINS).astype(float))
        figures["arms"][arm] = {"rows": len(rows), "online_auc": outcome["arms"][arm]["auc"],
                                "offline_auc": weighted_auc(offline, labels), "offline_auc_binned": binned,
                                "max_score_diff": float(np.max(np.abs(served - offline))) if len(rows) else None}
    log = read_log(experiment, redis_url)
    figures["report"] = report(log, list(runs))
    in_log = log.events.get("click", 0)
    shared = outcome["events"].get("accepted", 0) - accepted_before
    figures["events"] = {"sent": result.events_sent, "accepted": result.events_accepted, "clicks_in_log": in_log,
                         "accepted_in_redis": shared, "failures": result.failures, **result.event_results,
                         "errors": result.errors}
    # every id is sent once, so a duplicate is a retry whose first attempt was recorded but not answered
    acknowledged = result.events_accepted + result.event_results.get("duplicate", 0)
    figures["events_lost"] = max(abs(acknowledged - in_log), abs(in_log - shared))
    figures["log"] = log
    return figures
