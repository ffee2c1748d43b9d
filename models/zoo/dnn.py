"""DNN: concatenated field tokens through an MLP."""

from typing import Any

from torch import Tensor, nn

from ctrserve.contract.feature_map import FeatureMap

from ..layers.deep import deep_parts
from ..layers.embedding import Batch
from ..registry import register


@register("dnn")
class DNN(nn.Module):
    def __init__(self, feature_map: FeatureMap, **deep: Any):
        """``deep``: ``layers.deep.deep_parts``'s hyper-parameters (embedding_dim, hidden, dropout,
        batch_norm, seq_pooling)."""
        super().__init__()
        self.tokens, self.mlp = deep_parts(feature_map, **deep)

    def forward(self, batch: Batch) -> Tensor:
        return self.mlp(self.tokens(batch).flatten(1)).squeeze(-1)
