"""AutoInt (Song et al. 2019): stacked multi-head self-attention over field tokens,
optionally with a parallel DNN (AutoInt+)."""

from torch import Tensor, nn

from ctrserve.contract.feature_map import FeatureMap

from ..layers.attention import InteractingLayer
from ..layers.embedding import Batch
from ..layers.interaction import LinearLogit
from ..layers.mlp import MLP
from ..layers.tokens import FieldTokens
from ..registry import register


@register("autoint")
class AutoInt(nn.Module):
    def __init__(
        self,
        feature_map: FeatureMap,
        embedding_dim: int = 16,
        attention_layers: int = 3,
        attention_dim: int = 64,
        heads: int = 2,
        use_residual: bool = True,
        use_linear: bool = False,
        hidden: list[int] = (),
        dropout: float = 0.0,
        batch_norm: bool = False,
        seq_pooling: str = "mean",
    ):
        super().__init__()
        self.tokens = FieldTokens(feature_map, embedding_dim, seq_pooling)
        layers, dim = [], embedding_dim
        for _ in range(attention_layers):
            layers.append(InteractingLayer(dim, attention_dim, heads, use_residual))
            dim = attention_dim
        self.attention = nn.Sequential(*layers)
        self.head = nn.Linear(self.tokens.num_fields * dim, 1)
        self.linear = LinearLogit(feature_map) if use_linear else None
        width = self.tokens.num_fields * embedding_dim
        self.dnn = MLP(width, list(hidden), 1, dropout, batch_norm) if hidden else None

    def forward(self, batch: Batch) -> Tensor:
        tokens = self.tokens(batch)
        logit = self.head(self.attention(tokens).flatten(1)).squeeze(-1)
        if self.dnn is not None:
            logit = logit + self.dnn(tokens.flatten(1)).squeeze(-1)
        if self.linear is not None:
            logit = logit + self.linear(batch)
        return logit
