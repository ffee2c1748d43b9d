"""The parity gate: the exported artefact, run by its own runtime, against PyTorch eval.

Rows come from the held-out test split and are grouped into requests the way the gateway
sends them: rows whose user-side inputs are identical form one request (user tensors with
batch 1, candidate tensors with batch B). The reference is the trained model itself on the flat
rows (no wrapper), so a broadcasting mistake in the wrapper fails the gate too.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ctrserve.contract.feature_map import PAD_ID, FeatureMap
from ctrserve.contract.manifest import ParityCheck, ParityResult
from ctrserve.contract.prepared import load_split

from .serving_module import split_inputs

#: named numpy request -> probabilities [B]
Runner = Callable[[dict[str, np.ndarray]], np.ndarray]

DEFAULT_TOLERANCE = 1e-4
DEFAULT_ROWS = 1000
MAX_CANDIDATES = 1000


class ParityError(RuntimeError):
    def __init__(self, result: ParityResult):
        super().__init__(result.report())
        self.result = result


def onnx_runner(path: Path, threads: int = 1) -> Runner:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]

    def run(request: dict[str, np.ndarray]) -> np.ndarray:
        return sess.run(None, {n: request[n] for n in names})[0]

    return run


def torchscript_runner(path: Path, input_names: list[str]) -> Runner:
    module = torch.jit.load(str(path), map_location="cpu").eval()

    @torch.no_grad()
    def run(request: dict[str, np.ndarray]) -> np.ndarray:
        return module(*(torch.from_numpy(np.ascontiguousarray(request[n])) for n in input_names)).numpy()

    return run


def load_rows(prepared_dir: Path, fmap: FeatureMap, n_rows: int) -> tuple[dict[str, np.ndarray], list[str]]:
    """``n_rows`` rows: the test split first, topped up from valid then train if it is smaller."""
    parts: list[dict[str, np.ndarray]] = []
    used: list[str] = []
    have = 0
    for split in ("test", "valid", "train"):
        if have >= n_rows:
            break
        arrays = load_split(prepared_dir, split)
        take = min(n_rows - have, len(arrays[fmap.label]))
        if take:
            parts.append({f.name: arrays[f.name][:take] for f in fmap.features})
            used.append(split)
            have += take
    if not have:
        raise ValueError(f"no rows in {prepared_dir} to check parity on")
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, used


def group_requests(arrays: dict[str, np.ndarray], user_inputs: list[str], max_candidates: int) -> list[np.ndarray]:
    """Row indices per request: rows with identical user-side inputs, in first-seen order,
    split into chunks of at most ``max_candidates``."""
    n = len(next(iter(arrays.values())))
    cols = []
    for name in user_inputs:
        a = arrays[name].reshape(n, -1)
        cols.append(a.view(np.int32).astype(np.int64) if a.dtype == np.float32 else a.astype(np.int64))
    key = np.concatenate(cols, axis=1) if cols else np.zeros((n, 1), dtype=np.int64)
    _, first, inverse = np.unique(key, axis=0, return_index=True, return_inverse=True)
    groups: list[np.ndarray] = []
    for g in np.argsort(first, kind="stable"):
        rows = np.flatnonzero(inverse.ravel() == g)
        groups += [rows[i: i + max_candidates] for i in range(0, len(rows), max_candidates)]
    return groups


@torch.no_grad()
def reference_probs(model: nn.Module, arrays: dict[str, np.ndarray], batch_size: int = 4096) -> np.ndarray:
    model.eval()
    n = len(next(iter(arrays.values())))
    out = []
    for s in range(0, n, batch_size):
        batch = {k: torch.from_numpy(np.ascontiguousarray(v[s: s + batch_size])) for k, v in arrays.items()}
        out.append(torch.sigmoid(model(batch)).numpy())
    return np.concatenate(out)


def _request(arrays: dict[str, np.ndarray], rows: np.ndarray, user: list[str], cand: list[str]) -> dict:
    req = {n: np.ascontiguousarray(arrays[n][rows[:1]]) for n in user}
    req.update({n: np.ascontiguousarray(arrays[n][rows]) for n in cand})
    return req


def _run_checked(runner: Runner, request: dict[str, np.ndarray], b: int) -> np.ndarray:
    out = np.asarray(runner(request))
    if out.shape != (b,):
        # an empty or mis-shaped output (e.g. the numpy-2 Python-backend failure) is a parity failure
        raise ValueError(f"runtime returned shape {out.shape} for {b} candidates, expected ({b},)")
    return out.astype(np.float64)


def _diff(got: np.ndarray, ref: np.ndarray) -> float:
    if not np.all(np.isfinite(got)):
        return float("inf")
    return float(np.max(np.abs(got - ref))) if len(ref) else 0.0


def check_parity(
    model: nn.Module,
    fmap: FeatureMap,
    runner: Runner,
    runtime: str,
    arrays: dict[str, np.ndarray],
    splits: list[str],
    tolerance: float = DEFAULT_TOLERANCE,
) -> ParityResult:
    """Run every check; never raises on a mismatch (see ``ParityResult.passed``)."""
    user, cand = split_inputs(fmap)
    arrays = {f.name: arrays[f.name] for f in fmap.features}
    n = len(arrays[cand[0]])
    checks: list[ParityCheck] = []

    def add(name: str, rows: int, requests: int, got: np.ndarray, ref: np.ndarray, note: str = "") -> None:
        d = _diff(got, ref)
        checks.append(ParityCheck(name=name, rows=rows, requests=requests, max_abs_diff=d,
                                  passed=d <= tolerance, note=note))

    def guarded(name: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as exc:  # a runtime error is reported as a failed check, not a traceback
            checks.append(ParityCheck(name=name, rows=0, requests=0, max_abs_diff=float("inf"), passed=False,
                                      note=f"{type(exc).__name__}: {exc}"))

    ref = reference_probs(model, arrays)

    def held_out() -> None:
        groups = group_requests(arrays, user, MAX_CANDIDATES)
        got = np.empty(n)
        for rows in groups:
            got[rows] = _run_checked(runner, _request(arrays, rows, user, cand), len(rows))
        add("held_out_rows", n, len(groups), got, ref, "rows grouped into requests by identical user-side inputs")

    def batch_of_one() -> None:
        rows = np.array([0])
        add("batch_of_1", 1, 1, _run_checked(runner, _request(arrays, rows, user, cand), 1), ref[:1])

    def one_user(name: str, empty_sequence: bool, b: int) -> Callable[[], None]:
        def run() -> None:
            rows = np.arange(min(b, n))
            flat = {k: v[rows].copy() for k, v in arrays.items()}
            for u in user:  # every candidate gets row 0's user side
                flat[u][:] = arrays[u][:1]
                if empty_sequence and fmap.feature(u).kind == "sequence":
                    flat[u][:] = PAD_ID
            req = _request(flat, np.arange(len(rows)), user, cand)
            add(name, len(rows), 1, _run_checked(runner, req, len(rows)), reference_probs(model, flat))
        return run

    guarded("held_out_rows", held_out)
    guarded("batch_of_1", batch_of_one)
    guarded("one_user_many_candidates", one_user("one_user_many_candidates", False, MAX_CANDIDATES))
    if fmap.sequence_fields:
        guarded("empty_sequence", one_user("empty_sequence", True, 100))
    else:
        checks.append(ParityCheck(name="empty_sequence", rows=0, requests=0, max_abs_diff=0.0, passed=True,
                                  note="the feature map has no sequence inputs"))
    worst = max(c.max_abs_diff for c in checks)
    return ParityResult(runtime=runtime, tolerance=tolerance, passed=all(c.passed for c in checks),
                        max_abs_diff=worst, splits=splits, checks=checks)
