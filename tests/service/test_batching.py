"""Cross-request batching (service/backends/batching.py) over a hand-built multi-user toy graph:
order and values per request, a lone request never waits, a bad request fails alone, deadlines
hold in the queue, the candidate cap splits batches; and the gateway wired to it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
from gateway_toy import VOCAB, expected_scores, running, toy_manifest, toy_settings, weights

from ctrserve.contract.manifest import GroupedSignature, Manifest
from ctrserve.service.backends import BackendError, BackendTimeout, BatchRide, batch_ride
from ctrserve.service.backends.batching import BatchingBackend
from ctrserve.service.backends.onnxruntime import OnnxRuntimeBackend

pytestmark = pytest.mark.quick


def grouped_toy_onnx(manifest: Manifest, path: Path) -> None:
    """The toy model's multi-user form: user terms summed per user row, gathered by user_index."""
    import onnx
    from onnx import TensorProto, helper

    w, u = weights(manifest.version)
    types = {"int64": TensorProto.INT64, "float32": TensorProto.FLOAT}
    inputs = [helper.make_tensor_value_info(t.name, types[t.dtype], [None, *t.shape[1:]]) for t in manifest.inputs]
    inputs.append(helper.make_tensor_value_info("user_index", TensorProto.INT64, [None]))
    nodes, cand, user = [], [], []
    axes = helper.make_node("Constant", [], ["axes"], value=helper.make_tensor("axes", TensorProto.INT64, [1], [1]))
    nodes.append(axes)
    for t in manifest.inputs:
        nodes.append(helper.make_node("Cast", [t.name], [f"{t.name}_f"], to=TensorProto.FLOAT))
        if t.side == "candidate":
            cand.append(f"{t.name}_f")
        elif len(t.shape) == 2:
            nodes.append(helper.make_node("ReduceSum", [f"{t.name}_f", "axes"], [f"{t.name}_s"], keepdims=0))
            user.append(f"{t.name}_s")
        else:
            user.append(f"{t.name}_f")
    nodes += [helper.make_node("Sum", cand, ["cand_sum"]), helper.make_node("Sum", user, ["user_rows"]),
              helper.make_node("Gather", ["user_rows", "user_index"], ["user_sum"], axis=0),
              helper.make_node("Constant", [], ["w"], value=helper.make_tensor("w", TensorProto.FLOAT, [], [w])),
              helper.make_node("Constant", [], ["u"], value=helper.make_tensor("u", TensorProto.FLOAT, [], [u])),
              helper.make_node("Mul", ["cand_sum", "w"], ["cw"]), helper.make_node("Mul", ["user_sum", "u"], ["uw"]),
              helper.make_node("Add", ["cw", "uw"], ["logit"]),
              helper.make_node("Sigmoid", ["logit"], [manifest.output.name])]
    out = helper.make_tensor_value_info(manifest.output.name, TensorProto.FLOAT, [None])
    model = helper.make_model(helper.make_graph(nodes, "toy_grouped", inputs, [out]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def grouped_manifest(version: int = 1) -> Manifest:
    m = toy_manifest(version=version)
    return m.model_copy(update={"grouped": GroupedSignature(file="model.grouped.onnx", index_input="user_index",
                                                            parity=m.parity)})


def request(rng: np.random.Generator, b: int) -> dict[str, np.ndarray]:
    out = {}
    for t in toy_manifest().inputs:
        shape = [1 if t.side == "user" else b, *t.shape[1:]]
        out[t.name] = (rng.integers(0, 5, shape) if t.dtype == "int64" else rng.normal(size=shape)).astype(t.dtype)
    return out


async def batching(tmp_path: Path, threads: int = 1, max_candidates: int = 1000,
                   max_wait_s: float = 0.0) -> BatchingBackend:
    m = grouped_manifest()
    grouped_toy_onnx(m, tmp_path / "model.grouped.onnx")
    inner = OnnxRuntimeBackend("toy", 1, tmp_path / "model.grouped.onnx", m.output.name, threads=threads)
    backend = BatchingBackend(m, inner, max_candidates, max_wait_s)
    await backend.start()
    return backend


async def test_concurrent_requests_share_a_call_and_get_their_own_scores_in_order(tmp_path: Path) -> None:
    backend = await batching(tmp_path)
    rng = np.random.default_rng(0)
    reqs = [request(rng, b) for b in (3, 1, 7, 2, 5, 4, 1, 6, 2, 3, 8, 1)]
    got = await asyncio.gather(*(backend.infer(r, 5.0) for r in reqs))
    for r, scores in zip(reqs, got, strict=True):
        np.testing.assert_allclose(scores, expected_scores(r), atol=1e-6)
    # one thread: the first runs at once, the other eleven wait for it and then go together
    assert (backend.stats.calls, backend.stats.requests) == (2, 12)
    await backend.close()


async def test_each_request_learns_the_call_it_rode_in(tmp_path: Path) -> None:
    backend = await batching(tmp_path)
    rng = np.random.default_rng(3)

    async def scored(b: int) -> BatchRide | None:
        await backend.infer(request(rng, b), 5.0)
        return batch_ride.get()  # set in this task's context by the backend

    rides = await asyncio.gather(*(scored(b) for b in (2, 3, 1, 4)))
    assert [r.requests for r in rides] == [1, 3, 3, 3]
    assert rides[0].wait_s < rides[1].wait_s  # the first ran at once, the rest waited for it
    assert batch_ride.get() is None  # the caller's own context is untouched
    await backend.close()


async def test_a_lone_request_waits_for_nothing(tmp_path: Path) -> None:
    backend = await batching(tmp_path, max_wait_s=30.0)  # a wait would blow the 2 s budget below
    r = request(np.random.default_rng(1), 4)
    scores = await asyncio.wait_for(backend.infer(r, 2.0), 2.0)
    np.testing.assert_allclose(scores, expected_scores(r), atol=1e-6)
    assert backend.stats.last[0] == 1 and backend.stats.last[1] < 0.5
    await backend.close()


async def test_a_malformed_request_fails_alone(tmp_path: Path) -> None:
    backend = await batching(tmp_path)
    rng = np.random.default_rng(2)
    good = [request(rng, 3) for _ in range(3)]
    bad = request(rng, 2)
    bad["price"] = bad["price"].astype(np.float64)
    short = request(rng, 2)
    short["hist_item_id"] = short["hist_item_id"][:, :2]
    results = await asyncio.gather(*(backend.infer(r, 5.0) for r in (good[0], bad, good[1], short, good[2])),
                                   return_exceptions=True)
    assert isinstance(results[1], BackendError) and "price" in str(results[1])
    assert isinstance(results[3], BackendError) and "hist_item_id" in str(results[3])
    for r, scores in zip(good, (results[0], results[2], results[4]), strict=True):
        np.testing.assert_allclose(scores, expected_scores(r), atol=1e-6)
    await backend.close()


async def test_a_deadline_passing_in_the_queue_answers_504_and_skips_the_call(tmp_path: Path) -> None:
    backend = await batching(tmp_path)
    real = backend.grouped._run

    def slow(inputs):
        import time
        time.sleep(0.3)
        return real(inputs)

    backend.grouped._run = slow
    rng = np.random.default_rng(3)
    first, late, patient = request(rng, 2), request(rng, 2), request(rng, 3)
    results = await asyncio.gather(backend.infer(first, 5.0), backend.infer(late, 0.05), backend.infer(patient, 5.0),
                                   return_exceptions=True)
    assert isinstance(results[1], BackendTimeout)
    np.testing.assert_allclose(results[2], expected_scores(patient), atol=1e-6)
    assert backend.stats.requests == 2  # the late request never reached the model
    await backend.close()


async def test_the_candidate_cap_splits_batches(tmp_path: Path) -> None:
    backend = await batching(tmp_path, max_candidates=10)
    rng = np.random.default_rng(4)
    reqs = [request(rng, 4) for _ in range(7)]
    got = await asyncio.gather(*(backend.infer(r, 5.0) for r in reqs))
    for r, scores in zip(reqs, got, strict=True):
        np.testing.assert_allclose(scores, expected_scores(r), atol=1e-6)
    # first alone, then 6 x 4 candidates at most 2 per call (8 <= 10 < 12)
    assert backend.stats.calls == 4 and backend.stats.candidates == 28
    await backend.close()


async def test_a_manifest_without_the_multi_user_graph_is_refused(tmp_path: Path) -> None:
    inner = OnnxRuntimeBackend("toy", 1, tmp_path / "x.onnx", "prob")
    with pytest.raises(ValueError, match="--grouped"):
        BatchingBackend(toy_manifest(), inner, 100, 0.0)


async def test_the_gateway_batches_when_configured(tmp_path: Path) -> None:
    from ctrserve.service.backends.batching import BatchingBackend as Batching

    repo = tmp_path / "repo"
    d = repo / "toy" / "1"
    d.mkdir(parents=True)
    m = grouped_manifest()
    m.save(d / "manifest.json")
    (d / "vocab.json").write_text(json.dumps(VOCAB))
    from gateway_toy import toy_onnx
    toy_onnx(m, d / "model.onnx")
    grouped_toy_onnx(m, d / "model.grouped.onnx")
    settings = toy_settings(repo)
    settings.backend.batch_max_candidates = 512
    bodies = [{"user_id": u, "candidates": [{"item_id": i} for i in items]}
              for u, items in (("u1", ["10", "11"]), ("u2", ["12"]), ("u1", ["12", "10", "11"]))]
    async with running(settings) as (client, app, _):
        backend = app.state.gateway.registry.get(("toy", 1)).backend
        assert isinstance(backend, Batching)
        warm_up_calls = backend.stats.calls
        answers = await asyncio.gather(*(client.post("/v1/score", json=b) for b in bodies))
        metrics = (await client.get("/metrics")).text
    # every scored request is counted once in the per-arm batch metrics
    assert 'ctrserve_batch_requests_count{arm="default"} 3.0' in metrics, metrics
    assert 'ctrserve_queue_wait_seconds_count{arm="default"} 3.0' in metrics
    calls = float(metrics.split('ctrserve_batch_calls_total{arm="default"} ')[1].split()[0])
    assert calls == pytest.approx(backend.stats.calls - warm_up_calls)
    solo = toy_settings(repo)
    async with running(solo) as (client, _, _):
        for b, r in zip(bodies, answers, strict=True):
            assert r.status_code == 200, r.text
            alone = (await client.post("/v1/score", json=b)).json()["scores"]
            np.testing.assert_allclose(r.json()["scores"], alone, atol=1e-6)


async def test_a_call_of_one_request_runs_the_single_user_graph(tmp_path: Path) -> None:
    from gateway_toy import toy_onnx

    m = grouped_manifest()
    grouped_toy_onnx(m, tmp_path / "model.grouped.onnx")
    toy_onnx(m, tmp_path / "model.onnx")
    grouped = OnnxRuntimeBackend("toy", 1, tmp_path / "model.grouped.onnx", m.output.name, threads=1)
    single = OnnxRuntimeBackend("toy", 1, tmp_path / "model.onnx", m.output.name, threads=1)
    backend = BatchingBackend(m, grouped, 1000, 0.0, single)
    await backend.start()
    calls = {"single": 0, "grouped": 0}
    for name, inner in (("single", single), ("grouped", grouped)):
        def counted(inputs: dict, _run=inner._run, name: str = name) -> np.ndarray:
            calls[name] += 1
            return _run(inputs)
        inner._run = counted  # type: ignore[method-assign]
    rng = np.random.default_rng(4)
    alone = request(rng, 5)
    np.testing.assert_allclose(await backend.infer(alone, 5.0), expected_scores(alone), atol=1e-6)
    assert calls == {"single": 1, "grouped": 0}
    reqs = [request(rng, b) for b in (2, 3, 4)]
    got = await asyncio.gather(*(backend.infer(r, 5.0) for r in reqs))  # the first alone, then two together
    for r, scores in zip(reqs, got, strict=True):
        np.testing.assert_allclose(scores, expected_scores(r), atol=1e-6)
    assert calls == {"single": 2, "grouped": 1}
    await backend.close()
