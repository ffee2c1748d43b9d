"""Triton model repository: ``<repo>/<name>/config.pbtxt`` + ``<repo>/<name>/<version>/``.

Two config flavours, generated from the manifests of the exported versions:

* ``local``  - the ``tritonserver`` binary of the PyPI package nvidia-pytriton, which ships only the
  Python backend: ``backend: "python"`` and the generated ``model.py`` (triton_python_model.py)
  runs the ONNX file with ONNX Runtime (or a TorchScript file with torch).
* ``deploy`` - the NVIDIA Triton container: ``onnxruntime`` backend for ONNX, ``pytorch`` backend
  for TorchScript, ``KIND_GPU`` instances when asked, dynamic batching, warm-up samples.

Models exported with the multi-user graph (``--grouped``) get a batched config: each request is
one user (user-side inputs ``[1, ...]``, candidate-side inputs ``[1, B, ...]``), ``max_batch_size``
is the number of requests Triton's dynamic batcher may merge into one execution, and the
candidate-side inputs are ``allow_ragged_batch`` (B differs between requests). One config serves
every exported version, so every version must have the graph (else no batching, and the header
names the version that lacks it).

* local: the Python backend hands ``model.py`` the merged requests, which runs them as one call of
  the multi-user graph and splits the scores back (triton_python_model.py).
* deploy: the onnxruntime backend concatenates the ragged inputs itself; the model file is the ragged
  graph (``model.triton.onnx``, export/triton_batch.py) fed the batch input ``candidate_offsets``
  (``BATCH_ACCUMULATED_ELEMENT_COUNT``), and ``batch_output`` ``BATCH_SCATTER_WITH_INPUT_SHAPE``
  hands each request its own candidates' scores back.

Every other model keeps ``max_batch_size: 0``: a request is already the batch (one user, B
candidates) and Triton must not add or concatenate along a batch axis of its own (user tensors
batch 1 and candidate tensors batch B cannot be merged without the multi-user graph). The config's
header comment says which case applies and why.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ctrserve.contract.manifest import Manifest, list_versions

if TYPE_CHECKING:  # tritonclient is imported where a config is built
    from tritonclient.grpc.model_config_pb2 import ModelConfig

MODEL_PY = "model.py"
CONFIG_FILE = "config.pbtxt"
TEMPLATE = Path(__file__).with_name("triton_python_model.py")

Flavour = Literal["local", "deploy"]
_DTYPES = {"int64": "TYPE_INT64", "float32": "TYPE_FP32"}
_BACKENDS = {"onnx": "onnxruntime", "torchscript": "pytorch"}


class RepoOptions(BaseModel):
    """How config.pbtxt is generated (``ctrserve export`` options)."""

    model_config = ConfigDict(extra="forbid")
    flavour: Flavour = "local"
    #: ``latest:N``, ``all`` or ``specific:1,2``
    version_policy: str = "latest:1"
    #: deploy flavour: KIND_GPU instances instead of KIND_CPU
    gpu: bool = False
    instances: int = Field(1, ge=1)
    #: threads per instance for ONNX Runtime / torch (local) or the onnxruntime backend (deploy);
    #: 1 instance x 1 thread leaves the second of 2 cores to the gateway and clients
    threads: int = Field(1, ge=1)
    #: requests Triton's dynamic batcher may merge into one execution (``max_batch_size``), for
    #: models exported with the multi-user graph; 0 keeps one request per execution for every model
    max_batch_requests: int = Field(16, ge=0)
    #: dynamic batcher: how long the first queued request waits for others to merge with. 0 merges
    #: only requests queued behind a running execution, which the local Python backend rarely has
    #: (measured: 6 concurrent users x 3 rounds, 18 executions at 0 µs, 5 at 100 µs)
    max_queue_delay_us: int = Field(100, ge=0)
    #: deploy: warm-up with one user and this many candidates (0: no warm-up)
    warmup_candidates: int = Field(100, ge=0)

    @field_validator("version_policy")
    @classmethod
    def _policy(cls, v: str) -> str:
        parse_version_policy(v)
        return v


def parse_version_policy(text: str) -> dict:
    """``latest:2`` -> ``{"latest": {"num_versions": 2}}`` (ModelVersionPolicy as a dict)."""
    kind, _, arg = text.strip().partition(":")
    try:
        if kind == "all" and not arg:
            return {"all": {}}
        if kind == "latest":
            n = int(arg or 1)
            if n >= 1:
                return {"latest": {"num_versions": n}}
        if kind == "specific":
            versions = [int(x) for x in arg.split(",") if x.strip()]
            if versions and min(versions) >= 1:
                return {"specific": {"versions": versions}}
    except ValueError:
        pass
    raise ValueError(f"bad version policy {text!r}: use 'latest:N', 'all' or 'specific:1,2'")


def batching(manifest: Manifest, options: RepoOptions, others: Sequence[Manifest] = ()) -> tuple[bool, str]:
    """Whether the config lets Triton merge requests, and why (or why not) in one line. ``others``:
    the model's other exported versions, which the one config serves too (every one needs the graph)."""
    if options.max_batch_requests == 0:
        return False, "one request per execution (--max-batch-requests 0)"
    for m in sorted([manifest, *others], key=lambda m: -m.version):
        if m.grouped is None:
            return False, (f"one request per execution: version {m.version} was exported without the multi-user "
                           "graph (ctrserve export --grouped)")
        if options.flavour == "deploy" and m.grouped.ragged is None:
            return False, (f"one request per execution: version {m.version} has no ragged graph "
                           f"({m.grouped.ragged_reason})")
    how = ("model.py runs merged requests as one multi-user call" if options.flavour == "local" else
           f"{manifest.grouped.ragged.file} takes the ragged batch")
    return True, f"dynamic batching of up to {options.max_batch_requests} users per execution: {how}"


