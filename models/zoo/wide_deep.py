"""Wide & Deep (Cheng et al. 2016): a linear (wide) logit plus a DNN."""

from typing import Any

from torch import Tensor, nn

from ctrserve.contract.feature_map import FeatureMap

from ..layers.deep import deep_parts
from ..layers.embedding import Batch
from ..layers.interaction import LinearLogit
from ..registry import register


@register("wide_deep")
class WideDeep(nn.Module):
    def __init__(self, feature_map: FeatureMap, **deep: Any):
        """``deep``: ``layers.deep.deep_parts``'s hyper-parameters (embedding_dim, hidden, dropout,
        batch_norm, seq_pooling)."""
        super().__init__()
        self.wide = LinearLogit(feature_map)
        self.tokens, self.deep = deep_parts(feature_map, **deep)

    def forward(self, batch: Batch) -> Tensor:
        return self.wide(batch) + self.deep(self.tokens(batch).flatten(1)).squeeze(-1)
