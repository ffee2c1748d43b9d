"""DeepFM (Guo et al. 2017): FM and a DNN sharing one embedding."""

from torch import Tensor, nn

from ctrserve.contract.feature_map import FeatureMap

from ..layers.embedding import Batch
from ..layers.interaction import FMInteraction, LinearLogit
from ..layers.mlp import MLP
from ..layers.tokens import FieldTokens
from ..registry import register


@register("deepfm")
class DeepFM(nn.Module):
    def __init__(
        self,
        feature_map: FeatureMap,
        embedding_dim: int = 16,
        hidden: list[int] = (400, 400, 400),
        dropout: float = 0.2,
        batch_norm: bool = True,
        seq_pooling: str = "mean",
    ):
        super().__init__()
        self.linear = LinearLogit(feature_map)
        self.tokens = FieldTokens(feature_map, embedding_dim, seq_pooling)
        self.fm = FMInteraction()
        self.dnn = MLP(self.tokens.num_fields * embedding_dim, list(hidden), 1, dropout, batch_norm)

    def forward(self, batch: Batch) -> Tensor:
        tokens = self.tokens(batch)
        return self.linear(batch) + self.fm(tokens) + self.dnn(tokens.flatten(1)).squeeze(-1)
