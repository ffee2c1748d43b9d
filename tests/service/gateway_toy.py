"""A toy exported model for the gateway's unit tests: a hand-written feature map, vocabulary,
manifest and a small ONNX graph (built with onnx.helper, no torch), plus an in-memory store.

The graph's score is ``sigmoid(w * (sum of candidate inputs as float) + u * (sum of user inputs))``
so tests can recompute it in numpy and see that every input reached the model in the right place.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from ctrserve.contract.feature_map import OOV_ID, FeatureInfo, FeatureMap, SequenceInfo
from ctrserve.contract.manifest import ExporterInfo, Manifest, ParityResult, StoreInfo, TensorSpec
from ctrserve.contract.store_schema import StoreSchema
from ctrserve.feature_store.base import OnlineStore, RequestFeatures
from ctrserve.feature_store.errors import StoreUnavailable
from ctrserve.service import settings as gs

L = 5
VOCAB = {
    "user_id": ["u1", "u2", "u3"],
    "segment": ["s0", "s1"],
    "item_id": ["10", "11", "12", "13"],
    "cate_id": ["a", "b", "c"],
    "device": ["0", "1", "2"],
}
HOUR_EDGES = [6.0, 12.0, 18.0]
TOY_NAMESPACE = "toy-prepared"  # what the toy manifests record as their feature-store namespace


def toy_fmap() -> FeatureMap:
    def sparse(name: str, side: str, table: str | None = None) -> FeatureInfo:
        return FeatureInfo(name=name, kind="sparse", side=side, dtype="int64", embedding=table or name,
                           vocab_size=len(VOCAB[table or name]) + 2)

    return FeatureMap(
        dataset="toy", label="label", user_id="user_id",
        features=[
            sparse("user_id", "user"), sparse("segment", "user"),
            FeatureInfo(name="age", kind="dense", side="user", dtype="float32",
                        transform={"kind": "standard", "mean": 30.0, "std": 10.0}),
            sparse("item_id", "item"), sparse("cate_id", "item"),
            FeatureInfo(name="price", kind="dense", side="item", dtype="float32",
                        transform={"kind": "log", "mean": 1.0, "std": 2.0}),
            sparse("device", "context"),
            FeatureInfo(name="hour", kind="sparse", side="context", dtype="int64", embedding="hour",
                        vocab_size=len(HOUR_EDGES) + 3,
                        transform={"kind": "buckets", "edges": json.dumps(HOUR_EDGES)}),
            FeatureInfo(name="hist_item_id", kind="sequence", side="user", dtype="int64", embedding="item_id",
                        vocab_size=6, sequence="hist", max_len=L),
            FeatureInfo(name="hist_cate_id", kind="sequence", side="user", dtype="int64", embedding="cate_id",
                        vocab_size=5, sequence="hist", max_len=L),
        ],
        sequences=[SequenceInfo(name="hist", max_len=L, fields=["hist_item_id", "hist_cate_id"],
                                targets=["item_id", "cate_id"])],
    )


USER_INPUTS = ["user_id", "segment", "age", "hist_item_id", "hist_cate_id"]
CAND_INPUTS = ["item_id", "cate_id", "price", "device", "hour"]


def toy_inputs(fmap: FeatureMap) -> list[TensorSpec]:
    out = []
    for name in USER_INPUTS + CAND_INPUTS:
        f = fmap.feature(name)
        side = "user" if name in USER_INPUTS else "candidate"
        batch = 1 if side == "user" else -1
        shape = [batch, L] if f.kind == "sequence" else [batch]
        out.append(TensorSpec(name=name, dtype=f.dtype, shape=shape, side=side))
    return out


def toy_manifest(name: str = "toy", version: int = 1) -> Manifest:
    fmap = toy_fmap()
    return Manifest(
        name=name, version=version, model="toy", dataset="toy", run_dir="/nonexistent", format="onnx",
        file="model.onnx", inputs=toy_inputs(fmap), feature_map=fmap, vocab_file="vocab.json",
        store=StoreInfo(namespace=TOY_NAMESPACE, vocab_sha256="0" * 64),
        parity=ParityResult(runtime="onnxruntime", tolerance=1e-5, passed=True, max_abs_diff=0.0, splits=["test"],
                            checks=[]),
        exporter=ExporterInfo(tool="torch.onnx.dynamo", torch_version="none"),
        exported_at=datetime.now(UTC),
    )


def weights(version: int) -> tuple[float, float]:
    """(candidate weight, user weight) of a toy version: versions score differently."""
    return 0.01 * version, 0.001 * version


def toy_onnx(manifest: Manifest, path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    w, u = weights(manifest.version)
    types = {"int64": TensorProto.INT64, "float32": TensorProto.FLOAT}
    inputs, nodes = [], []
    cand_terms, user_terms = [], []
    for t in manifest.inputs:
        inputs.append(helper.make_tensor_value_info(t.name, types[t.dtype], [None if d == -1 else d for d in t.shape]))
        nodes.append(helper.make_node("Cast", [t.name], [f"{t.name}_f"], to=TensorProto.FLOAT))
        if t.side == "candidate":
            cand_terms.append(f"{t.name}_f")
        else:
            nodes.append(helper.make_node("ReduceSum", [f"{t.name}_f"], [f"{t.name}_s"], keepdims=0))
            user_terms.append(f"{t.name}_s")
    nodes.append(helper.make_node("Sum", cand_terms, ["cand_sum"]))
    nodes.append(helper.make_node("Sum", user_terms, ["user_sum"]))
    nodes.append(helper.make_node("Constant", [], ["w"], value=helper.make_tensor("w", TensorProto.FLOAT, [], [w])))
    nodes.append(helper.make_node("Constant", [], ["u"], value=helper.make_tensor("u", TensorProto.FLOAT, [], [u])))
    nodes.append(helper.make_node("Mul", ["cand_sum", "w"], ["cw"]))
    nodes.append(helper.make_node("Mul", ["user_sum", "u"], ["uw"]))
    nodes.append(helper.make_node("Add", ["cw", "uw"], ["logit"]))
    nodes.append(helper.make_node("Sigmoid", ["logit"], [manifest.output.name]))
    out = helper.make_tensor_value_info(manifest.output.name, TensorProto.FLOAT, [None])
    graph = helper.make_graph(nodes, "toy", inputs, [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def expected_scores(inputs: dict[str, np.ndarray], version: int = 1) -> np.ndarray:
    w, u = weights(version)
    cand = sum(inputs[n].astype(np.float64) for n in CAND_INPUTS)
    user = sum(float(inputs[n].astype(np.float64).sum()) for n in USER_INPUTS)
    return 1 / (1 + np.exp(-(w * cand + u * user)))


def write_toy_repo(repo: Path, name: str = "toy", versions: Sequence[int] = (1,)) -> Path:
    for v in versions:
        d = repo / name / str(v)
        d.mkdir(parents=True, exist_ok=True)
        m = toy_manifest(name, v)
        m.save(d / "manifest.json")
        (d / "vocab.json").write_text(json.dumps(VOCAB))
        toy_onnx(m, d / "model.onnx")
    return repo


# -- an in-memory feature store -------------------------------------------------------------
USERS = {  # raw id -> encoded profile and history (most recent first)
    "u1": {"user_id": 2, "segment": 3, "age": 0.5, "hist_item_id": [3, 4, 0, 0, 0], "hist_cate_id": [2, 3, 0, 0, 0]},
    "u2": {"user_id": 3, "segment": 2, "age": -1.0, "hist_item_id": [0] * L, "hist_cate_id": [0] * L},
}
ITEMS = {"10": {"item_id": 2, "cate_id": 2, "price": 0.25}, "11": {"item_id": 3, "cate_id": 3, "price": -0.5},
         "12": {"item_id": 4, "cate_id": 2, "price": 1.5}}


class MemoryStore(OnlineStore):
    """Answers like the Redis store (cold start: OOV ids, dense 0); ``fail`` makes it unavailable."""

    def __init__(self, schema: StoreSchema, namespace: str = "toy", vocab_sha256: str | None = None):
        self.schema, self.namespace, self.vocab_sha256 = schema, namespace, vocab_sha256
        self.fail = False
        #: what ``fail`` raises (any FeatureStoreError)
        self.error: Exception = StoreUnavailable("memory store switched off")
        self.reads = 0

    async def online_write_batch(self, users=None, items=None, progress=None) -> None:  # pragma: no cover
        raise NotImplementedError

    async def check_version(self) -> int | None:
        if self.fail:
            raise self.error
        return 1

    async def online_read(self, user_id: str, item_ids: Sequence[str]) -> RequestFeatures:
        self.reads += 1
        if self.fail:
            raise self.error
        s = self.schema
        u = USERS.get(user_id)
        user = {f: np.asarray(u[f] if u else OOV_ID, dtype=np.int64) for f in s.user_sparse}
        user.update({f: np.asarray(u[f] if u else 0.0, dtype=np.float32) for f in s.user_dense})
        seq = {f: np.asarray(u[f] if u else [0] * L, dtype=np.int64) for q in s.sequences for f in q.fields}
        items = {}
        for f in s.item_sparse + s.item_dense:
            dtype = np.float32 if f in s.item_dense else np.int64
            default = 0.0 if f in s.item_dense else OOV_ID
            items[f] = np.asarray([ITEMS[i][f] if i in ITEMS else default for i in item_ids], dtype=dtype)
        missing = np.asarray([k for k, i in enumerate(item_ids) if i not in ITEMS], dtype=np.int64)
        return RequestFeatures(user=user, sequence=seq, timestamps={}, sequence_length={}, items=items,
                               user_missing=u is None, profile_missing=u is None, missing_items=missing, version=1)

    async def close(self) -> None:
        pass


# -- an in-process gateway on the toy repository (tests import these from here, not from conftest:
# several test folders have a conftest, and a run given more than one folder imports the wrong one)
ROUTING = """experiments:
  - {name: main, salt: unit, arms: [{name: control, model: toy, version: 1, weight: 50},
                                    {name: treatment, model: toy, version: 2, weight: 50}]}
"""


def toy_settings(repo: Path, routing: Path | None = None, store_failure: str = "fail",
                 **api: Any) -> gs.GatewaySettings:
    return gs.GatewaySettings(
        server=gs.ServerSettings(access_log=False),
        api=gs.ApiSettings(**api),
        store=gs.StoreSettings(failure=store_failure),
        routing=gs.RoutingSettings(config=routing),
        backend=gs.BackendSettings(model_repository=repo, kind="onnxruntime", warmup_candidates=2),
    )


@asynccontextmanager
async def running(settings: gs.GatewaySettings) -> AsyncIterator[tuple[httpx.AsyncClient, Any, list[MemoryStore]]]:
    """The app with its lifespan running, ready to score; yields (client, app, stores)."""
    from ctrserve.service.app import create_app, wait_ready

    stores: list[MemoryStore] = []

    def factory(schema, namespace, vocab_sha256):
        stores.append(MemoryStore(schema, namespace, vocab_sha256))
        return stores[-1]

    app = create_app(settings, store_factory=factory)
    async with app.router.lifespan_context(app):
        await wait_ready(app, 30)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield client, app, stores
