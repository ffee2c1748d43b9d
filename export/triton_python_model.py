"""Triton Python-backend model (the local flavour): copied by ``ctrserve export`` into every
version directory as ``model.py``.

Self-contained on purpose: it runs inside the ``triton_python_backend_stub`` interpreter, which
sees the project's site-packages (numpy, onnxruntime, torch) but not the ``ctrserve`` package.
It reads ``manifest.json`` beside itself for the input order, the output name and the model file.

Threads: one ONNX Runtime intra-op thread per instance by default, inter-op 1, and no spinning
(spinning workers starve a client sharing the same 2 cores). Override per model with the config
parameter ``ORT_INTRA_OP_THREADS``.

Batched configs (``max_batch_size > 0``, written for models exported with the multi-user graph):
every request is one user, its user-side inputs ``[1, ...]`` and its candidate-side inputs
``[1, B, ...]`` (ragged: B differs between requests). Triton's dynamic batcher hands ``execute``
the requests it merged; they run as ONE call of the multi-user graph (user inputs stacked
``[R, ...]``, candidates concatenated ``[sum B, ...]``, ``user_index`` from the per-request
counts) and the scores are split back, each response ``[1, B]``. A request with bad inputs is
answered with its own error; if the merged call fails, each request runs alone so the failure
lands only on the requests that cause it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# The stub embeds the system libpython; seen here, its interpreter did not apply PYTHONPATH to
# sys.path (the variable was in os.environ, the directories were not on sys.path), so numpy was
# not found. `ctrserve triton` exports PYTHONPATH=<project site-packages>: apply it explicitly.
for _path in reversed(os.environ.get("PYTHONPATH", "").split(os.pathsep)):
    if _path and _path not in sys.path:
        sys.path.insert(0, _path)

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        version_dir = Path(args["model_repository"]) / str(args["model_version"])
        manifest = json.loads((version_dir / "manifest.json").read_text())
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        threads = int(params.get("ORT_INTRA_OP_THREADS", "1") or 1)
        self.input_names = [t["name"] for t in manifest["inputs"]]
        self.output_name = manifest["output"]["name"]
        self.batched = int(config.get("max_batch_size", 0)) > 0
        path = version_dir / manifest["file"]
        if self.batched:
            if not manifest.get("grouped"):
                raise ValueError(f"config.pbtxt batches requests but version {args['model_version']} was exported "
                                 "without the multi-user graph (ctrserve export --grouped)")
            self.user_names = [t["name"] for t in manifest["inputs"] if t["side"] == "user"]
            self.candidate_names = [t["name"] for t in manifest["inputs"] if t["side"] == "candidate"]
            self.index_name = manifest["grouped"]["index_input"]
            path = version_dir / manifest["grouped"]["file"]
        if manifest["format"] == "onnx":
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
            session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            self._run = lambda feeds: session.run([self.output_name], feeds)[0]
        else:
            import torch

            torch.set_num_threads(threads)
            module = torch.jit.load(str(path), map_location="cpu").eval()

            def run(feeds: dict) -> np.ndarray:
                with torch.no_grad():
                    return module(*(torch.from_numpy(feeds[n]) for n in self.input_names)).numpy()

            self._run = run

    def execute(self, requests: list) -> list:
        if self.batched:
            return self._execute_batched(requests)
        responses = []
        for request in requests:
            try:
                probs = np.asarray(self._run(self._feeds(request)), dtype=np.float32)
                responses.append(_response(self.output_name, probs))
            except Exception as exc:  # one bad request must not take the others down
                responses.append(_error(exc))
        return responses

    def _feeds(self, request) -> dict:
        return {n: np.ascontiguousarray(pb_utils.get_input_tensor_by_name(request, n).as_numpy())
                for n in self.input_names}

    def _one_user(self, request) -> dict:
        """A batched request's inputs in the multi-user layout: user ``[1, ...]``, candidates ``[B, ...]``."""
        feeds = self._feeds(request)
        for n in self.user_names:
            if feeds[n].shape[0] != 1:
                raise ValueError(f"input {n!r}: one user per request, got shape {list(feeds[n].shape)}")
        sizes = {feeds[n].shape[1] if feeds[n].ndim > 1 else -1 for n in self.candidate_names}
        if len(sizes) != 1 or -1 in sizes or any(feeds[n].shape[0] != 1 for n in self.candidate_names):
            raise ValueError("candidate inputs must share one shape [1, B, ...], got "
                             + ", ".join(f"{n} {list(feeds[n].shape)}" for n in self.candidate_names))
        for n in self.candidate_names:
            feeds[n] = feeds[n][0]
        return feeds

    def _execute_batched(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        good: list[tuple[int, dict]] = []
        for i, request in enumerate(requests):
            try:
                good.append((i, self._one_user(request)))
            except Exception as exc:
                responses[i] = _error(exc)
        if good:
            try:
                for (i, _), probs in zip(good, self._run_merged([f for _, f in good]), strict=True):
                    responses[i] = _response(self.output_name, probs[None])
            except Exception:  # run each alone: the error lands only on the requests that cause it
                for i, feeds in good:
                    try:
                        responses[i] = _response(self.output_name, self._run_merged([feeds])[0][None])
                    except Exception as exc:
                        responses[i] = _error(exc)
        return responses

    def _run_merged(self, parts: list) -> list:
        sizes = [len(p[self.candidate_names[0]]) for p in parts]
        feeds = {n: np.concatenate([p[n] for p in parts]) for n in self.user_names + self.candidate_names}
        feeds[self.index_name] = np.repeat(np.arange(len(parts), dtype=np.int64), sizes)
        probs = np.asarray(self._run(feeds), dtype=np.float32)
        if probs.shape != (sum(sizes),):
            raise ValueError(f"the multi-user graph returned shape {list(probs.shape)} for {sum(sizes)} candidates")
        return np.split(probs, np.cumsum(sizes)[:-1])

    def finalize(self) -> None:
        self._run = None


def _response(name: str, probs: np.ndarray):
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(name, np.ascontiguousarray(probs))])


def _error(exc: Exception):
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(f"{type(exc).__name__}: {exc}"))
