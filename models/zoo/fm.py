"""Factorisation machine (Rendle 2010): first order + pairwise factorised interactions."""

from torch import Tensor, nn

from ctrserve.contract.feature_map import FeatureMap

from ..layers.embedding import Batch
from ..layers.interaction import FMInteraction, LinearLogit
from ..layers.tokens import FieldTokens
from ..registry import register


@register("fm")
class FM(nn.Module):
    def __init__(self, feature_map: FeatureMap, embedding_dim: int = 10, seq_pooling: str = "mean"):
        super().__init__()
        self.linear = LinearLogit(feature_map)
        self.tokens = FieldTokens(feature_map, embedding_dim, seq_pooling)
        self.fm = FMInteraction()

    def forward(self, batch: Batch) -> Tensor:
        return self.linear(batch) + self.fm(self.tokens(batch))
