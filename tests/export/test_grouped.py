"""The multi-user signature (export/grouped.py): R users' candidates in one call give the scores the
single-user graph gives each user alone, through its own parity gate for R = 1..16."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ctrserve.contract.prepared import load_split
from ctrserve.export.exporter import export_run
from ctrserve.export.grouped import GROUPED_FILE, PARITY_USERS, USER_INDEX, grouped_request
from ctrserve.export.parity import onnx_runner
from ctrserve.export.triton_batch import OFFSETS_INPUT, as_ragged

pytestmark = pytest.mark.slow


@pytest.mark.quick
def test_grouped_request_gathers_each_groups_user_values() -> None:
    from ctrserve.contract.feature_map import FeatureInfo, FeatureMap

    fmap = FeatureMap(dataset="t", label="y", user_id="u", features=[
        FeatureInfo(name="u", kind="sparse", side="user", dtype="int64"),
        FeatureInfo(name="i", kind="sparse", side="item", dtype="int64")])
    rows = {"u": np.array([10, 11, 12, 13, 14]), "i": np.array([20, 21, 22, 23, 24])}
    request, flat = grouped_request(rows, fmap, [2, 3])
    assert request["u"].tolist() == [10, 12] and request["i"].tolist() == [20, 21, 22, 23, 24]
    assert request[USER_INDEX].tolist() == [0, 0, 1, 1, 1]
    assert flat["u"].tolist() == [10, 10, 12, 12, 12] and flat["i"].tolist() == rows["i"].tolist()


@pytest.mark.parametrize("model_name", ["mgdin", "cdnet"])
def test_grouped_graph_equals_the_single_user_graph_per_user(model_name: str, run_factory, tmp_path: Path) -> None:
    result = export_run(run_factory(model_name), "onnx", tmp_path, name=model_name, grouped=True)
    m = result.manifest
    assert m.grouped is not None, m.grouped_reason
    assert m.grouped.parity.passed and [c.name for c in m.grouped.parity.checks][-1] == f"{PARITY_USERS[-1]} users"
    single = onnx_runner(result.version_dir / m.file)
    multi = onnx_runner(result.version_dir / GROUPED_FILE)
    # four users of the test split, each with its own candidates, in one call
    prepared = Path((run_factory(model_name) / "prepared_dir.txt").read_text())
    test = load_split(prepared, "test")
    rows = {t.name: test[t.name][:13] for t in m.inputs}
    sizes = [4, 1, 6, 2]
    request, _ = grouped_request(rows, m.feature_map, sizes)
    together = multi(request)
    alone = []
    for g, start in enumerate(np.cumsum([0, *sizes[:-1]])):
        one = {t.name: (request[t.name][g:g + 1] if t.side == "user" else request[t.name][start:start + sizes[g]])
               for t in m.inputs}
        alone.append(single(one))
    np.testing.assert_allclose(together, np.concatenate(alone), atol=1e-5)
    _check_ragged_graph(result.version_dir, m, request, together)


def _check_ragged_graph(version_dir: Path, m, request: dict[str, np.ndarray], together: np.ndarray) -> None:
    """The ragged form (what Triton's onnxruntime backend feeds a merged batch) gives the
    multi-user graph's scores and has the input ranks that backend requires."""
    import onnxruntime as ort

    ragged = m.grouped.ragged
    assert ragged is not None, m.grouped.ragged_reason
    assert ragged.parity.passed and ragged.offsets_source in {t.name for t in m.candidate_inputs}
    feeds = as_ragged(request, m.inputs, USER_INDEX)
    assert feeds[OFFSETS_INPUT].tolist() == [4, 5, 11, 13]
    np.testing.assert_allclose(onnx_runner(version_dir / ragged.file)(feeds), together, atol=1e-6)
    shapes = {i.name: (len(i.shape), i.type) for i in ort.InferenceSession(str(version_dir / ragged.file)).get_inputs()}
    assert shapes[OFFSETS_INPUT] == (1, "tensor(int32)") and USER_INDEX not in shapes
    for t in m.inputs:  # ragged inputs must be [-1]; user inputs keep their rank with R rows
        assert shapes[t.name][0] == (1 if t.side == "candidate" else len(t.shape)), t.name


@pytest.mark.quick
def test_ragged_layout_needs_users_in_order() -> None:
    from ctrserve.contract.manifest import TensorSpec

    inputs = [TensorSpec(name="u", dtype="int64", shape=[1], side="user"),
              TensorSpec(name="h", dtype="int64", shape=[-1, 2], side="candidate")]
    request = {"u": np.array([7, 8]), "h": np.arange(10).reshape(5, 2), USER_INDEX: np.array([0, 0, 1, 1, 1])}
    feeds = as_ragged(request, inputs, USER_INDEX)
    assert feeds["h"].shape == (10,) and feeds[OFFSETS_INPUT].tolist() == [2, 5]
    with pytest.raises(ValueError, match="non-decreasing"):
        as_ragged({**request, USER_INDEX: np.array([1, 0, 0, 1, 1])}, inputs, USER_INDEX)


def test_without_the_flag_there_is_no_multi_user_graph(run_factory, tmp_path: Path) -> None:
    m = export_run(run_factory("dnn"), "onnx", tmp_path, name="dnn").manifest
    assert m.grouped is None and m.grouped_reason == ""
    assert not (tmp_path / "dnn" / "1" / GROUPED_FILE).exists()


def test_torchscript_records_why_it_has_no_multi_user_graph(run_factory, tmp_path: Path) -> None:
    m = export_run(run_factory("dnn"), "torchscript", tmp_path, name="dnn", grouped=True).manifest
    assert m.grouped is None and "ONNX only" in m.grouped_reason
