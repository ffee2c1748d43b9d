"""Run directory -> exported model version in a Triton model repository.

``export_run`` loads the trained model (eval mode, weights_only), wraps it in the serving
module, exports ONNX (torch.export-based exporter) or TorchScript (trace), runs the parity gate
and only then moves the finished version directory into place with one ``rename``: a failed
export leaves no version directory behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from ctrserve.contract.feature_map import FeatureMap
from ctrserve.contract.manifest import (
    MANIFEST_FILE,
    MODEL_FILES,
    ExporterInfo,
    Format,
    Manifest,
    MaskInfo,
    ParityResult,
    StoreInfo,
    TensorSpec,
    list_versions,
)

from .grouped import export_grouped
from .parity import (
    DEFAULT_ROWS,
    DEFAULT_TOLERANCE,
    ParityError,
    check_parity,
    load_rows,
    onnx_runner,
    torchscript_runner,
)
from .serving_module import (
    OUTPUT_NAME,
    USER_SIDES,
    ServingModule,
    UserSide,
    as_tensors,
    build_serving_module,
    example_request,
    input_shape,
)
from .triton_repo import MODEL_PY, RepoOptions, write_config, write_model_py

#: upper bound of the dynamic candidate axis declared to torch.export
MAX_CANDIDATES = 1 << 16
ONNX_OPTIMIZATION = "onnxscript optimizer (constant folding, common-subexpression and dead-code elimination)"


class ExportError(RuntimeError):
    """Bad input or an export that cannot proceed; the message is meant for the user."""


@dataclass
class ExportResult:
    version_dir: Path
    manifest: Manifest
    config_path: Path


@contextlib.contextmanager
def quiet_exporters() -> Iterator[None]:
    """Silence the exporters' deprecation chatter and torchvision notices (not errors)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def _onnx_opset(path: Path) -> int | None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def export_onnx(wrapper: ServingModule, fmap: FeatureMap, path: Path, opset: int | None = None,
                allow_legacy: bool = True) -> ExporterInfo:
    """torch.export-based ONNX export with a dynamic candidate axis; the legacy exporter only as
    a recorded fallback when torch.export cannot capture the model (and ``allow_legacy``)."""
    example = as_tensors(wrapper, example_request(fmap, candidates=4))
    cands = torch.export.Dim("candidates", min=1, max=MAX_CANDIDATES)
    dynamic_shapes = tuple(None if n in wrapper.user_inputs else {0: cands} for n in wrapper.input_names)
    with quiet_exporters(), torch.no_grad():
        try:
            program = torch.onnx.export(
                wrapper, example, dynamo=True, dynamic_shapes=dynamic_shapes, input_names=wrapper.input_names,
                output_names=[OUTPUT_NAME], opset_version=opset, optimize=True, verbose=False,
            )
            program.save(str(path))
            return ExporterInfo(tool="torch.onnx.dynamo", torch_version=torch.__version__, opset=_onnx_opset(path),
                                optimization=ONNX_OPTIMIZATION)
        except Exception as exc:  # recorded in the manifest, never silent
            if not allow_legacy:
                raise
            reason = _one_line(exc)
        path.unlink(missing_ok=True)
        torch.onnx.export(
            wrapper, example, str(path), dynamo=False, input_names=wrapper.input_names, output_names=[OUTPUT_NAME],
            dynamic_axes={n: {0: "candidates"} for n in [*wrapper.candidate_inputs, OUTPUT_NAME]},
            opset_version=opset or 17, do_constant_folding=True,
        )
    return ExporterInfo(tool="torch.onnx.legacy", torch_version=torch.__version__, opset=_onnx_opset(path),
                        optimization="constant folding", fallback_reason=reason)


def export_torchscript(wrapper: ServingModule, fmap: FeatureMap, path: Path) -> ExporterInfo:
    """``torch.jit.trace`` of the wrapper (no data-dependent control flow in the models), frozen
    so parameters become constants; the forward arguments keep the feature names."""
    example = as_tensors(wrapper, example_request(fmap, candidates=4))
    with quiet_exporters(), torch.no_grad():
        # check_trace off: the parity gate below is the stronger check
        traced = torch.jit.trace(wrapper, example, check_trace=False)
        frozen = torch.jit.freeze(traced)
        torch.jit.save(frozen, str(path))
    return ExporterInfo(tool="torch.jit.trace", torch_version=torch.__version__,
                        optimization="torch.jit.freeze (parameters folded into constants)")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:500]


