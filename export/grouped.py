"""The multi-user signature: several requests' candidates in one call (cross-request batching).

The single-user signature (``serving_module``) takes one user's tensors with batch 1 and broadcasts
them to the B candidates. Batching requests together needs a graph that takes R users at once:
user-side inputs ``[R, ...]``, candidate-side inputs ``[B, ...]`` (every request's candidates, one
after the other) and ``user_index [B]``, the row of each candidate's user. The graph gathers the
user tensors to the candidates (``index_select``) and runs the model on the training-shaped batch,
so every model supports it. Written beside the single-user graph as ``model.grouped.onnx`` and
checked by its own parity gate: R = 1 .. 16 users with mixed candidate counts against PyTorch on
the same rows.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ctrserve.contract.feature_map import FeatureMap
from ctrserve.contract.manifest import GroupedSignature, ParityCheck, ParityResult, TensorSpec

from .parity import Runner, onnx_runner
from .serving_module import OUTPUT_NAME, ServingModule, _check_names, _named_forward, example_request, split_inputs

USER_INDEX = "user_index"
GROUPED_FILE = "model.grouped.onnx"
#: user counts the parity gate checks
PARITY_USERS = (1, 2, 3, 5, 8, 16)


class GroupedServingModule(ServingModule):
    """``(user tensors [R, ...], candidate tensors [B, ...], user_index [B]) -> probs [B]``."""

    def __init__(self, model: torch.nn.Module, fmap: FeatureMap):
        super().__init__(model, fmap, "expanded")
        self.input_names = [*self.user_inputs, *self.candidate_inputs, USER_INDEX]

    def score(self, tensors: tuple[Tensor, ...]) -> Tensor:
        index = tensors[-1]
        batch = {name: t.index_select(0, index) for name, t in zip(self.user_inputs, tensors, strict=False)}
        for name, t in zip(self.candidate_inputs, tensors[self.num_user:-1], strict=True):
            batch[name] = t
        return torch.sigmoid(self.model(batch))


def build_gated(path: Path, build: Callable[[], ParityResult], export: str, graph: str,
                ) -> tuple[ParityResult | None, str]:
    """``build()`` writes ``path`` and gates it; on an error or a failed gate the file goes and the
    reason (for the manifest: never silent) comes back instead of the parity result."""
    try:
        parity = build()
    except Exception as exc:
        path.unlink(missing_ok=True)
        return None, f"{export} failed: {type(exc).__name__}: {str(exc).strip()[:300]}"
    if not parity.passed:
        path.unlink(missing_ok=True)
        return None, f"{graph} failed the parity gate: {parity.report()[:400]}"
    return parity, ""


def build_grouped_module(model: torch.nn.Module, fmap: FeatureMap) -> GroupedServingModule:
    user, cand = split_inputs(fmap)
    if USER_INDEX in user + cand:
        raise ValueError(f"a feature is named {USER_INDEX!r}, the multi-user signature's index input")
    _check_names(user + cand)
    forward = _named_forward([*user, *cand, USER_INDEX])
    cls = type(f"Grouped_{type(model).__name__}", (GroupedServingModule,), {"forward": forward})
    return cls(model, fmap).eval()


def grouped_request(rows: dict[str, np.ndarray], fmap: FeatureMap, sizes: list[int]
                    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Consecutive groups of ``sizes`` rows as one multi-user request (each group's user tensors
    from its first row), and the flat reference rows carrying those same user values."""
    user, _ = split_inputs(fmap)
    n = sum(sizes)
    starts = np.cumsum([0, *sizes[:-1]])
    index = np.repeat(np.arange(len(sizes)), sizes)
    request = {name: np.ascontiguousarray(rows[name][starts] if name in user else rows[name][:n])
               for name in rows}
    request[USER_INDEX] = index.astype(np.int64)
    flat = {name: (rows[name][starts][index] if name in user else rows[name][:n]) for name in rows}
    return request, flat


