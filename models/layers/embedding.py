"""Input embeddings shared by every model: one table per vocabulary owner, dense values as
value x learned vector, sequences looked up in the table of the item feature they share."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ctrserve.contract.feature_map import PAD_ID, FeatureMap

Batch = dict[str, Tensor]


class FeatureEmbedding(nn.Module):
    """``batch -> {input name: [B, d] | [B, L, d]}`` for every input in the feature map.

    Every lookup keeps its own input's batch, so user-side inputs sent once per request (batch
    1) are embedded once, not once per candidate; callers broadcast to the candidate batch."""

    def __init__(self, feature_map: FeatureMap, dim: int, init_std: float = 1e-4):
        super().__init__()
        self.dim = dim
        self.tables = nn.ModuleDict(
            {name: nn.Embedding(rows, dim, padding_idx=PAD_ID) for name, rows in feature_map.embedding_tables().items()}
        )
        self.dense = nn.ParameterDict(
            {f.name: nn.Parameter(torch.empty(dim)) for f in feature_map.dense}
        )
        self.lookups = [(f.name, f.embedding) for f in feature_map.features if f.embedding is not None]
        self.dense_names = [f.name for f in feature_map.dense]
        for table in self.tables.values():
            nn.init.normal_(table.weight, std=init_std)
            with torch.no_grad():
                table.weight[PAD_ID].zero_()
        for p in self.dense.values():
            nn.init.normal_(p, std=init_std)

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for name, table in self.lookups:
            out[name] = self.tables[table](batch[name])
        for name in self.dense_names:
            out[name] = batch[name].unsqueeze(-1) * self.dense[name]
        return out

    def table(self, name: str) -> nn.Embedding:
        return self.tables[name]
