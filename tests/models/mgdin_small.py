"""The small MGDIN the mechanism tests build: ``SMALL`` parameters (no dropout, no batch norm), seeded."""

from __future__ import annotations

import torch

from ctrserve.models.registry import build_model

SMALL = {"embedding_dim": 8, "model_dim": 8, "hidden": [16], "dropout": 0.0, "batch_norm": False}


def make(fmap, seed: int = 0, **params):
    torch.manual_seed(seed)
    return build_model("mgdin", fmap, {**SMALL, **params})
