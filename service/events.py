"""The closed loop's HTTP side: ``POST /v1/events`` and ``GET /v1/experiments/{name}``.

An event batch is answered in three round trips at most: read the requests its clicks name (the
user and the model), read the clicked items' stored features (to encode the sequence event), then
one pipeline running the event script per event (keys.py ``LUA_EVENT``): counted once per event
id, joined to its request and item, the arm's outcomes updated, logged, and — first click on an
impression — the item prepended to the user's sequence, all atomically per event. So a retry after
a failure (503, a timeout) counts each event once whatever part of the batch had been recorded.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StringConstraints, ValidationError
from starlette.responses import Response

from ctrserve.feature_store.errors import FeatureStoreError
from ctrserve.feature_store.feedback import RESULTS, Event, FeedbackStore, RequestInfo

from .api import ERRORS, check_api_key, started
from .errors import GatewayError, OrjsonResponse
from .gateway import Gateway
from .impressions import ImpressionLog
from .outcomes import summarize
from .request import Id, decode_body, describe_errors, not_an_object

RequestId = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+$")]


class EventIn(BaseModel):
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True, allow_inf_nan=False)
    event_id: Id = Field(description="Unique per event: a retried event with the same id is counted once.")
    request_id: RequestId = Field(description="The `request_id` of the scoring response that showed the item.")
    item_id: Id = Field(description="The item (one of that request's candidates).")
    type: Literal["click", "impression", "conversion"]
    ts: StrictInt | StrictFloat | None = Field(None, ge=0, description="Unix time in seconds (default: now).")


class EventBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    events: list[EventIn] = Field(min_length=1, description="At most `CTRSERVE_FEEDBACK_MAX_EVENTS` (1,000).")


class EventsResponse(BaseModel):
    accepted: int = Field(description="Events joined to their request and item and recorded.")
    duplicate: int = Field(description="Event ids recorded before (retries): not counted again.")
    unknown_request: int = Field(description="Request unknown or expired (or not sampled into the log).")
    unknown_item: int = Field(description="The request did not score this item.")
    results: list[str] = Field(description="Each event's result, in order.")


@dataclass
class Loop:
    """The loop's parts in a running gateway (``app.state.loop``)."""

    store: FeedbackStore
    log: ImpressionLog
    append_clicks: bool

    async def close(self) -> None:
        await self.log.close()
        await self.store.close()


def loop_of(app: Any) -> Loop:
    loop = getattr(app.state, "loop", None)
    if loop is None:
        raise GatewayError(503, "feedback_unavailable", "the closed loop is off (CTRSERVE_FEEDBACK_ENABLED=false)")
    return loop


def validate_batch(value: Any, content_type: str | None, max_events: int) -> EventBatch:
    """A decoded body -> the batch, or 422 naming each bad event by index and field."""
    if type(value) is not dict:
        raise not_an_object(content_type)
    try:
        batch = EventBatch.model_validate(value)
    except ValidationError as exc:
        raise GatewayError(422, "invalid_request", describe_errors(exc.errors(include_url=False))) from None
    if len(batch.events) > max_events:
        raise GatewayError(422, "too_many_events", f"{len(batch.events)} events; at most {max_events} per request")
    return batch


async def _appends(gw: Gateway, loop: Loop, events: list[Event]) -> list[tuple[str, list[Any]] | None]:
    """For each first-time click: the sequence append it makes (None for the other events)."""
    out: list[tuple[str, list[Any]] | None] = [None] * len(events)
    clicks = [i for i, e in enumerate(events) if e.type == "click"]
    if not loop.append_clicks or not clicks:
        return out
    rids = sorted({events[i].request_id for i in clicks})
    infos: dict[str, RequestInfo | None] = dict(zip(rids, await loop.store.requests(rids), strict=True))
    table = gw.table
    by_user: dict[tuple[int, str], tuple[Any, list[int]]] = {}  # one store read per (store, user)
    for i in clicks:
        info = infos[events[i].request_id]
        loaded = table.models.get((info.model, info.version)) if info is not None and table is not None else None
        if loaded is None:
            continue  # unknown request (the script counts it) or a model no longer served (no append)
        store = gw.stores.for_model(loaded.manifest)
        if getattr(store, "click_appends", None) is not None and store.schema.sequences:
            by_user.setdefault((id(store), info.user_id), (store, []))[1].append(i)
    reads = [store.click_appends(user, [(events[i].item_id, events[i].ts) for i in idx])
             for (_, user), (store, idx) in by_user.items()]
    for (_, idx), (active, args) in zip(by_user.values(), await asyncio.gather(*reads), strict=True):
        for i, a in zip(idx, args, strict=True):
            out[i] = (active, a)
    return out


