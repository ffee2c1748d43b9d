"""The export manifest: everything the online path needs to know about one exported model
version, written as ``manifest.json`` beside the model file.

No torch here: the gateway (``service/``) loads manifests to learn input names, dtypes, shapes
and sides, and the feature map. Schema documented in docs/export.md.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .feature_map import FeatureMap

MANIFEST_FILE = "manifest.json"
SCHEMA_VERSION = 2  # 2: adds `store` (feature-store namespace and data identity)

Format = Literal["onnx", "torchscript"]
MODEL_FILES: dict[str, str] = {"onnx": "model.onnx", "torchscript": "model.pt"}


class TensorSpec(BaseModel):
    """One model input as sent on the wire."""

    model_config = ConfigDict(extra="forbid")
    name: str
    dtype: Literal["int64", "float32"]
    #: -1 marks the dynamic candidate axis; user-side tensors have batch 1
    shape: list[int]
    #: ``user``: sent once per request (batch 1), broadcast in the graph; ``candidate``: batch B
    side: Literal["user", "candidate"]


class OutputSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "prob"
    dtype: Literal["float32"] = "float32"
    #: click probabilities (sigmoid applied in the graph), one per candidate
    shape: list[int] = [-1]


class ExporterInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    #: ``torch.onnx.dynamo`` (torch.export-based), ``torch.onnx.legacy`` (TorchScript-based ONNX
    #: exporter, used only as a recorded fallback) or ``torch.jit.trace``
    tool: Literal["torch.onnx.dynamo", "torch.onnx.legacy", "torch.jit.trace"]
    torch_version: str
    opset: int | None = None
    #: graph optimisation applied at export (constant folding, dead-code elimination)
    optimization: str = "none"
    #: why the preferred exporter was not used (empty when it was)
    fallback_reason: str = ""


class ParityCheck(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    rows: int
    requests: int
    max_abs_diff: float
    passed: bool
    note: str = ""


class ParityResult(BaseModel):
    """Exported runtime vs PyTorch eval on held-out rows (probabilities)."""

    model_config = ConfigDict(extra="forbid")
    runtime: str
    reference: str = "pytorch eager, eval mode, full-row batches"
    tolerance: float
    passed: bool
    max_abs_diff: float
    #: splits the rows came from (test first; valid/train only to top up a tiny test split)
    splits: list[str]
    checks: list[ParityCheck]

    def report(self) -> str:
        lines = [f"parity {'PASSED' if self.passed else 'FAILED'}: {self.runtime} vs {self.reference}, "
                 f"tolerance {self.tolerance:g}, max abs diff {self.max_abs_diff:.3g}"]
        for c in self.checks:
            flag = "ok  " if c.passed else "FAIL"
            lines.append(f"  {flag} {c.name}: {c.rows} rows in {c.requests} requests, max abs diff "
                         f"{c.max_abs_diff:.3g}{' - ' + c.note if c.note else ''}")
        return "\n".join(lines)


class MaskInfo(BaseModel):
    """Static attention masks baked into the graph (MGDIN); empty for other models."""

    model_config = ConfigDict(extra="forbid")
    mode: str | None = None
    calibration: dict[str, Any] | None = None


class StoreInfo(BaseModel):
    """Which feature-store data this model reads: the prepared dataset its run was trained on.

    ``ctrserve store load --dataset NAME`` keys the data by the prepared directory's name, and two
    preparations of one dataset have different vocabularies, so the gateway must read exactly
    this namespace; the hashes let it check that the loaded data came from the same preparation.
    """

    model_config = ConfigDict(extra="forbid")
    #: the prepared directory's name: ``ctrserve store load``'s default namespace
    namespace: str
    #: sha256 of the prepared ``vocab.json`` (bytes); the store's meta records the same hash
    vocab_sha256: str | None = None
    #: sha256 of the prepared ``feature_map.json`` (bytes)
    feature_map_sha256: str | None = None
    #: where the prepared data was at export time (information only; never read when serving)
    prepared_dir: str | None = None


class RaggedSignature(BaseModel):
    """The multi-user graph in the layout of a dynamically batched Triton execution
    (``export/triton_batch.py``): user-side inputs ``[R, ...]``, candidate-side inputs flat 1-D,
    ``offsets_input`` INT32 ``[R]`` (Triton's accumulated element count of ``offsets_source``)."""

    model_config = ConfigDict(extra="forbid")
    file: str
    offsets_input: str
    offsets_source: str
    parity: ParityResult


class GroupedSignature(BaseModel):
    """The multi-user graph beside the single-user one (``export/grouped.py``): user-side inputs
    ``[R, ...]``, candidate-side inputs ``[B, ...]`` and ``index_input`` ``[B]`` (each candidate's
    user row), for running several requests in one call."""

    model_config = ConfigDict(extra="forbid")
    file: str
    index_input: str
    parity: ParityResult
    #: the ragged form for Triton's onnxruntime backend (deploy flavour batching); None: see ragged_reason
    ragged: RaggedSignature | None = None
    ragged_reason: str = ""


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    schema_version: int = SCHEMA_VERSION
    name: str
    version: int = Field(ge=1)
    #: registry name of the architecture (``ctrserve models``)
    model: str
    dataset: str
    variant: str = "default"
    seed: int | None = None
    run_dir: str
    format: Format
    #: model file name inside the version directory
    file: str
    #: wire inputs, user side first, in the order of the exported graph's inputs
    inputs: list[TensorSpec]
    output: OutputSpec = OutputSpec()
    feature_map: FeatureMap
    #: vocabulary file beside the manifest (raw value -> id), None if the run had none
    vocab_file: str | None = None
    #: the run's test metrics (metrics.json)
    metrics: dict[str, Any] = {}
    mask: MaskInfo = MaskInfo()
    #: feature-store namespace and data identity; None in manifests written before it existed
    store: StoreInfo | None = None
    parity: ParityResult
    exporter: ExporterInfo
    exported_at: datetime
    #: how the graph uses the batch-1 user inputs (the wire contract is the same either way):
    #: ``shared``, the model embeds and pools them once per request and broadcasts the result;
    #: ``expanded``, they are expanded to the candidate batch first (user-side work per
    #: candidate). Manifests written before this field existed were all ``expanded``.
    user_side: Literal["shared", "expanded"] = "expanded"
    #: why ``expanded`` shipped (the shared form failed to export or failed parity); empty if shared
    user_side_reason: str = ""
    #: the multi-user graph, when exported (``ctrserve export --grouped``) and through its gate
    grouped: GroupedSignature | None = None
    #: why it is absent although asked for (export or parity failure); empty otherwise
    grouped_reason: str = ""

    @property
    def user_inputs(self) -> list[TensorSpec]:
        return [t for t in self.inputs if t.side == "user"]

    @property
    def candidate_inputs(self) -> list[TensorSpec]:
        return [t for t in self.inputs if t.side == "candidate"]

    def save(self, path: Path) -> None:
        Path(path).write_text(self.model_dump_json(indent=2))

    @classmethod
    def load(cls, path: Path) -> Manifest:
        """Load ``manifest.json`` (or the one inside a version directory)."""
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST_FILE
        if not path.exists():
            raise FileNotFoundError(f"no export manifest at {path}")
        return cls.model_validate(json.loads(path.read_text()))


def list_versions(model_dir: Path) -> dict[int, Manifest]:
    """Exported versions of one model in a Triton model directory, by version number."""
    out: dict[int, Manifest] = {}
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return out
    for d in model_dir.iterdir():
        if d.is_dir() and d.name.isdigit() and (d / MANIFEST_FILE).exists():
            out[int(d.name)] = Manifest.load(d / MANIFEST_FILE)
    return dict(sorted(out.items()))
