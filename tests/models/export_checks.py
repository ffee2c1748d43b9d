"""Trace and ONNX-export checks shared by the model tests: the model must survive
``torch.jit.trace`` and the dynamo ONNX exporter with a dynamic batch axis, and both must match eager."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn


class Positional(nn.Module):
    """``model(batch dict)`` as ``forward(*tensors)`` in a fixed name order (what exporters take)."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *inputs: Tensor) -> Tensor:
        return self.model(dict(zip(self.names, inputs, strict=True)))


def check_trace(model: nn.Module, batch: dict[str, Tensor]) -> None:
    model.eval()
    with torch.no_grad():
        traced = torch.jit.trace(model, example_kwarg_inputs={"batch": batch}, strict=False)
        small = {k: v[:5] for k, v in batch.items()}  # a batch size other than the traced one
        torch.testing.assert_close(traced(small), model(small), rtol=1e-5, atol=1e-6)


def check_onnx(model: nn.Module, batch: dict[str, Tensor], path: Path) -> None:
    """Dynamo export with a dynamic batch axis; ONNX Runtime matches eager within 1e-4 at another batch size."""
    import onnxruntime as ort

    model.eval()
    names = list(batch)
    wrapper = Positional(model, names)
    example = tuple(batch[n][:8] for n in names)
    dim = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(wrapper, example, dynamo=True, input_names=names, output_names=["logit"],
                                    dynamic_shapes=(tuple({0: dim} for _ in names),), verbose=False)
        program.save(str(path))
        expected = model({n: batch[n][:13] for n in names}).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {n: batch[n][:13].numpy() for n in names}
    (got,) = session.run(None, feed)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