async def record(gw: Gateway, loop: Loop, batch: EventBatch) -> dict[str, Any]:
    now = int(time.time())
    events = [Event(e.event_id, e.request_id, e.item_id, e.type, now if e.ts is None else int(e.ts))
              for e in batch.events]
    await loop.log.flush()  # this process's answered requests are joinable before their events
    try:
        results = await loop.store.record_events(events, await _appends(gw, loop, events))
    except FeatureStoreError as exc:
        raise GatewayError(503, "store_unavailable", f"events not recorded (retry with the same event ids): "
                                                     f"{exc}") from None
    counts = dict.fromkeys(RESULTS, 0)
    for r in results:
        counts[r] = counts.get(r, 0) + 1
    for r, n in counts.items():
        if n:
            gw.metrics.events.labels(r).inc(n)
    return {**counts, "results": results}


router = APIRouter()


@router.post("/v1/events", response_model=EventsResponse, responses=ERRORS, tags=["feedback"], openapi_extra={
    "requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/EventBatch"}}}}})
async def post_events(request: Request) -> Response:
    """Record what users did with scored items: a batch of `{event_id, request_id, item_id, type, ts}`.
    Each event joins its scoring request by `request_id` and `item_id`; an unknown or expired
    request is counted and reported, not an error; a repeated `event_id` is counted once. A click
    prepends the item to the user's behaviour sequence, so the user's next request is scored with
    it. Redis down: 503, nothing lost by retrying the same batch."""
    value = decode_body(await request.body(), request.headers.get("content-type"))
    gw = started(request.app)
    check_api_key(gw, request.headers.get("x-api-key", ""))
    loop = loop_of(request.app)
    batch = validate_batch(value, request.headers.get("content-type"), gw.settings.feedback.max_events)
    return OrjsonResponse(await record(gw, loop, batch))


async def experiment_outcomes(gw: Gateway, loop: Loop, name: str) -> dict[str, Any]:
    table = gw.require_table("no routing config in effect")
    exp = next((e for e in table.router.config.experiments if e.name == name), None)
    if exp is None:
        raise GatewayError(404, "not_found", f"unknown experiment {name!r}; known: "
                                             f"{[e.name for e in table.router.config.experiments]}")
    try:
        rows = await loop.store.outcomes(name, [a.name for a in exp.arms])
        totals = await loop.store.totals()
    except FeatureStoreError as exc:
        raise GatewayError(503, "store_unavailable", str(exc)) from None
    arms = {a.name: {"model": a.model, "version": a.version, "weight": a.weight, **summarize(rows[a.name])}
            for a in exp.arms}
    return {"experiment": name, "arms": arms, "events": totals}


@router.get("/v1/experiments/{name}", responses=ERRORS, tags=["feedback"])
async def get_experiment(name: str, request: Request) -> Response:
    """Outcomes of each arm of an experiment, from the counters every replica shares in Redis:
    requests, impressions, clicks, CTR with its 95 % interval, mean predicted CTR and their ratio
    (calibration), online AUC; and the events recorded by result."""
    gw = started(request.app)
    check_api_key(gw, request.headers.get("x-api-key", ""))
    return OrjsonResponse(await experiment_outcomes(gw, loop_of(request.app), name))


FIGURES = ("impressions", "clicks", "ctr", "mean_predicted", "auc")


async def refresh_metrics(app: Any, gw: Gateway) -> None:
    """Copy the shared outcomes into ``/metrics`` (skipped when Redis does not answer)."""
    loop, table = getattr(app.state, "loop", None), gw.table
    if loop is None or table is None:
        return
    try:
        for exp in table.router.config.experiments:
            rows = await loop.store.outcomes(exp.name, [a.name for a in exp.arms])
            for arm, row in rows.items():
                summary = summarize(row)
                for figure in FIGURES:
                    if summary[figure] is not None:
                        gw.metrics.ab_outcome.labels(exp.name, arm, figure).set(summary[figure])
        for result, n in (await loop.store.totals()).items():
            gw.metrics.ab_events.labels(result).set(n)
    except FeatureStoreError:
        return
