"""Every registered model exports to ONNX and TorchScript and passes the parity gate; a
mismatch fails the export and leaves no version behind."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest

from ctrserve.contract.manifest import Manifest, list_versions
from ctrserve.export.exporter import ExportError, export_run
from ctrserve.export.parity import ParityError
from ctrserve.export.triton_repo import read_config
from ctrserve.models.registry import list_models

pytestmark = pytest.mark.slow  # each ONNX export runs torch.export: seconds, not milliseconds
#: models that embed and pool batch-1 user inputs once per request (tests/models/test_broadcast.py)
SHARED_USER_SIDE = {"lr", "fm", "dnn", "wide_deep", "deepfm", "dcnv2", "autoint", "mgdin", "cdnet"}


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("model_name", list_models())
def test_model_exports_and_passes_parity(model_name: str, fmt: str, run_factory, tmp_path: Path) -> None:
    run = run_factory(model_name)  # skips (with the reason) models without tiny params
    result = export_run(run, fmt, tmp_path, name=model_name)
    m = result.manifest
    assert result.version_dir == tmp_path / model_name / "1"
    assert (result.version_dir / m.file).exists()
    assert (result.version_dir / "model.py").exists() and (result.version_dir / "vocab.json").exists()
    assert m.parity.passed and m.parity.max_abs_diff <= 1e-4
    checks = {c.name: c for c in m.parity.checks}
    assert checks["held_out_rows"].rows >= 1000
    assert checks["batch_of_1"].rows == 1 and checks["empty_sequence"].rows > 0
    assert m.parity.splits[0] == "test"
    # models built from the broadcast-aware shared layers must ship the shared user-side form;
    # any other model may fall back to the expanded form, with the reason recorded
    if model_name in SHARED_USER_SIDE:
        assert m.user_side == "shared", m.user_side_reason
    assert (m.user_side == "shared") == (m.user_side_reason == "")
    # the manifest on disk is what the gateway reads
    again = Manifest.load(result.version_dir)
    assert again == m
    assert [t.side for t in m.inputs] == sorted((t.side for t in m.inputs), key=["user", "candidate"].index)
    seq = {f.name for f in m.feature_map.sequence_fields}
    for t in m.inputs:
        assert t.shape[0] == (1 if t.side == "user" else -1)
        assert (t.side == "user") == (t.name in seq or m.feature_map.feature(t.name).side == "user")
    if fmt == "onnx":
        assert m.exporter.tool == "torch.onnx.dynamo" and m.exporter.opset and not m.exporter.fallback_reason
        import onnx

        graph = onnx.load(str(result.version_dir / m.file)).graph
        ops = collections.Counter(n.op_type for n in graph.node)
        assert "Dropout" not in ops, "training-only op in the serving graph"
        assert [i.name for i in graph.input] == [t.name for t in m.inputs]
        dims = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in graph.input}
        for t in m.inputs:
            assert (dims[t.name][0] == 1) == (t.side == "user")


def test_every_registered_model_has_tiny_params(tiny_params: dict) -> None:
    """The export tests cover every registered model: a new one needs a TINY_PARAMS line."""
    missing = sorted(set(list_models()) - set(tiny_params))
    assert not missing, f"registered models without TINY_PARAMS in tests/conftest.py: {missing}"


def test_parity_failure_fails_the_export(run_factory, tmp_path: Path, monkeypatch) -> None:
    from ctrserve.export import exporter

    real = exporter.onnx_runner

    def perturbed(path, threads=1):
        run = real(path, threads)
        return lambda req: run(req) + np.float32(1e-3)

    monkeypatch.setattr(exporter, "onnx_runner", perturbed)
    with pytest.raises(ParityError) as err:
        export_run(run_factory("dnn"), "onnx", tmp_path, name="dnn")
    result = err.value.result
    assert not result.passed and result.max_abs_diff == pytest.approx(1e-3, rel=1e-2)
    assert "FAIL" in str(err.value) and "held_out_rows" in str(err.value)
    model_dir = tmp_path / "dnn"
    assert list_versions(model_dir) == {}
    assert list(model_dir.iterdir()) == [], "nothing may be left behind, not even a staging dir"


def test_empty_output_fails_parity(run_factory, tmp_path: Path, monkeypatch) -> None:
    """What the numpy-2 Python backend did: an empty output tensor, no error."""
    from ctrserve.export import exporter

    monkeypatch.setattr(exporter, "onnx_runner", lambda path, threads=1: lambda req: np.zeros(0, np.float32))
    with pytest.raises(ParityError, match="returned shape"):
        export_run(run_factory("lr"), "onnx", tmp_path, name="lr")


def test_versions_side_by_side_and_bad_requests(run_factory, tmp_path: Path) -> None:
    run = run_factory("lr")
    export_run(run, "onnx", tmp_path, name="m")
    export_run(run_factory("lr", seed=1), "onnx", tmp_path, name="m")
    assert sorted(list_versions(tmp_path / "m")) == [1, 2]
    with pytest.raises(ExportError, match="already exists"):
        export_run(run, "onnx", tmp_path, name="m", version=2)
    with pytest.raises(ExportError, match="versions of one Triton model share a backend"):
        export_run(run, "torchscript", tmp_path, name="m")
    _fake_version_with_other_inputs(tmp_path / "m", 7)
    with pytest.raises(ExportError, match="different inputs"):
        export_run(run, "onnx", tmp_path, name="m")
    with pytest.raises(ExportError, match="not a run directory"):
        export_run(tmp_path / "nope", "onnx", tmp_path)


def _fake_version_with_other_inputs(model_dir: Path, version: int) -> None:
    m = Manifest.load(model_dir / "1")
    (model_dir / str(version)).mkdir()
    m.model_copy(update={"inputs": m.inputs[:-1], "version": version}).save(model_dir / str(version) / "manifest.json")


def test_static_mask_mgdin_exports_with_its_calibration(make_run_dir, tiny_params: dict, tmp_path: Path) -> None:
    """MGDIN with calibrated static masks (state-dict buffers): exported as loaded, the
    calibration and mask mode recorded in the manifest."""
    run = make_run_dir(tmp_path / "run", "mgdin", {**tiny_params["mgdin"], "mask_mode": "static"})
    m = export_run(run, "onnx", tmp_path / "repo", name="mgdin_static").manifest
    assert m.parity.passed
    assert m.mask.mode == "static"
    assert m.mask.calibration and m.mask.calibration["windows"][0]["masks"]


def test_cli_exit_codes(run_factory, tmp_path: Path, monkeypatch) -> None:
    """0 exported, 1 parity gate failed (nothing written), 2 bad input; messages, not tracebacks."""
    from typer.testing import CliRunner

    from ctrserve.cli import app
    from ctrserve.export import exporter

    cli = CliRunner()
    repo = tmp_path / "repo"

    def invoke(*args: str) -> tuple[int, str]:
        r = cli.invoke(app, ["export", *args, "--out", str(repo)])
        return r.exit_code, " ".join(r.output.split())

    code, out = invoke("--run", str(tmp_path / "nope"))
    assert code == 2 and "not a run directory" in out and "Traceback" not in out
    code, out = invoke("--run", str(run_factory("lr")), "--version-policy", "newest")
    assert code == 2 and "bad version policy" in out

    real = exporter.onnx_runner

    def off_by_one(path, threads=1):
        run = real(path, threads)
        return lambda req: run(req) + 1

    monkeypatch.setattr(exporter, "onnx_runner", off_by_one)
    code, out = invoke("--run", str(run_factory("lr")))
    assert code == 1 and "parity gate" in out and "FAIL" in out
    assert list_versions(repo / "lr") == {}

    monkeypatch.setattr(exporter, "onnx_runner", real)
    code, out = invoke("--run", str(run_factory("lr")))
    assert code == 0 and "parity PASSED" in out and "lr version 1" in out
    assert sorted(list_versions(repo / "lr")) == [1]
    assert "exported without the multi-user graph" in out

    code, out = invoke("--run", str(run_factory("lr")), "--max-batch-requests", "-1")
    assert code == 2 and "greater than or equal to 0" in out and "Traceback" not in out
    code, out = invoke("--run", str(run_factory("lr")), "--name", "lrg", "--grouped", "--max-queue-delay-us", "500")
    assert code == 0 and "ragged graph for Triton model.triton.onnx" in out, out
    assert "dynamic batching of up to 16 users per execution" in out
    assert read_config(repo / "lrg" / "config.pbtxt").dynamic_batching.max_queue_delay_microseconds == 500


def test_manifest_records_the_store_namespace(run_factory, tiny_prepared: Path, tmp_path: Path) -> None:
    """The gateway reads the feature-store namespace from the manifest (a serving image has no run
    directories): the prepared directory's name, as `ctrserve store load` keys it, and the same
    vocabulary hash the bulk load writes into the store's meta."""
    import hashlib

    from ctrserve.feature_store.loader import read_prepared

    m = export_run(run_factory("lr"), "onnx", tmp_path, name="lr").manifest
    assert m.store is not None and m.store.namespace == tiny_prepared.name
    assert m.store.vocab_sha256 == read_prepared(tiny_prepared).vocab_sha256
    assert m.store.feature_map_sha256 == hashlib.sha256((tiny_prepared / "feature_map.json").read_bytes()).hexdigest()
    assert Manifest.load(tmp_path / "lr" / "1").store == m.store