def _dims(manifest: Manifest, batched: bool) -> dict[str, tuple[list[int], bool]]:
    """Config dims and ragged flag per input: batched configs leave out the request's batch axis
    (users: their batch 1; candidates: the leading 1 of ``[1, B, ...]``). A user input of shape
    ``[1]`` keeps dims ``[1]`` (Triton wants at least one) and gets ``reshape: []`` (see build_config)."""
    if not batched:
        return {t.name: (t.shape, False) for t in manifest.inputs}
    return {t.name: (t.shape[1:] or [1] if t.side == "user" else t.shape, t.side == "candidate")
            for t in manifest.inputs}


def _warmup(cfg, manifest: Manifest, options: RepoOptions, dims: dict[str, tuple[list[int], bool]]) -> None:
    from tritonclient.grpc import model_config_pb2 as mc

    warm = cfg.model_warmup.add(name=f"one_user_{options.warmup_candidates}_candidates", batch_size=1)
    for t in manifest.inputs:
        shape = [options.warmup_candidates if d == -1 else d for d in dims[t.name][0]]
        # zeros are PAD ids and neutral dense values: valid for every embedding table
        warm.inputs[t.name].CopyFrom(mc.ModelWarmup.Input(
            data_type=mc.DataType.Value(_DTYPES[t.dtype]), dims=shape, zero_data=True))


def build_config(manifest: Manifest, options: RepoOptions, others: Sequence[Manifest] = ()) -> ModelConfig:
    """The ``ModelConfig`` protobuf for one model (tritonclient's model_config_pb2) from its newest
    version's manifest (``others``: the other versions, see ``batching``)."""
    from google.protobuf import json_format
    from tritonclient.grpc import model_config_pb2 as mc

    batched, _ = batching(manifest, options, others)
    cfg = mc.ModelConfig(name=manifest.name, max_batch_size=options.max_batch_requests if batched else 0)
    json_format.ParseDict(parse_version_policy(options.version_policy), cfg.version_policy)
    dims = _dims(manifest, batched)
    for t in manifest.inputs:
        i = cfg.input.add(name=t.name, data_type=mc.DataType.Value(_DTYPES[t.dtype]), dims=dims[t.name][0],
                          allow_ragged_batch=dims[t.name][1])
        if batched and t.shape == [1]:  # requests send [1, 1]; the model sees [R] like the multi-user graph
            i.reshape.SetInParent()
    out = manifest.output
    cfg.output.add(name=out.name, data_type=mc.DataType.Value(_DTYPES[out.dtype]), dims=out.shape)
    kind = mc.ModelInstanceGroup.KIND_CPU
    if batched or options.flavour == "deploy":
        cfg.dynamic_batching.max_queue_delay_microseconds = options.max_queue_delay_us
    if options.flavour == "local":
        cfg.backend = "python"
        cfg.parameters["ORT_INTRA_OP_THREADS"].string_value = str(options.threads)
    else:
        cfg.backend = _BACKENDS[manifest.format]
        if options.gpu:
            kind = mc.ModelInstanceGroup.KIND_GPU
        if manifest.format == "onnx":
            cfg.parameters["intra_op_thread_count"].string_value = str(options.threads)
            cfg.parameters["inter_op_thread_count"].string_value = "1"
        else:
            cfg.parameters["INFERENCE_MODE"].string_value = "true"
            cfg.parameters["INTRA_OP_THREAD_COUNT"].string_value = str(options.threads)
        if batched:
            ragged = manifest.grouped.ragged
            cfg.default_model_filename = ragged.file
            cfg.batch_input.add(kind=mc.BatchInput.BATCH_ACCUMULATED_ELEMENT_COUNT, target_name=[ragged.offsets_input],
                                data_type=mc.TYPE_INT32, source_input=[ragged.offsets_source])
            cfg.batch_output.add(target_name=[out.name], kind=mc.BatchOutput.BATCH_SCATTER_WITH_INPUT_SHAPE,
                                 source_input=[ragged.offsets_source])
        if options.warmup_candidates:
            _warmup(cfg, manifest, options, dims)
    cfg.instance_group.add(count=options.instances, kind=kind)
    return cfg


def render_config(manifest: Manifest, options: RepoOptions, others: Sequence[Manifest] = ()) -> str:
    from google.protobuf import text_format

    header = (f"# generated by `ctrserve export` ({options.flavour} flavour) from {manifest.name} version "
              f"{manifest.version}'s manifest.json; regenerate rather than edit\n"
              f"# {batching(manifest, options, others)[1]}\n")
    return header + text_format.MessageToString(build_config(manifest, options, others))


def write_config(model_dir: Path, options: RepoOptions) -> Path:
    """(Re)write ``config.pbtxt`` from the newest version's manifest, atomically."""
    versions = list_versions(model_dir)
    if not versions:
        raise FileNotFoundError(f"no exported versions in {model_dir}")
    newest = max(versions)
    text = render_config(versions[newest], options, [m for v, m in versions.items() if v != newest])
    path = Path(model_dir) / CONFIG_FILE
    tmp = path.with_suffix(".pbtxt.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_model_py(path: Path) -> None:
    shutil.copyfile(TEMPLATE, path)


def read_config(path: Path) -> ModelConfig:
    """Parse a config.pbtxt into a ModelConfig protobuf (raises on a syntax error)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    return text_format.Parse(Path(path).read_text(), mc.ModelConfig())
