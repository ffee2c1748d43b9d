"""Field tokens for flat models: every input becomes one ``d``-vector, sequences pooled."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ctrserve.contract.feature_map import FeatureMap

from .embedding import Batch, FeatureEmbedding
from .sequence import Pooling, SequencePooling


class FieldTokens(nn.Module):
    """``batch -> [B, F, d]``, one token per feature-map input in ``order`` (default: spec order).

    Inputs may mix batch 1 (the user side of a serving request) and batch B (candidates): each
    input is embedded and pooled at its own batch, the tokens are broadcast to B when stacked."""

    def __init__(
        self,
        feature_map: FeatureMap,
        dim: int,
        seq_pooling: Pooling = "mean",
        order: list[str] | None = None,
        embedding: FeatureEmbedding | None = None,
    ):
        super().__init__()
        self.embedding = embedding or FeatureEmbedding(feature_map, dim)
        self.pools = nn.ModuleDict({s.name: SequencePooling(s, dim, seq_pooling) for s in feature_map.sequences})
        self.seq_items = {s.name: s.fields[0] for s in feature_map.sequences}
        self.order = list(order or feature_map.token_names())
        self.num_fields = len(self.order)
        self.dim = dim

    def forward(self, batch: Batch) -> Tensor:
        emb = self.embedding(batch)
        for name, pool in self.pools.items():
            emb.update(pool(emb, batch[self.seq_items[name]]))
        # user-side tokens may have batch 1 and candidate-side ones batch B (serving): broadcast
        # to the common batch (views, no copy; a no-op when every batch is B, as in training).
        # cat + reshape is stack(dim=1) for [B, d] tokens, without one Unsqueeze per token in the
        # exported graph
        tokens = torch.cat(torch.broadcast_tensors(*(emb[n] for n in self.order)), dim=-1)
        return tokens.reshape(tokens.shape[0], self.num_fields, self.dim)