@pytest.mark.parametrize(("model_name", "extra"), [("mgdin", {"mask_mode": "dynamic"}),
                                                   ("mgdin", {"mask_mode": "static"}), ("cdnet", {})])
def test_softmax_inputs_stay_within_the_floor(model_name: str, extra: dict, make_run_dir, tiny_params: dict,
                                              tmp_path: Path) -> None:
    """ONNX Runtime's CPU Softmax slows down on entries far below the row's max (their exp is a
    denormal). The served graphs floor their masked scores (models/layers/softmax.py): every
    Softmax input of the exported MGDIN (the history's target attention, unmasked layers) and CDNet
    (padded core slots) lies within SOFTMAX_FLOOR of its row's max, and every Exp input (MGDIN's
    masked pairs, layers/deferred.py ``_kept_softmax``) within [-SOFTMAX_FLOOR, 0], on real requests
    with padded (and empty) histories."""
    import onnx
    import onnxruntime as ort

    from ctrserve.contract.feature_map import PAD_ID
    from ctrserve.export.parity import _request, group_requests, load_rows
    from ctrserve.models.layers.softmax import SOFTMAX_FLOOR

    run = make_run_dir(tmp_path / "run", model_name, {**tiny_params[model_name], **extra})
    res = export_run(run, "onnx", tmp_path / "repo", name=model_name)
    model = onnx.load(str(res.version_dir / res.manifest.file))
    softmax_inputs = [n.input[0] for n in model.graph.node if n.op_type == "Softmax"]
    exp_inputs = [n.input[0] for n in model.graph.node if n.op_type == "Exp"]
    assert softmax_inputs
    if model_name == "mgdin":
        assert exp_inputs  # the masked layers
    model.graph.output.extend(onnx.ValueInfoProto(name=name) for name in softmax_inputs + exp_inputs)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    m = res.manifest
    user = [t.name for t in m.inputs if t.side == "user"]
    cand = [t.name for t in m.inputs if t.side == "candidate"]
    arrays, _ = load_rows(Path((run / "prepared_dir.txt").read_text()), m.feature_map, 400)
    seq = m.feature_map.sequence_fields[0].name
    lengths = []
    for rows in group_requests({n: arrays[n] for n in user}, user, 50)[:20]:
        req = _request(arrays, rows, user, cand)
        lengths.append(int((req[seq] != PAD_ID).sum()))
        for name, x in zip(softmax_inputs, sess.run(softmax_inputs, req), strict=True):
            below = x.max(axis=-1, keepdims=True) - x
            assert below.max() <= SOFTMAX_FLOOR + 1e-3, (name, float(below.max()))
        for name, x in zip(exp_inputs, sess.run(exp_inputs, req) if exp_inputs else [], strict=True):
            assert x.min() >= -SOFTMAX_FLOOR - 1e-3 and x.max() <= 0.0, (name, float(x.min()), float(x.max()))
    assert min(lengths) < m.feature_map.sequence_fields[0].max_len  # padding was present
