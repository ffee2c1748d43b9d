"""The closed loop end to end with real processes: redis-server (bulk-loaded), the gateway as a
``ctrserve serve`` subprocess, ``POST /v1/events`` and ``GET /v1/experiments/{name}``.

Score, click, score again: the click is first in the user's stored sequence and the second
request is scored with it; events are idempotent; unknown requests and items are reported, not
errors; malformed events are 422 naming the event; Redis down and back: 503, then the same batch
retried is counted once."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import httpx
import pytest
from gateway_e2e import ROUTING_E2E, GatewayProcess, probes

pytestmark = [pytest.mark.e2e, pytest.mark.redis, pytest.mark.slow]


@pytest.fixture(scope="module")
def loop_gateway(exported, store_url, tmp_path_factory):
    path = tmp_path_factory.mktemp("routing") / "routing.yaml"
    path.write_text(ROUTING_E2E)
    gw = GatewayProcess(exported.repo, store_url, path.parent / "gateway.log", args=["--routing", str(path)],
                        env={"CTRSERVE_FEEDBACK_FLUSH_INTERVAL_MS": "5"})
    try:
        gw.wait_ready()
        yield gw
    finally:
        gw.stop()


def _score(url: str, body: dict) -> dict:
    r = httpx.post(url + "/v1/score", json={**body, "request_id": uuid.uuid4().hex}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def _events(url: str, events: list[dict]) -> httpx.Response:
    return httpx.post(url + "/v1/events", json={"events": events}, timeout=10)


def _outcomes(url: str) -> dict:
    r = httpx.get(url + "/v1/experiments/main", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def _sequence(store_url: str, exported, user_raw: str) -> list[int]:
    """The user's stored item sequence (encoded ids, most recent first), read from Redis."""
    from ctrserve.contract.manifest import Manifest
    from ctrserve.contract.store_schema import StoreSchema
    from ctrserve.feature_store.config import RedisStoreConfig
    from ctrserve.feature_store.redis_store import RedisOnlineStore

    manifest = Manifest.load(exported.repo / "ctr" / "1" / "manifest.json")
    schema = StoreSchema.from_feature_map(manifest.feature_map)

    async def read() -> list[int]:
        store = RedisOnlineStore(schema, RedisStoreConfig(url=store_url), namespace=manifest.store.namespace)
        try:
            got = await store.online_read(user_raw, [])
        finally:
            await store.close()
        return [int(x) for x in got.sequence["hist_item_id"][: got.sequence_length["hist"]]]

    return asyncio.run(read())


def _encoded_item(exported, raw: str) -> int:
    import json

    vocab = json.loads((Path(exported.prepared) / "vocab.json").read_text())
    return vocab["item_id"].index(raw) + 2


def test_replay_matches_offline_auc_loses_no_event_and_retrains(loop_gateway, exported, store_url, tmp_path):
    """The small form of `ctrserve bench ab`: the tiny test split replayed through both arms with
    its labels as clicks (first in this module: a fresh store). Each arm's online AUC equals its
    model's offline AUC on the same rows; every accepted event is in the log and the shared
    counters; the exported log is a prepared dataset the trainer trains on."""
    from typer.testing import CliRunner

    from ctrserve.ab import ab_app
    from ctrserve.contract.prepared import load_split
    from ctrserve.loadtests.replay import evaluate, replay, replay_requests
    from ctrserve.models.train.config import resolve_config
    from ctrserve.models.train.trainer import train

    requests = replay_requests(exported.prepared)
    result = asyncio.run(replay(loop_gateway.url, requests, "main", concurrency=4))
    assert result.failures == 0 and result.events_sent > 0
    runs = {"control": exported.runs[1], "treatment": exported.runs[2]}
    figures = evaluate(loop_gateway.url, requests, result, "main", runs, exported.prepared, store_url)
    for arm, f in figures["arms"].items():
        print(f"\n{arm}: {f}")
        assert f["rows"] > 20 and f["max_score_diff"] <= 1e-4, f
        # the loop counted every impression and click in its bin (these one-epoch models score
        # within 0.03 of each other, a few bins wide: the exact-AUC match is the benchmark's, on
        # trained models); the report, from the exported log, has the exact AUC
        assert abs(f["online_auc"] - f["offline_auc_binned"]) <= 1e-9, (arm, f)
        assert abs(figures["report"]["arms"][arm]["auc"] - f["offline_auc"]) <= 1e-3, (arm, f)
    assert figures["events_lost"] == 0, figures["events"]
    assert figures["events"]["accepted"] + figures["events"].get("duplicate", 0) == figures["events"]["sent"]
    verdict = figures["report"]["comparisons"]["treatment"]["auc"]["verdict"]
    assert verdict in ("better", "worse", "not yet distinguishable")
    cli = CliRunner()
    shown = cli.invoke(ab_app, ["report", "main", "--arms", "control,treatment", "--redis-url", store_url])
    assert shown.exit_code == 0 and "treatment vs control, auc:" in shown.output, shown.output
    written = cli.invoke(ab_app, ["export", "main", "--out", str(tmp_path / "served"), "--like",
                                  str(exported.prepared), "--redis-url", store_url])
    assert written.exit_code == 0, written.output
    counts = {s: len(load_split(tmp_path / "served", s)["label"]) for s in ("train", "valid", "test")}
    assert sum(counts.values()) == sum(f["rows"] for f in figures["arms"].values())
    cfg = resolve_config("dnn", "synthetic", seed=3, variant="retrain", overrides={
        "train": {"max_epochs": 1, "batch_size": 64, "threads": 1}, "model": {"embedding_dim": 4, "hidden": [8]}})
    metrics = train(cfg, tmp_path / "served", tmp_path / "runs", progress=False).metrics
    assert 0 <= metrics["auc"] <= 1


