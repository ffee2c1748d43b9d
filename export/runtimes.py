"""A trained run in eager PyTorch, called with named numpy inputs: what the benchmarks compare the
exported runtimes with and what the eager FastAPI baseline serves. The benchmarks (loadtests/)
reach torch only through this module; ``parity.onnx_runner`` and ``parity.torchscript_runner``
run the exported files the same way."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .serving_module import as_tensors, build_serving_module


def torch_facts() -> dict[str, str]:
    """torch's version and its intra-op threads in this process, for a benchmark's machine facts."""
    return {"torch": torch.__version__, "torch_threads": str(torch.get_num_threads())}


def set_threads(n: int) -> None:
    """torch's intra-op threads in this process."""
    torch.set_num_threads(n)


class EagerModel:
    """The run's model in eval mode inside the export's serving wrapper (user inputs with batch 1,
    broadcast to the B candidates), called under ``torch.no_grad``: named inputs -> scores [B]."""

    def __init__(self, run_dir: Path):
        from ctrserve.models.train.trainer import load_run

        _, self.feature_map, model = load_run(Path(run_dir))
        self.wrapper = build_serving_module(model, self.feature_map).eval()
        self.user_inputs: list[str] = list(self.wrapper.user_inputs)
        self.candidate_inputs: list[str] = list(self.wrapper.candidate_inputs)

    def dtype(self, name: str) -> type:
        """numpy dtype of input ``name``."""
        return np.float32 if self.feature_map.feature(name).dtype == "float32" else np.int64

    def is_sequence(self, name: str) -> bool:
        return self.feature_map.feature(name).kind == "sequence"

    @torch.no_grad()
    def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self.wrapper(*as_tensors(self.wrapper, inputs)).numpy()
