"""Triton's dynamic batcher on the real local tritonserver: a model exported with the multi-user
graph gets a batched config; concurrent requests of several users with different candidate counts
are merged into fewer executions and get the scores single calls and the embedded ONNX Runtime
path give."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from ctrserve.contract.manifest import Manifest
from ctrserve.export.exporter import export_run
from ctrserve.export.triton_repo import RepoOptions, read_config, write_config

NAME = "dnn"
#: candidate counts of the users sent together (all different, a lone candidate among them)
SIZES = (1, 3, 5, 8, 12, 2)


@pytest.fixture(scope="module")
def repo(run_factory, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("batch_repo")
    export_run(run_factory(NAME), "onnx", out, name=NAME, grouped=True, options=RepoOptions(flavour="local"))
    # a queue delay long enough that requests sent together always meet in one execution
    write_config(out / NAME, RepoOptions(flavour="local", max_queue_delay_us=200_000))
    return out


@pytest.fixture(scope="module")
def user_requests(repo: Path, tiny_prepared: Path) -> list[dict[str, np.ndarray]]:
    """One single-user wire request per entry of SIZES: a different user of the test split each,
    scoring that many candidate rows (items the user did not necessarily see: any rows will do)."""
    from ctrserve.contract.prepared import load_split
    from ctrserve.export.parity import group_requests

    m = Manifest.load(repo / NAME / "1")
    arrays = load_split(tiny_prepared, "test")
    users = [g[0] for g in group_requests(arrays, [t.name for t in m.user_inputs], 100)][:len(SIZES)]
    assert len(users) == len(SIZES)
    starts = np.cumsum([0, *SIZES[:-1]])
    return [{t.name: np.ascontiguousarray(arrays[t.name][[row]] if t.side == "user"
                                          else arrays[t.name][start:start + size]) for t in m.inputs}
            for row, start, size in zip(users, starts, SIZES, strict=True)]


def _stats(server, at_least: int = 0) -> tuple[int, int]:
    """(inference count, execution count), once the inference count reaches ``at_least`` (within
    5 s): Triton counts a request after sending its response, so a read right after the last
    response can miss it (seen on a loaded host: 19 counted for 18 merged requests)."""
    deadline = time.monotonic() + 5.0
    while True:
        with urllib.request.urlopen(f"{server.http_url}/v2/models/{NAME}/versions/1/stats", timeout=10) as r:
            stats = json.loads(r.read())["model_stats"][0]
        counts = int(stats["inference_count"]), int(stats["execution_count"])
        if counts[0] >= at_least or time.monotonic() > deadline:
            return counts
        time.sleep(0.05)


async def _score(url: str, requests: list[dict], together: bool) -> list[np.ndarray]:
    from ctrserve.service.backends.triton import TritonBackend, TritonClient

    client = TritonClient(url)
    backend = TritonBackend(NAME, 1, client, "prob")
    try:
        await backend.start()
        if together:
            return list(await asyncio.gather(*(backend.infer(r, timeout=10.0) for r in requests)))
        return [await backend.infer(r, timeout=10.0) for r in requests]
    finally:
        await client.close()


@pytest.mark.slow
def test_config_batches_users_with_ragged_candidates(repo: Path) -> None:
    cfg = read_config(repo / NAME / "config.pbtxt")
    m = Manifest.load(repo / NAME / "1")
    assert m.grouped is not None, m.grouped_reason
    assert cfg.max_batch_size == 16 and cfg.dynamic_batching.max_queue_delay_microseconds == 200_000
    ragged = {i.name for i in cfg.input if i.allow_ragged_batch}
    assert ragged == {t.name for t in m.candidate_inputs}


@pytest.mark.triton
def test_merged_requests_score_like_single_calls_and_embedded_ort(repo: Path, user_requests, tritonserver) -> None:
    from ctrserve.service.backends.onnxruntime import OnnxRuntimeBackend

    m = Manifest.load(repo / NAME / "1")
    embedded = OnnxRuntimeBackend(NAME, 1, repo / NAME / "1" / m.file, m.output.name)
    asyncio.run(embedded.start())
    try:
        reference = [embedded.infer_inline(r) for r in user_requests]
    finally:
        asyncio.run(embedded.close())

    server = tritonserver(repo, models=[])
    server.load(NAME, versions=[1])
    single = asyncio.run(_score(server.grpc_url, user_requests, together=False))
    before = _stats(server, at_least=len(SIZES))  # a fresh server: the single calls are all it counted
    rounds = 3
    merged = [asyncio.run(_score(server.grpc_url, user_requests, together=True)) for _ in range(rounds)]
    after = _stats(server, at_least=before[0] + rounds * len(SIZES))

    for i, (ref, one) in enumerate(zip(reference, single, strict=True)):
        assert one.shape == (SIZES[i],)
        np.testing.assert_allclose(one, ref, rtol=0, atol=1e-5, err_msg=f"user {i}: single call vs embedded ORT")
        for got in merged:
            np.testing.assert_allclose(got[i], ref, rtol=0, atol=1e-5, err_msg=f"user {i}: merged vs embedded ORT")
    inferences, executions = after[0] - before[0], after[1] - before[1]
    assert inferences == rounds * len(SIZES)
    assert executions < inferences, f"{inferences} requests ran in {executions} executions: nothing was merged"


@pytest.mark.triton
def test_a_bad_request_fails_alone_in_its_batch(repo: Path, user_requests, tritonserver) -> None:
    """Candidate inputs of different lengths in one request: that request gets its error, the
    requests merged with it their scores."""
    from ctrserve.service.backends import BackendError

    m = Manifest.load(repo / NAME / "1")
    cands = [t.name for t in m.candidate_inputs]
    if len(cands) < 2:
        pytest.skip("the model has one candidate input: candidate counts cannot disagree")
    bad = dict(user_requests[4])
    bad[cands[-1]] = bad[cands[-1]][:-1]
    server = tritonserver(repo, models=[])
    server.load(NAME, versions=[1])
    expected = asyncio.run(_score(server.grpc_url, user_requests, together=False))
    before = _stats(server, at_least=len(user_requests))

    async def together() -> list:
        from ctrserve.service.backends.triton import TritonBackend, TritonClient

        client = TritonClient(server.grpc_url)
        backend = TritonBackend(NAME, 1, client, "prob")
        try:
            await backend.start()
            return await asyncio.gather(*(backend.infer(r, timeout=10.0) for r in [*user_requests, bad]),
                                        return_exceptions=True)
        finally:
            await client.close()

    *good, error = asyncio.run(together())
    after = _stats(server, at_least=before[0] + len(user_requests))
    assert isinstance(error, BackendError) and "candidate inputs must share one shape" in str(error), error
    for got, ref in zip(good, expected, strict=True):
        assert not isinstance(got, BaseException), got
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
    assert after[1] - before[1] < len(user_requests), f"stats before {before}, after {after}: nothing was merged"


def _as_onnxruntime_backend(cfg, version_dir: Path, requests: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """What Triton's onnxruntime backend does with one merged batch under ``cfg``, done by hand:
    ragged inputs concatenated 1-D, the others stacked along the batch axis (then ``reshape``),
    batch inputs filled, and each ``batch_output`` scattered back shaped like its source input."""
    import onnxruntime as ort
    from tritonclient.grpc import model_config_pb2 as mc

    session = ort.InferenceSession(str(version_dir / cfg.default_model_filename), providers=["CPUExecutionProvider"])
    ranks = {i.name: len(i.shape) for i in session.get_inputs()}
    feeds = {}
    for inp in cfg.input:
        parts = [r[inp.name] for r in requests]
        for p in parts:  # every request matches [1, *dims] (-1: any)
            assert p.shape[0] == 1 and all(d in (-1, n) for d, n in zip(inp.dims, p.shape[1:], strict=True))
        if inp.allow_ragged_batch:
            feeds[inp.name] = np.concatenate([p.reshape(-1) for p in parts])
        else:
            stacked = np.concatenate(parts)
            feeds[inp.name] = stacked.reshape([len(parts), *inp.reshape.shape]) if inp.HasField("reshape") else stacked
        assert feeds[inp.name].ndim == ranks[inp.name], inp.name
    for bi in cfg.batch_input:
        assert bi.kind == mc.BatchInput.BATCH_ACCUMULATED_ELEMENT_COUNT and bi.data_type == mc.TYPE_INT32
        feeds[bi.target_name[0]] = np.cumsum([r[bi.source_input[0]].size for r in requests]).astype(np.int32)
    assert set(feeds) == set(ranks)
    (bo,) = cfg.batch_output
    assert bo.kind == mc.BatchOutput.BATCH_SCATTER_WITH_INPUT_SHAPE
    out = session.run([bo.target_name[0]], feeds)[0]
    shapes = [r[bo.source_input[0]].shape for r in requests]
    parts = np.split(out, np.cumsum([int(np.prod(s)) for s in shapes])[:-1])
    return [p.reshape(s) for p, s in zip(parts, shapes, strict=True)]


@pytest.mark.slow
def test_deploy_config_and_ragged_graph_agree(repo: Path, user_requests) -> None:
    """The deploy flavour cannot run here (the wheel has no onnxruntime backend): its config and
    model.triton.onnx are checked against each other through a hand-made onnxruntime backend,
    on the wire shapes the gateway sends (``[1, *dims]``), against the single-user graph."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    from ctrserve.export.parity import onnx_runner
    from ctrserve.export.triton_repo import render_config

    m = Manifest.load(repo / NAME / "1")
    cfg = text_format.Parse(render_config(m, RepoOptions(flavour="deploy")), mc.ModelConfig())
    assert cfg.max_batch_size == 16 and cfg.default_model_filename == m.grouped.ragged.file
    dims = {i.name: list(i.dims) for i in cfg.input}
    wire = [{k: v.reshape([1, *dims[k]]) for k, v in r.items()} for r in user_requests]
    got = _as_onnxruntime_backend(cfg, repo / NAME / "1", wire)
    single = onnx_runner(repo / NAME / "1" / m.file)
    for i, (r, g) in enumerate(zip(user_requests, got, strict=True)):
        assert g.shape == (1, SIZES[i])
        np.testing.assert_allclose(g[0], single(r), rtol=0, atol=1e-5, err_msg=f"user {i}")
