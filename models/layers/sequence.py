"""Pooling a behaviour sequence into one vector per field: mean, sum or target attention.

Padding (item id PAD) is masked everywhere; an empty sequence pools to zeros."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from ..data.feature_map import PAD_ID, SequenceInfo

Pooling = Literal["mean", "sum", "target"]


def padding_mask(item_ids: Tensor) -> Tensor:
    """``[B, L]`` bool, True where an event is present."""
    return item_ids != PAD_ID


def masked_softmax(scores: Tensor, mask: Tensor) -> Tensor:
    """Softmax over the last axis ignoring masked entries; all-masked rows give zeros
    (no NaN, no data-dependent control flow, so it traces and exports)."""
    scores = scores.masked_fill(~mask, -1e9)
    weights = torch.softmax(scores, dim=-1) * mask
    return weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-12)


class SequencePooling(nn.Module):
    """Pools each field of one sequence: ``{field: [B, L, d]} -> {field: [B, d]}``.

    ``target``: scaled dot-product attention whose query is the candidate's embeddings of the
    shared features (concatenated over fields) and whose keys are the events' embeddings.
    """

    def __init__(self, seq: SequenceInfo, dim: int, mode: Pooling = "mean"):
        super().__init__()
        self.fields = list(seq.fields)
        self.targets = list(seq.targets)
        self.mode = mode
        width = dim * len(self.fields)
        self.query = nn.Linear(width, width, bias=False) if mode == "target" else None
        self.scale = 1.0 / math.sqrt(width)

    def forward(self, emb: dict[str, Tensor], item_ids: Tensor) -> dict[str, Tensor]:
        mask = padding_mask(item_ids)
        if self.mode == "target":
            keys = torch.cat([emb[f] for f in self.fields], dim=-1)  # [B, L, F*d]
            query = self.query(torch.cat([emb[t] for t in self.targets], dim=-1))  # [B, F*d]
            scores = torch.einsum("bld,bd->bl", keys, query) * self.scale
            weights = masked_softmax(scores, mask).unsqueeze(-1)
        else:
            weights = mask.unsqueeze(-1).to(emb[self.fields[0]].dtype)
            if self.mode == "mean":
                weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(1.0)
        return {f: (emb[f] * weights).sum(dim=1) for f in self.fields}
