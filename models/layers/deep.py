"""The deep part DNN, Wide & Deep and DeepFM share: field tokens, concatenated, through an MLP
ending in one logit. One function builds it, so the three models state its hyper-parameters and
their defaults once (configs set them under ``model:``)."""

from __future__ import annotations

from collections.abc import Sequence

from ctrserve.contract.feature_map import FeatureMap

from .mlp import MLP
from .tokens import FieldTokens


def deep_parts(feature_map: FeatureMap, embedding_dim: int = 16, hidden: Sequence[int] = (400, 400, 400),
               dropout: float = 0.2, batch_norm: bool = True, seq_pooling: str = "mean") -> tuple[FieldTokens, MLP]:
    """The field tokens and the MLP over their concatenation (``[B, F * d] -> [B, 1]``). Each model
    keeps them under its own submodule names, so saved weights load as before."""
    tokens = FieldTokens(feature_map, embedding_dim, seq_pooling)
    return tokens, MLP(tokens.num_fields * embedding_dim, list(hidden), 1, dropout, batch_norm)
