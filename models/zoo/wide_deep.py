"""Wide & Deep (Cheng et al. 2016): a linear (wide) logit plus a DNN."""

from torch import Tensor, nn

from ctrserve.contract.feature_map import FeatureMap

from ..layers.embedding import Batch
from ..layers.interaction import LinearLogit
from ..layers.mlp import MLP
from ..layers.tokens import FieldTokens
from ..registry import register


@register("wide_deep")
class WideDeep(nn.Module):
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
        self.wide = LinearLogit(feature_map)
        self.tokens = FieldTokens(feature_map, embedding_dim, seq_pooling)
        self.deep = MLP(self.tokens.num_fields * embedding_dim, list(hidden), 1, dropout, batch_norm)

    def forward(self, batch: Batch) -> Tensor:
        return self.wide(batch) + self.deep(self.tokens(batch).flatten(1)).squeeze(-1)