def _build_and_check(
    model: torch.nn.Module, fmap: FeatureMap, fmt: Format, file: Path, opset: int | None,
    rows: dict[str, np.ndarray], splits: list[str], tolerance: float,
) -> tuple[UserSide, str, ExporterInfo, ParityResult]:
    """Export the shared user-side form if the model supports it, else the expanded form.

    Support is decided by doing it: the shared form is exported and put through the full parity
    gate (the reference is the model on fully expanded rows, so a model that silently mishandles
    batch-1 user inputs fails there). Any failure of the shared form is recorded as the reason
    and the expanded form (today's graph) is exported instead; its gate failure is final."""
    reason = ""
    for user_side in USER_SIDES:
        wrapper = build_serving_module(model, fmap, user_side).eval()
        try:
            if user_side == "shared":
                # cheap eager probe first: a model that cannot broadcast usually fails right here
                with torch.no_grad():
                    probe = wrapper(*as_tensors(wrapper, example_request(fmap, candidates=3)))
                if tuple(probe.shape) != (3,):
                    raise ValueError(f"output shape {tuple(probe.shape)} for 3 candidates, expected (3,)")
            if fmt == "onnx":
                # no legacy fallback for the shared form: the expanded form is the safer fallback
                exporter = export_onnx(wrapper, fmap, file, opset, allow_legacy=user_side == "expanded")
                runner, runtime = onnx_runner(file), _ort_version()
            else:
                exporter = export_torchscript(wrapper, fmap, file)
                runner, runtime = torchscript_runner(file, wrapper.input_names), \
                    f"torchscript (torch {torch.__version__})"
        except Exception as exc:
            if user_side == "expanded":
                raise
            reason = f"shared user-side form failed to run or export: {_one_line(exc)}"
            file.unlink(missing_ok=True)
            continue
        parity = check_parity(model, fmap, runner, runtime, rows, splits, tolerance)
        if parity.passed:
            return user_side, reason, exporter, parity
        if user_side == "expanded":
            raise ParityError(parity)
        failed = [f"{c.name} ({c.max_abs_diff:.3g}{', ' + c.note if c.note else ''})" for c in parity.checks
                  if not c.passed]
        reason = f"shared user-side form failed the parity gate: {'; '.join(failed)}"[:500]
        file.unlink(missing_ok=True)
    raise AssertionError("unreachable: the expanded form either returns or raises")


def manifest_inputs(wrapper: ServingModule, fmap: FeatureMap) -> list[TensorSpec]:
    out = []
    for name in wrapper.input_names:
        side = "user" if name in wrapper.user_inputs else "candidate"
        out.append(TensorSpec(name=name, dtype=fmap.feature(name).dtype, shape=input_shape(fmap, name, side),
                              side=side))
    return out


def _check_compatible(existing: dict[int, Manifest], inputs: list[TensorSpec], fmt: Format, name: str) -> None:
    """Versions of one Triton model share one config.pbtxt: same inputs and same format."""
    for v, m in existing.items():
        if m.inputs != inputs:
            raise ExportError(f"model {name!r} version {v} has different inputs than this export "
                              f"({[t.name for t in m.inputs]} vs {[t.name for t in inputs]}); use another --name")
        if m.format != fmt:
            raise ExportError(f"model {name!r} version {v} is {m.format}, this export is {fmt}: versions of one "
                              "Triton model share a backend; use another --name")


def _load(run_dir: Path):
    from ctrserve.models.train.trainer import load_run

    run_dir = Path(run_dir)
    for f in ("config.yaml", "feature_map.json", "model.pt"):
        if not (run_dir / f).exists():
            raise ExportError(f"{run_dir} is not a run directory (no {f}); runs come from `ctrserve train`")
    try:
        return load_run(run_dir)
    except (KeyError, ValueError, RuntimeError) as exc:
        raise ExportError(f"cannot rebuild the model of {run_dir}: {exc}") from None


