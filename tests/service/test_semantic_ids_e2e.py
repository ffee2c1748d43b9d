"""A semantic-ID model end to end: the item id only keys the store (``semantic_ids.mode=replace``),
the model reads the items' codes, and the gateway's scores over HTTP equal PyTorch's on the same rows."""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest
from gateway_e2e import ROUTING_E2E, GatewayProcess, probes, reference_scores, train_and_export

pytestmark = [pytest.mark.e2e, pytest.mark.redis, pytest.mark.slow]


@pytest.fixture(scope="module")
def sid_exported(tmp_path_factory: pytest.TempPathFactory):
    from ctrserve.models.data.prepare import prepare

    work = tmp_path_factory.mktemp("sid_e2e")
    prepared = work / "synthetic-sid"
    prepare("synthetic", work, prepared, {"n_rows": 3000, "n_users": 300, "n_items": 200, "n_cates": 10,
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
