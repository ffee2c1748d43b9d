"""I/O binding of the embedded backend (service/backends/onnxruntime.py, CTRSERVE_BACKEND_IO_BINDING)
on a real export: MGDIN with its multi-user graph scores the same through the binding path as through
the plain call, one request at a time and batched. On the CPU provider the binding path is the code
CUDA runs, with host memory instead of device memory."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from ctrserve.contract.prepared import load_split
from ctrserve.export.exporter import export_run
from ctrserve.service.backends.batching import BatchingBackend
from ctrserve.service.backends.onnxruntime import OnnxRuntimeBackend
from ctrserve.service.backends.providers import ProviderOptions

pytestmark = pytest.mark.slow


async def test_io_binding_scores_equal_the_plain_call_on_an_exported_model(run_factory, tmp_path: Path) -> None:
    run = run_factory("mgdin")
    result = export_run(run, "onnx", tmp_path, name="mgdin", grouped=True)
    m = result.manifest
    assert m.grouped is not None, m.grouped_reason
    test = load_split(Path((run / "prepared_dir.txt").read_text()), "test")
    sizes = [4, 1, 6, 2, 3]
    starts = np.cumsum([0, *sizes[:-1]])
    # one request per user, as the gateway assembles it: the user side [1, ...], its candidates [B, ...]
    requests = [{t.name: np.ascontiguousarray(test[t.name][s:s + 1] if t.side == "user" else test[t.name][s:s + b])
                 .astype(t.dtype) for t in m.inputs} for s, b in zip(starts, sizes, strict=True)]
    single: dict[str, list[np.ndarray]] = {}
    batched: dict[str, list[np.ndarray]] = {}
    for mode in ("off", "on"):
        options = ProviderOptions(io_binding=mode)
        alone = OnnxRuntimeBackend("mgdin", 1, result.version_dir / m.file, m.output.name, providers=options)
        await alone.start()
        assert alone.io_binding is (mode == "on") and alone.provider == "cpu"
        single[mode] = [await alone.infer(r, 10.0) for r in requests]
        await alone.close()
        grouped = OnnxRuntimeBackend("mgdin", 1, result.version_dir / m.grouped.file, m.output.name, threads=1,
                                     providers=options)
        backend = BatchingBackend(m, grouped, 1000, 0.0)
        await backend.start()
        batched[mode] = await asyncio.gather(*(backend.infer(r, 10.0) for r in requests))
        assert backend.stats.calls < len(requests)  # the requests shared calls
        await backend.close()
    for plain, bound in zip(single["off"] + batched["off"], single["on"] + batched["on"], strict=True):
        np.testing.assert_array_equal(bound, plain)
    # and the batched graph agrees with the single-request one, binding or not
    np.testing.assert_allclose(np.concatenate(batched["on"]), np.concatenate(single["on"]), atol=1e-5)
