"""Explicit feature-interaction layers: first-order logit, FM, CrossNetV2."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ctrserve.contract.feature_map import FeatureMap

from .embedding import Batch
from .tokens import FieldTokens


class LinearLogit(nn.Module):
    """First-order term: one weight per id (1-dim embedding, sequences mean-pooled) + bias.

    User-side inputs may have batch 1 and candidate-side ones batch B: ``FieldTokens`` looks the
    weights up at each input's own batch and broadcasts them, so the sum is ``[B]`` and, with
    equal batches, bitwise what it was."""

    def __init__(self, feature_map: FeatureMap):
        super().__init__()
        self.weights = FieldTokens(feature_map, dim=1, seq_pooling="mean")
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, batch: Batch) -> Tensor:
        return self.weights(batch).sum(dim=(1, 2)) + self.bias


class FMInteraction(nn.Module):
    """Second-order factorisation machine term over field tokens ``[B, F, d] -> [B]``."""

    def forward(self, tokens: Tensor) -> Tensor:
        square_of_sum = tokens.sum(dim=1).pow(2)
        sum_of_square = tokens.pow(2).sum(dim=1)
        return 0.5 * (square_of_sum - sum_of_square).sum(dim=1)


class CrossNetV2(nn.Module):
    """DCN-V2 cross layers: x_{l+1} = x_0 * (W_l x_l + b_l) + x_l, full-rank W_l."""

    def __init__(self, dim: int, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(dim, dim) for _ in range(num_layers)])

    def forward(self, x0: Tensor) -> Tensor:
        x = x0
        for layer in self.layers:
            x = x0 * layer(x) + x
        return x
