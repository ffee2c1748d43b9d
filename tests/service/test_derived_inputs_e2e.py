"""Inputs that are not plain stored values, end to end: semantic IDs in place of the item id (which
only keys the store: ``semantic_ids.mode=replace``) and candidate–history match features computed
by the gateway from the stored history; the scores over HTTP equal PyTorch's on the same rows."""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest
import yaml
from gateway_e2e import ROUTING_E2E, GatewayProcess, probes, reference_scores, train_and_export

from ctrserve.models.data.spec import SPEC_DIR

pytestmark = [pytest.mark.e2e, pytest.mark.redis, pytest.mark.slow]


@pytest.fixture(scope="module")
def sid_exported(tmp_path_factory: pytest.TempPathFactory):
    from ctrserve.models.data.prepare import prepare

    work = tmp_path_factory.mktemp("sid_e2e")
    spec = yaml.safe_load((SPEC_DIR / "synthetic.yaml").read_text())
    spec["features"] += [{"name": "cate_share", "type": "match", "field": "hist_cate_id", "op": "share"},
                         {"name": "cate_recency", "type": "match", "field": "hist_cate_id", "op": "recency"}]
    (work / "synthetic.yaml").write_text(yaml.safe_dump(spec))
    prepared = work / "synthetic-sid"
    prepare(work / "synthetic.yaml", work, prepared, {"n_rows": 3000, "n_users": 300, "n_items": 200, "n_cates": 10,
                                          "max_len": 12, "semantic_ids": {"mode": "replace"}})
    return train_and_export(prepared, work)


@pytest.fixture(scope="module")
def sid_gateway(sid_exported, redis_server, tmp_path_factory):
    from ctrserve.feature_store.config import RedisStoreConfig
    from ctrserve.feature_store.loader import load_prepared

    redis_server.start()
    redis_server.flushall()
    asyncio.run(load_prepared(sid_exported.prepared, RedisStoreConfig(url=redis_server.url)))
    work = tmp_path_factory.mktemp("sid_gw")
    routing = work / "routing.yaml"
    routing.write_text(ROUTING_E2E)
    gw = GatewayProcess(sid_exported.repo, redis_server.url, work / "gateway.log", args=["--routing", str(routing)])
    try:
        gw.wait_ready()
        yield gw
    finally:
        gw.stop()


def test_the_exported_graph_reads_codes_not_item_ids(sid_exported) -> None:
    manifest = json.loads((sid_exported.repo / "ctr" / "1" / "manifest.json").read_text())
    inputs = [spec["name"] for spec in manifest["inputs"]]
    assert {"sid_1", "sid_2", "hist_item_id_sid_1", "hist_item_id_sid_2"} <= set(inputs)
    assert "item_id" not in inputs and "hist_item_id" not in inputs
    assert {"cate_share", "cate_recency"} <= set(inputs)
    # the store still keys items by their raw id
    assert manifest["feature_map"]["item_key"]["name"] == "item_id"


def test_semantic_id_model_scores_equal_pytorch_over_http(sid_gateway, sid_exported) -> None:
    checked = 0
    for probe in probes(sid_exported.prepared):
        r = httpx.post(sid_gateway.url + "/v1/score", json=probe.body, timeout=10)
        assert r.status_code == 200, r.text
        out = r.json()
        ref = reference_scores(sid_exported.runs[out["version"]], sid_exported.prepared, probe.rows)
        diff = float(np.max(np.abs(np.asarray(out["scores"]) - ref)))
        assert diff <= 1e-4, f"user {probe.body['user_id']}: gateway differs from PyTorch by {diff:.2e}"
        checked += len(probe.rows)
    assert checked >= 50


def test_the_gateway_computes_match_features_as_prepare_did(sid_exported) -> None:
    """The assembled match inputs equal the prepared columns for the same rows (the store holds the
    history, never the match values)."""
    from ctrserve.contract.prepared import load_split
    from ctrserve.feature_store.base import RequestFeatures
    from ctrserve.service.assemble import Assembler

    asm = Assembler.from_dir(sid_exported.repo / "ctr" / "1")
    arrays = load_split(sid_exported.prepared, "test")
    rows = np.flatnonzero(arrays["hist_cate_id"][:, 0] > 0)[:40]
    assert "cate_share" not in asm.candidate_keys
    for r in rows:
        stored = RequestFeatures(
            user={}, sequence={f: arrays[f][r] for f in ("hist_item_id_sid_1", "hist_item_id_sid_2", "hist_cate_id")},
            timestamps={}, sequence_length={}, items={f: arrays[f][r:r + 1] for f in ("sid_1", "sid_2", "cate_id")},
            user_missing=False, profile_missing=False, missing_items=np.zeros(0, np.int64), version=1)
        got = asm.assemble("u", ["i"], stored)
        for name in ("cate_share", "cate_recency"):
            assert got[name][0] == pytest.approx(float(arrays[name][r]), abs=1e-6), (name, r)
    assert np.ptp(arrays["cate_share"][rows]) > 0  # the rows cover different values


def test_missing_items_never_read_a_raw_id_as_a_code(sid_exported) -> None:
    """An item the store does not answer for falls back to OOV codes, even when its raw id ("3")
    spells a valid code: no input holds raw item ids in a semantic-ID model."""
    from ctrserve.contract.feature_map import OOV_ID
    from ctrserve.service.assemble import Assembler

    asm = Assembler.from_dir(sid_exported.repo / "ctr" / "1")
    assert asm.item_id_feature is None
    assert "3" in json.loads((sid_exported.prepared / "vocab.json").read_text())["sid_1"]
    stored = asm.cold_start("someone", ["3", "4"])
    inputs = asm.assemble("someone", ["3", "4"], stored)
    assert inputs["sid_1"].tolist() == [OOV_ID, OOV_ID]