def export_run(
    run_dir: Path,
    fmt: Format,
    out_repo: Path,
    name: str | None = None,
    version: int | None = None,
    options: RepoOptions | None = None,
    parity_rows: int = DEFAULT_ROWS,
    tolerance: float = DEFAULT_TOLERANCE,
    opset: int | None = None,
    force: bool = False,
    grouped: bool = False,
) -> ExportResult:
    """Export one run as version ``version`` (default: next free) of model ``name`` (default: the
    registry name). Raises ``ParityError`` (nothing written) when the gate fails. ``grouped`` adds
    the multi-user graph (``export/grouped.py``) behind its own gate."""
    if fmt not in MODEL_FILES:
        raise ExportError(f"unknown format {fmt!r}; choose one of {sorted(MODEL_FILES)}")
    options = options or RepoOptions()
    run_dir = Path(run_dir)
    cfg, fmap, model = _load(run_dir)
    name = name or cfg.model
    if not name.replace("_", "").replace("-", "").isalnum():
        raise ExportError(f"model name {name!r} must be letters, digits, '_' or '-'")
    model_dir = Path(out_repo) / name
    existing = list_versions(model_dir)
    version = version if version is not None else max(existing, default=0) + 1
    if version < 1:
        raise ExportError(f"--version must be >= 1, got {version}")
    final = model_dir / str(version)
    if final.exists() and not force:
        raise ExportError(f"{final} already exists; pick another --version or pass --force to replace it")

    try:
        wrapper = build_serving_module(model, fmap).eval()
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    if any(m.training for m in wrapper.modules()):
        raise ExportError("model is not in eval mode")  # dropout / batch-norm statistics must be frozen
    inputs = manifest_inputs(wrapper, fmap)
    _check_compatible({v: m for v, m in existing.items() if v != version}, inputs, fmt, name)

    prepared = _prepared_dir(run_dir)
    rows, splits = load_rows(prepared, fmap, parity_rows)

    model_dir.mkdir(parents=True, exist_ok=True)
    # staged inside the model dir (same filesystem, so the final rename is atomic); Triton
    # ignores version directories whose names are not numbers
    stage = Path(tempfile.mkdtemp(prefix=f".staging-{version}-", dir=model_dir))
    try:
        file = stage / MODEL_FILES[fmt]
        user_side, user_side_reason, exporter, parity = _build_and_check(model, fmap, fmt, file, opset, rows,
                                                                         splits, tolerance)
        multi, multi_reason = (export_grouped(model, fmap, fmt, stage, opset, rows, tolerance, parity.runtime,
                                              inputs) if grouped else (None, ""))

        vocab = run_dir / "vocab.json"
        if vocab.exists():
            shutil.copyfile(vocab, stage / "vocab.json")
        manifest = Manifest(
            name=name, version=version, model=cfg.model, dataset=cfg.dataset_id, variant=cfg.variant, seed=cfg.seed,
            run_dir=str(run_dir.resolve()), format=fmt, file=file.name, inputs=inputs, feature_map=fmap,
            vocab_file="vocab.json" if vocab.exists() else None, metrics=_read_json(run_dir / "metrics.json"),
            mask=MaskInfo(mode=cfg.params.get("mask_mode"), calibration=_read_json(run_dir / "calibration.json")
                          or None),
            store=store_info(prepared),
            parity=parity, exporter=exporter, exported_at=datetime.now(UTC),
            user_side=user_side, user_side_reason=user_side_reason, grouped=multi, grouped_reason=multi_reason,
        )
        manifest.save(stage / MANIFEST_FILE)
        write_model_py(stage / MODEL_PY)
        os.chmod(stage, 0o755)
        if final.exists():  # --force
            shutil.rmtree(final)
        os.rename(stage, final)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    config = write_config(model_dir, options)
    return ExportResult(version_dir=final, manifest=manifest, config_path=config)


def _prepared_dir(run_dir: Path) -> Path:
    """The run's prepared data, which the parity gate reads its rows from."""
    marker = run_dir / "prepared_dir.txt"
    prepared = Path(marker.read_text().strip()) if marker.exists() else None
    if prepared is None or not (prepared / "test.npz").exists():
        raise ExportError(f"the prepared data of {run_dir} ({prepared}) is missing: the parity gate needs its test "
                          "split; re-run `ctrserve data prepare`")
    return prepared


def store_info(prepared: Path) -> StoreInfo:
    """The feature-store identity of a prepared dataset: ``ctrserve store load`` keys it by the
    directory's name and records the vocabulary's sha256 in the version meta."""
    def sha(name: str) -> str | None:
        f = prepared / name
        return hashlib.sha256(f.read_bytes()).hexdigest() if f.exists() else None

    return StoreInfo(namespace=prepared.name, vocab_sha256=sha("vocab.json"),
                     feature_map_sha256=sha("feature_map.json"), prepared_dir=str(prepared.resolve()))


def _ort_version() -> str:
    import onnxruntime

    return f"onnxruntime {onnxruntime.__version__} (CPU)"


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    return data if isinstance(data, dict) else {"value": data}


def numpy_request(manifest: Manifest, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Flat rows of one user -> a wire request (user inputs from the first row)."""
    return {t.name: np.ascontiguousarray(rows[t.name][:1] if t.side == "user" else rows[t.name])
            for t in manifest.inputs}
