"""Manifest schema and the two config.pbtxt flavours (parsed with Triton's own protobuf)."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ctrserve.contract.feature_map import FeatureMap
from ctrserve.contract.manifest import (
    ExporterInfo,
    GroupedSignature,
    Manifest,
    ParityCheck,
    ParityResult,
    RaggedSignature,
    TensorSpec,
    list_versions,
)
from ctrserve.export.triton_repo import RepoOptions, parse_version_policy, read_config, render_config, write_config

pytestmark = pytest.mark.quick


def _manifest(fmap: FeatureMap, fmt: str = "onnx", version: int = 1) -> Manifest:
    user = [f for f in fmap.features if f.side == "user" or f.kind == "sequence"]
    cand = [f for f in fmap.features if f not in user]
    inputs = [TensorSpec(name=f.name, dtype=f.dtype, shape=[1, f.max_len] if f.kind == "sequence" else [1],
                         side="user") for f in user]
    inputs += [TensorSpec(name=f.name, dtype=f.dtype, shape=[-1], side="candidate") for f in cand]
    parity = ParityResult(runtime="onnxruntime", tolerance=1e-4, passed=True, max_abs_diff=1e-7, splits=["test"],
                          checks=[ParityCheck(name="held_out_rows", rows=1000, requests=10, max_abs_diff=1e-7,
                                              passed=True)])
    return Manifest(name="dnn", version=version, model="dnn", dataset=fmap.dataset, run_dir="/runs/x", format=fmt,
                    file="model.onnx" if fmt == "onnx" else "model.pt", inputs=inputs, feature_map=fmap,
                    parity=parity, exporter=ExporterInfo(tool="torch.onnx.dynamo", torch_version="2.13.0", opset=20),
                    exported_at=datetime.now(UTC))


def test_manifest_module_does_not_import_torch() -> None:
    code = "import sys, ctrserve.contract.manifest; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_manifest_round_trip(tiny_fmap: FeatureMap, tmp_path: Path) -> None:
    m = _manifest(tiny_fmap)
    (tmp_path / "1").mkdir()
    m.save(tmp_path / "1" / "manifest.json")
    again = Manifest.load(tmp_path / "1")
    assert again == m
    assert [t.name for t in again.user_inputs][:2] == ["user_id", "segment"]
    assert all(t.shape == [-1] for t in again.candidate_inputs)
    assert list_versions(tmp_path) == {1: m}
    with pytest.raises(FileNotFoundError, match="no export manifest"):
        Manifest.load(tmp_path / "2")


@pytest.mark.parametrize(("text", "expected"), [
    ("latest:2", {"latest": {"num_versions": 2}}),
    ("all", {"all": {}}),
    ("specific:1,3", {"specific": {"versions": [1, 3]}}),
])
def test_version_policy(text: str, expected: dict) -> None:
    assert parse_version_policy(text) == expected


@pytest.mark.parametrize("bad", ["latest:0", "specific:", "newest", "specific:a"])
def test_bad_version_policy_is_a_clear_error(bad: str) -> None:
    with pytest.raises(ValueError, match="bad version policy"):
        RepoOptions(version_policy=bad)


def _check_io(cfg, m: Manifest) -> None:
    from tritonclient.grpc import model_config_pb2 as mc

    types = {"int64": mc.TYPE_INT64, "float32": mc.TYPE_FP32}
    assert cfg.name == m.name and cfg.max_batch_size == 0
    assert [i.name for i in cfg.input] == [t.name for t in m.inputs]
    for i, t in zip(cfg.input, m.inputs, strict=True):
        assert list(i.dims) == t.shape and i.data_type == types[t.dtype]
    assert [(o.name, list(o.dims), o.data_type) for o in cfg.output] == [("prob", [-1], mc.TYPE_FP32)]


def test_local_flavour_config(tiny_fmap: FeatureMap, tmp_path: Path) -> None:
    from tritonclient.grpc import model_config_pb2 as mc

    m = _manifest(tiny_fmap)
    (tmp_path / "dnn" / "1").mkdir(parents=True)
    m.save(tmp_path / "dnn" / "1" / "manifest.json")
    cfg = read_config(write_config(tmp_path / "dnn", RepoOptions(version_policy="latest:2", threads=1)))
    _check_io(cfg, m)
    assert cfg.backend == "python"
    assert cfg.version_policy.latest.num_versions == 2
    assert [(g.count, g.kind) for g in cfg.instance_group] == [(1, mc.ModelInstanceGroup.KIND_CPU)]
    assert cfg.parameters["ORT_INTRA_OP_THREADS"].string_value == "1"
    assert not cfg.HasField("dynamic_batching") and not cfg.model_warmup


@pytest.mark.parametrize(("fmt", "backend"), [("onnx", "onnxruntime"), ("torchscript", "pytorch")])
@pytest.mark.parametrize("gpu", [False, True])
def test_deploy_flavour_config(tiny_fmap: FeatureMap, fmt: str, backend: str, gpu: bool) -> None:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    m = _manifest(tiny_fmap, fmt)
    text = render_config(m, RepoOptions(flavour="deploy", gpu=gpu, instances=2, version_policy="specific:1,2"))
    cfg = text_format.Parse(text, mc.ModelConfig())
    _check_io(cfg, m)
    assert cfg.backend == backend
    kind = mc.ModelInstanceGroup.KIND_GPU if gpu else mc.ModelInstanceGroup.KIND_CPU
    assert [(g.count, g.kind) for g in cfg.instance_group] == [(2, kind)]
    assert list(cfg.version_policy.specific.versions) == [1, 2]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 100
    (warm,) = cfg.model_warmup
    assert warm.batch_size == 1 and set(warm.inputs) == {t.name for t in m.inputs}
    for t in m.inputs:
        w = warm.inputs[t.name]
        assert w.zero_data and list(w.dims) == [100 if d == -1 else d for d in t.shape]


def _grouped(m: Manifest, ragged: bool = True) -> Manifest:
    """``m`` exported with the multi-user graph (and its ragged form unless ``ragged`` is False)."""
    sig = RaggedSignature(file="model.triton.onnx", offsets_input="candidate_offsets",
                          offsets_source=m.candidate_inputs[0].name, parity=m.parity) if ragged else None
    return m.model_copy(update={"grouped": GroupedSignature(
        file="model.grouped.onnx", index_input="user_index", parity=m.parity, ragged=sig,
        ragged_reason="" if ragged else "no candidate input has one element per candidate")})


def _check_batched_io(cfg, m: Manifest) -> None:
    """One user per request: user dims without their batch 1 (a [1] input keeps [1] and is reshaped
    to a scalar per user), candidate dims [-1, ...] and ragged."""
    assert cfg.max_batch_size == 16
    assert [i.name for i in cfg.input] == [t.name for t in m.inputs]
    for i, t in zip(cfg.input, m.inputs, strict=True):
        if t.side == "user":
            assert not i.allow_ragged_batch and list(i.dims) == (t.shape[1:] or [1]), t.name
            assert i.HasField("reshape") == (t.shape == [1]) and not list(i.reshape.shape)
        else:
            assert i.allow_ragged_batch and list(i.dims) == t.shape and not i.HasField("reshape")
    assert [(o.name, list(o.dims)) for o in cfg.output] == [("prob", [-1])]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 100


def test_local_flavour_batches_models_with_the_multi_user_graph(tiny_fmap: FeatureMap) -> None:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    m = _grouped(_manifest(tiny_fmap), ragged=False)  # the Python backend does not need the ragged graph
    text = render_config(m, RepoOptions())
    cfg = text_format.Parse(text, mc.ModelConfig())
    _check_batched_io(cfg, m)
    assert cfg.backend == "python" and not cfg.batch_input and not cfg.batch_output
    assert "# dynamic batching of up to 16 users per execution" in text


def test_deploy_flavour_batches_through_the_ragged_graph(tiny_fmap: FeatureMap) -> None:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    m = _grouped(_manifest(tiny_fmap))
    cfg = text_format.Parse(render_config(m, RepoOptions(flavour="deploy")), mc.ModelConfig())
    _check_batched_io(cfg, m)
    source = m.candidate_inputs[0].name
    assert cfg.backend == "onnxruntime" and cfg.default_model_filename == "model.triton.onnx"
    (bi,) = cfg.batch_input
    assert (bi.kind, list(bi.target_name), bi.data_type, list(bi.source_input)) == (
        mc.BatchInput.BATCH_ACCUMULATED_ELEMENT_COUNT, ["candidate_offsets"], mc.TYPE_INT32, [source])
    (bo,) = cfg.batch_output
    assert (bo.kind, list(bo.target_name), list(bo.source_input)) == (
        mc.BatchOutput.BATCH_SCATTER_WITH_INPUT_SHAPE, ["prob"], [source])
    (warm,) = cfg.model_warmup
    for i in cfg.input:  # warm-up dims leave out the batch axis, like the config's
        assert list(warm.inputs[i.name].dims) == [100 if d == -1 else d for d in i.dims]


@pytest.mark.parametrize(("manifest", "options", "reason"), [
    ("plain", RepoOptions(), "exported without the multi-user graph"),
    ("grouped", RepoOptions(max_batch_requests=0), "--max-batch-requests 0"),
    ("grouped", RepoOptions(flavour="deploy", max_batch_requests=0), "--max-batch-requests 0"),
    ("no_ragged", RepoOptions(flavour="deploy"), "no ragged graph (no candidate input has one element"),
])
def test_one_request_per_execution_otherwise(tiny_fmap: FeatureMap, manifest: str, options: RepoOptions,
                                             reason: str) -> None:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    m = _manifest(tiny_fmap)
    m = {"plain": m, "grouped": _grouped(m), "no_ragged": _grouped(m, ragged=False)}[manifest]
    text = render_config(m, options)
    cfg = text_format.Parse(text, mc.ModelConfig())
    _check_io(cfg, m)
    assert not any(i.allow_ragged_batch for i in cfg.input) and not cfg.batch_input and not cfg.batch_output
    assert reason in text.splitlines()[1]


def test_a_version_without_the_graph_keeps_the_config_unbatched(tiny_fmap: FeatureMap, tmp_path: Path) -> None:
    """One config serves every version: version 1 (plain) next to version 2 (grouped) is not batched."""
    for version, m in ((1, _manifest(tiny_fmap, version=1)), (2, _grouped(_manifest(tiny_fmap, version=2)))):
        (tmp_path / "dnn" / str(version)).mkdir(parents=True)
        m.save(tmp_path / "dnn" / str(version) / "manifest.json")
    path = write_config(tmp_path / "dnn", RepoOptions())
    assert read_config(path).max_batch_size == 0
    assert "version 1 was exported without the multi-user graph" in path.read_text().splitlines()[1]
    (tmp_path / "dnn" / "1" / "manifest.json").unlink()
    assert read_config(write_config(tmp_path / "dnn", RepoOptions())).max_batch_size == 16


def test_numpy_is_below_2() -> None:
    """The Python-backend stub is built against numpy 1.x; with numpy 2 it returns empty outputs."""
    import numpy

    assert int(numpy.__version__.split(".")[0]) < 2, f"numpy {numpy.__version__}: pin numpy<2"


def test_manifest_without_store_still_loads(tiny_fmap: FeatureMap, tmp_path: Path) -> None:
    """Manifests written before `store` existed (schema 1) load; `store` is then None and the
    gateway asks for CTRSERVE_STORE_NAMESPACE (tests/service)."""
    import json

    data = json.loads(_manifest(tiny_fmap).model_dump_json())
    del data["store"]
    data["schema_version"] = 1
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    assert Manifest.load(tmp_path).store is None


def test_config_only_runs_without_torch(tiny_fmap: FeatureMap, tmp_path: Path) -> None:
    """`ctrserve export --config-only` is what the serving image (no torch) runs to regenerate
    config.pbtxt: it must not import torch, which is blocked here."""
    m = _manifest(tiny_fmap)
    (tmp_path / "dnn" / "1").mkdir(parents=True)
    m.save(tmp_path / "dnn" / "1" / "manifest.json")
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # any `import torch` now raises ImportError\n"
        "try:\n    import torch\nexcept ImportError:\n    pass\nelse:\n    raise SystemExit('torch not blocked')\n"
        "from ctrserve.cli import app\n"
        f"sys.argv = ['ctrserve', 'export', '--config-only', '--out', {str(tmp_path)!r}, '--name', 'dnn', "
        "'--flavour', 'deploy', '--threads', '2']\n"
        "app()\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    cfg = read_config(tmp_path / "dnn" / "config.pbtxt")
    assert cfg.backend == "onnxruntime" and cfg.dynamic_batching.max_queue_delay_microseconds == 100
    _check_io(cfg, m)
