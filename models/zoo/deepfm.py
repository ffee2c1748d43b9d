"""DeepFM (Guo et al. 2017): FM and a DNN sharing one embedding."""

from typing import Any

from torch import Tensor, nn

from ctrserve.contract.feature_map import FeatureMap

from ..layers.deep import deep_parts
from ..layers.embedding import Batch
from ..layers.interaction import FMInteraction, LinearLogit
from ..registry import register


@register("deepfm")
class DeepFM(nn.Module):
    def __init__(self, feature_map: FeatureMap, **deep: Any):
        """``deep``: ``layers.deep.deep_parts``'s hyper-parameters (embedding_dim, hidden, dropout,
        batch_norm, seq_pooling)."""
        super().__init__()
        self.linear = LinearLogit(feature_map)
        self.tokens, self.dnn = deep_parts(feature_map, **deep)
        self.fm = FMInteraction()  # no parameters: the seeded initialisation is drawn as before

    def forward(self, batch: Batch) -> Tensor:
        tokens = self.tokens(batch)
        return self.linear(batch) + self.fm(tokens) + self.dnn(tokens.flatten(1)).squeeze(-1)
