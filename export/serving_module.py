"""The serving wrapper: one request = one user and B candidates.

A trained model takes a flat batch ``{input: [B, ...]}``. Online, the user-side tensors (the
profile and every behaviour-sequence field) are the same for all B candidates of a request, so
they cross the wire once with batch 1; the candidate-side tensors (item and context features)
carry the dynamic batch axis B. The wrapper returns click probabilities ``[B]`` (sigmoid of the
model's logits). Two forms of the same contract (``user_side``):

* ``shared``: the user tensors go into the model with batch 1; models built from the shared
  layers (``FieldTokens``, ``SequencePooling``, ...) embed and pool the history once per request
  and broadcast the resulting tokens to B. Not every model can (the exporter tries it, and the
  parity gate decides).
* ``expanded``: the user tensors are ``expand``ed to B first (a view), so the model sees a
  training-shaped batch and does the user-side work B times. Works for every model.

Positional order of the inputs is ``user_inputs + candidate_inputs`` (see ``split_inputs``); the
generated ``forward`` names its arguments after the feature-map inputs, so ONNX input names and
the TorchScript forward-argument names (Triton's pytorch backend) are the feature names.
"""

from __future__ import annotations

import keyword
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from ctrserve.contract.feature_map import FeatureMap

OUTPUT_NAME = "prob"
UserSide = Literal["shared", "expanded"]
USER_SIDES: tuple[UserSide, ...] = ("shared", "expanded")


def split_inputs(fmap: FeatureMap) -> tuple[list[str], list[str]]:
    """``(user inputs, candidate inputs)`` in feature-map order.

    User side: features with ``side == "user"`` (profile) and every sequence field (a sequence
    is the user's history). Candidate side: ``item`` and ``context`` features.
    """
    user = [f.name for f in fmap.features if f.side == "user" or f.kind == "sequence"]
    cand = [f.name for f in fmap.features if f.name not in user]
    if not cand:
        raise ValueError(f"feature map of {fmap.dataset!r} has no item/context inputs: nothing carries the "
                         "candidate axis")
    return user, cand


def input_shape(fmap: FeatureMap, name: str, side: str) -> list[int]:
    """Wire shape: batch 1 for user inputs, -1 (dynamic candidates) for candidate inputs."""
    f = fmap.feature(name)
    batch = 1 if side == "user" else -1
    return [batch, int(f.max_len)] if f.kind == "sequence" else [batch]


def _check_names(names: list[str]) -> None:
    bad = [n for n in names if not n.isidentifier() or keyword.iskeyword(n) or n.startswith("_")]
    if bad:
        raise ValueError(f"input names must be Python identifiers not starting with '_' (they become forward "
                         f"argument names): {bad}")


def _named_forward(names: list[str]) -> Callable[..., Tensor]:
    """``def forward(self, a, b, ...): return self.score((a, b, ...))`` with the feature names.

    Generated so the traced/exported graph carries the feature names as its input names."""
    args = ", ".join(names)
    src = f"def forward(_self, {args}):\n    return _self.score(({args},))\n"
    namespace: dict[str, Any] = {}
    exec(compile(src, "<ctrserve.export.serving_module>", "exec"), namespace)
    return namespace["forward"]


class ServingModule(nn.Module):
    """Wraps an eval-mode model: ``(user tensors [1, ...], candidate tensors [B, ...]) -> probs [B]``."""

    def __init__(self, model: nn.Module, fmap: FeatureMap, user_side: UserSide = "expanded"):
        super().__init__()
        if user_side not in USER_SIDES:
            raise ValueError(f"user_side must be one of {USER_SIDES}, got {user_side!r}")
        self.model = model.eval()
        self.user_side = user_side
        self.user_inputs, self.candidate_inputs = split_inputs(fmap)
        self.input_names = self.user_inputs + self.candidate_inputs
        self.num_user = len(self.user_inputs)

    def score(self, tensors: tuple[Tensor, ...]) -> Tensor:
        cand = tensors[self.num_user:]
        b = cand[0].shape[0]
        batch: dict[str, Tensor] = {}
        for name, t in zip(self.user_inputs, tensors[: self.num_user], strict=True):
            # shared: batch 1 into the model (user-side work once per request); expanded:
            # [1, ...] -> [B, ...] as a view, the model does the user-side work per candidate
            batch[name] = t if self.user_side == "shared" else t.expand(b, *t.shape[1:])
        for name, t in zip(self.candidate_inputs, cand, strict=True):
            batch[name] = t
        return torch.sigmoid(self.model(batch))


def build_serving_module(model: nn.Module, fmap: FeatureMap, user_side: UserSide = "expanded") -> ServingModule:
    """A ``ServingModule`` subclass whose ``forward`` takes the inputs by their feature names.

    ``user_side="expanded"`` (default) works for every model; ``"shared"`` only for models that
    broadcast batch-1 user inputs (use the exported manifest's ``user_side``)."""
    user, cand = split_inputs(fmap)
    _check_names(user + cand)
    cls = type(f"Serving_{type(model).__name__}", (ServingModule,), {"forward": _named_forward(user + cand)})
    return cls(model, fmap, user_side)


def example_request(fmap: FeatureMap, candidates: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """Random valid inputs for tracing and warm-up: one user (a half-filled history) and
    ``candidates`` candidates."""
    rng = np.random.default_rng(seed)
    user, _ = split_inputs(fmap)
    out: dict[str, np.ndarray] = {}
    for f in fmap.features:
        side = "user" if f.name in user else "candidate"
        shape = [1 if side == "user" else candidates, *input_shape(fmap, f.name, side)[1:]]
        if f.dtype == "float32":
            out[f.name] = rng.standard_normal(shape).astype(np.float32)
        else:
            hi = max(int(f.vocab_size or 2), 2)
            x = rng.integers(1, hi, size=shape, dtype=np.int64)
            if f.kind == "sequence":
                x[..., x.shape[-1] // 2:] = 0  # most recent first, padded tail
            out[f.name] = x
    return out


def as_tensors(module: ServingModule, arrays: dict[str, np.ndarray]) -> tuple[Tensor, ...]:
    """Named numpy arrays -> the wrapper's positional tensors."""
    missing = [n for n in module.input_names if n not in arrays]
    if missing:
        raise KeyError(f"request lacks inputs {missing}")
    return tuple(torch.from_numpy(np.ascontiguousarray(arrays[n])) for n in module.input_names)
