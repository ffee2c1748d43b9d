"""DCN-V2 (Wang et al. 2021): full-rank cross network and a DNN, parallel or stacked."""

from typing import Literal

import torch
from torch import Tensor, nn

from ctrserve.contract.feature_map import FeatureMap

from ..layers.embedding import Batch
from ..layers.interaction import CrossNetV2
from ..layers.mlp import MLP
from ..layers.tokens import FieldTokens
from ..registry import register


@register("dcnv2")
class DCNv2(nn.Module):
    def __init__(
        self,
        feature_map: FeatureMap,
        embedding_dim: int = 16,
        cross_layers: int = 3,
        hidden: list[int] = (400, 400, 400),
        dropout: float = 0.2,
        batch_norm: bool = True,
        structure: Literal["parallel", "stacked"] = "parallel",
        seq_pooling: str = "mean",
    ):
        super().__init__()
        self.tokens = FieldTokens(feature_map, embedding_dim, seq_pooling)
        width = self.tokens.num_fields * embedding_dim
        self.cross = CrossNetV2(width, cross_layers)
        self.structure = structure
        self.dnn = MLP(width, list(hidden), None, dropout, batch_norm)
        head_in = self.dnn.out_dim + (width if structure == "parallel" else 0)
        self.head = nn.Linear(head_in, 1)

    def forward(self, batch: Batch) -> Tensor:
        x0 = self.tokens(batch).flatten(1)
        crossed = self.cross(x0)
        if self.structure == "parallel":
            h = torch.cat([crossed, self.dnn(x0)], dim=-1)
        else:
            h = self.dnn(crossed)
        return self.head(h).squeeze(-1)
