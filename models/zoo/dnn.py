"""DNN: concatenated field tokens through an MLP."""

from torch import Tensor, nn

from ctrserve.contract.feature_map import FeatureMap

from ..layers.embedding import Batch
from ..layers.mlp import MLP
from ..layers.tokens import FieldTokens
from ..registry import register


@register("dnn")
class DNN(nn.Module):
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
        self.tokens = FieldTokens(feature_map, embedding_dim, seq_pooling)
        self.mlp = MLP(self.tokens.num_fields * embedding_dim, list(hidden), 1, dropout, batch_norm)

    def forward(self, batch: Batch) -> Tensor:
        return self.mlp(self.tokens(batch).flatten(1)).squeeze(-1)