def test_click_goes_first_in_the_users_sequence_and_changes_the_next_score(loop_gateway, exported, store_url):
    probe = probes(exported.prepared)[0]
    url, user = loop_gateway.url, probe.body["user_id"]
    before = _sequence(store_url, exported, user)
    first = _score(url, probe.body)
    # an item the user has not just interacted with, so the sequence visibly changes
    item = next(c["item_id"] for c in probe.body["candidates"] if [_encoded_item(exported, c["item_id"])] != before[:1])
    r = _events(url, [{"event_id": uuid.uuid4().hex, "request_id": first["request_id"], "item_id": item,
                       "type": "click", "ts": int(time.time())}])
    assert r.status_code == 200, r.text
    assert r.json()["results"] == ["accepted"], (r.json(), loop_gateway.log_tail())
    after = _sequence(store_url, exported, user)
    assert after[0] == _encoded_item(exported, item)
    assert after[1:] == before[: len(after) - 1]
    second = _score(url, probe.body)
    assert second["arm"] == first["arm"]
    assert second["scores"] != first["scores"], "the second request was not scored with the click"


def test_events_are_idempotent_and_counted_per_arm(loop_gateway, exported):
    url = loop_gateway.url
    probe = probes(exported.prepared)[1]
    before = _outcomes(url)
    scored = _score(url, probe.body)
    arm, items = scored["arm"], [c["item_id"] for c in probe.body["candidates"]]
    batch = [{"event_id": uuid.uuid4().hex, "request_id": scored["request_id"], "item_id": items[0], "type": t}
             for t in ("click", "impression", "conversion")]
    batch.append({**batch[0], "event_id": uuid.uuid4().hex})  # a second click on the same impression
    first = _events(url, batch).json()
    assert first["results"] == ["accepted"] * 4, first
    again = _events(url, batch).json()
    assert again["duplicate"] == 4 and again["accepted"] == 0, again
    after = _outcomes(url)
    a0, a1 = before["arms"][arm], after["arms"][arm]
    assert a1["requests"] - a0["requests"] == 1
    assert a1["impressions"] - a0["impressions"] == len(items)
    assert a1["clicks"] - a0["clicks"] == 1 and a1["repeat_clicks"] - a0["repeat_clicks"] == 1
    assert a1["conversions"] - a0["conversions"] == 1 and a1["impression_events"] - a0["impression_events"] == 1
    assert 0 < a1["mean_predicted"] < 1 and a1["ctr"] > 0
    metrics = httpx.get(url + "/metrics", timeout=10).text
    assert f'ctrserve_ab_outcome{{arm="{arm}",experiment="main",figure="clicks"}} {float(a1["clicks"])}' in metrics


def test_unknown_requests_and_items_are_reported_and_bad_events_named(loop_gateway, exported):
    url = loop_gateway.url
    scored = _score(url, probes(exported.prepared)[2].body)
    r = _events(url, [
        {"event_id": uuid.uuid4().hex, "request_id": "never-scored", "item_id": "1", "type": "click"},
        {"event_id": uuid.uuid4().hex, "request_id": scored["request_id"], "item_id": "not-a-candidate",
         "type": "click"}])
    assert r.status_code == 200, r.text
    assert r.json()["results"] == ["unknown_request", "unknown_item"]
    bad = _events(url, [{"event_id": "a", "request_id": "r", "item_id": "1", "type": "click"},
                        {"event_id": "b", "request_id": "r", "item_id": "1", "type": "purchase"}])
    assert bad.status_code == 422 and "events[1].type" in bad.json()["error"]["message"], bad.text
    missing = _events(url, [{"request_id": "r", "item_id": "1", "type": "click"}])
    assert missing.status_code == 422 and "events[0].event_id" in missing.json()["error"]["message"]
    assert _events(url, []).status_code == 422
    assert httpx.get(url + "/v1/experiments/nope", timeout=10).status_code == 404


def test_redis_down_gives_503_and_the_retry_counts_once(loop_gateway, exported, redis_server):
    import redis

    url = loop_gateway.url
    scored = _score(url, probes(exported.prepared)[3].body)
    time.sleep(0.2)  # the impression log's writer has flushed
    arm = scored["arm"]
    clicks0 = _outcomes(url)["arms"][arm]["clicks"]
    batch = [{"event_id": uuid.uuid4().hex, "request_id": scored["request_id"], "item_id": c["item_id"],
              "type": "click"} for c in probes(exported.prepared)[3].body["candidates"][:3]]
    with redis.Redis.from_url(redis_server.url) as client:
        client.save()  # the bulk-loaded store and the log survive the restart
    redis_server.stop()
    try:
        down = _events(url, batch)
        assert down.status_code == 503 and down.json()["error"]["code"] == "store_unavailable", down.text
    finally:
        redis_server.start()
    for _ in range(50):  # the gateway's connections heal on their next use
        retry = _events(url, batch)
        if retry.status_code == 200:
            break
        time.sleep(0.1)
    assert retry.json()["accepted"] == 3, retry.text
    assert _events(url, batch).json()["duplicate"] == 3
    assert _outcomes(url)["arms"][arm]["clicks"] == clicks0 + 3