def export_grouped_onnx(module: GroupedServingModule, fmap: FeatureMap, path: Path, opset: int | None) -> None:
    """torch.export-based ONNX with dynamic user and candidate axes."""
    from .exporter import MAX_CANDIDATES, quiet_exporters

    user, _ = split_inputs(fmap)
    rows = {name: np.repeat(v, 6, axis=0) if name in user else v
            for name, v in example_request(fmap, candidates=6).items()}
    request, _ = grouped_request(rows, fmap, [2, 3, 1])
    example = tuple(torch.from_numpy(request[n]) for n in module.input_names)
    users = torch.export.Dim("users", min=1, max=MAX_CANDIDATES)
    cands = torch.export.Dim("candidates", min=1, max=MAX_CANDIDATES)
    shapes = tuple({0: users} if n in module.user_inputs else {0: cands} for n in module.input_names)
    with quiet_exporters(), torch.no_grad():
        program = torch.onnx.export(module, example, dynamo=True, dynamic_shapes=shapes,
                                    input_names=module.input_names, output_names=[OUTPUT_NAME],
                                    opset_version=opset, optimize=True, verbose=False)
        program.save(str(path))


def check_grouped_parity(model: torch.nn.Module, fmap: FeatureMap, runner: Runner, runtime: str,
                         rows: dict[str, np.ndarray], tolerance: float, seed: int = 0) -> ParityResult:
    """For each R in ``PARITY_USERS``: R groups of 1–12 candidates from the rows, scored in one call,
    against the trained model on the same rows (user values of each group's first row)."""
    rng = np.random.default_rng(seed)
    available = len(next(iter(rows.values())))
    checks = []
    for r in PARITY_USERS:
        sizes = [int(s) for s in rng.integers(1, 13, size=r)]
        while sum(sizes) > available:
            sizes[int(np.argmax(sizes))] -= 1
        sizes = [s for s in sizes if s > 0]
        request, flat = grouped_request(rows, fmap, sizes)
        with torch.no_grad():
            ref = torch.sigmoid(model({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in flat.items()}))
        got = runner(request)
        diff = float(np.max(np.abs(np.asarray(got, dtype=np.float64) - ref.numpy().astype(np.float64))))
        checks.append(ParityCheck(name=f"{len(sizes)} users", rows=int(sum(sizes)), requests=1, max_abs_diff=diff,
                                  passed=bool(diff <= tolerance), note=f"candidates per user {sizes}"))
    return ParityResult(runtime=runtime, tolerance=tolerance, passed=all(c.passed for c in checks),
                        max_abs_diff=max(c.max_abs_diff for c in checks), splits=["parity rows"], checks=checks,
                        reference="pytorch eager, eval mode, rows with their group's user values")


def export_grouped(model: torch.nn.Module, fmap: FeatureMap, fmt: str, out_dir: Path, opset: int | None,
                   rows: dict[str, np.ndarray], tolerance: float, runtime: str, inputs: list[TensorSpec]
                   ) -> tuple[GroupedSignature | None, str]:
    """Export and gate the multi-user graph into ``out_dir``; ``(None, reason)`` when it cannot be
    served (the single-user graph still is): the reason goes into the manifest. Its ragged form
    for Triton (export/triton_batch.py, over the wire ``inputs``) follows, with its own gate."""
    if fmt != "onnx":
        return None, f"the multi-user signature is exported for ONNX only, not {fmt}"
    path = out_dir / GROUPED_FILE

    def build() -> ParityResult:
        export_grouped_onnx(build_grouped_module(model, fmap), fmap, path, opset)
        return check_grouped_parity(model, fmap, onnx_runner(path), runtime, rows, tolerance)

    parity, reason = build_gated(path, build, "multi-user export", "multi-user signature")
    if parity is None:
        return None, reason
    from .triton_batch import export_ragged

    ragged, ragged_reason = export_ragged(model, fmap, out_dir, GROUPED_FILE, inputs, USER_INDEX, rows, tolerance,
                                          runtime)
    return GroupedSignature(file=GROUPED_FILE, index_input=USER_INDEX, parity=parity, ragged=ragged,
                            ragged_reason=ragged_reason), ""
