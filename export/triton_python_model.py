"""Triton Python-backend model (the local flavour): copied by ``ctrserve export`` into every
version directory as ``model.py``.

Self-contained on purpose: it runs inside the ``triton_python_backend_stub`` interpreter, which
sees the project's site-packages (numpy, onnxruntime, torch) but not the ``ctrserve`` package.
It reads ``manifest.json`` beside itself for the input order, the output name and the model file.

Threads: one ONNX Runtime intra-op thread per instance by default, inter-op 1, and no spinning
(spinning workers starve a client sharing the same 2 cores). Override per model with the config
parameter ``ORT_INTRA_OP_THREADS``.
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
        path = version_dir / manifest["file"]
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
        responses = []
        for request in requests:
            try:
                feeds = {n: np.ascontiguousarray(pb_utils.get_input_tensor_by_name(request, n).as_numpy())
                         for n in self.input_names}
                probs = np.asarray(self._run(feeds), dtype=np.float32)
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.output_name, probs)]))
            except Exception as exc:  # one bad request must not take the others down
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"{type(exc).__name__}: {exc}")))
        return responses

    def finalize(self) -> None:
        self._run = None
