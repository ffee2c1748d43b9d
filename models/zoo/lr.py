"""Logistic regression: one weight per feature value."""

from torch import Tensor, nn

from ctrserve.contract.feature_map import FeatureMap

from ..layers.embedding import Batch
from ..layers.interaction import LinearLogit
from ..registry import register


@register("lr")
class LR(nn.Module):
    def __init__(self, feature_map: FeatureMap, embedding_dim: int = 1):
        super().__init__()
        self.linear = LinearLogit(feature_map)

    def forward(self, batch: Batch) -> Tensor:
        return self.linear(batch)
