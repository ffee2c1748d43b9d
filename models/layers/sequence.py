"""Pooling a behaviour sequence into one vector per field: mean, sum or target attention.

Padding (item id PAD) is masked everywhere; an empty sequence pools to zeros."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from ctrserve.contract.feature_map import PAD_ID, SequenceInfo

from .softmax import floored_softmax

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

    Batch broadcasting (serving): the sequence may have batch 1 (one user's history shared by
    the request) while the target features have batch B (the candidates). Then the keys are
    embedded once and the attention is two GEMMs, ``[B, D] x [D, L]`` for the scores and
    ``[B, L] x [L, d]`` per field for the pooled vectors, instead of B copies of the history;
    mean/sum pooling returns ``[1, d]`` (the caller broadcasts). With equal batches of more than
    one row (training) the computation is exactly the one it always was; a batch of one row takes
    the GEMM form (same maths, sums in another order: differences ~1e-7).
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
            keys = torch.cat([emb[f] for f in self.fields], dim=-1)  # [B, L, F*d] or [1, L, F*d]
            query = self.query(torch.cat([emb[t] for t in self.targets], dim=-1))  # [B, F*d]
            if keys.shape[0] == 1 and query.dim() == 2:
                # one shared history: static at export (user inputs have batch 1), so no branch
                # survives in the graph; equal maths, one GEMM instead of B x L dot products
                # padded events get -1e9 added: after the floored softmax (layers/softmax.py) their
                # weight is at most e^-60 of the largest, nothing in float32, so masked_softmax's
                # re-masking and re-normalisation (two more [B, L] passes) are not needed; an empty
                # history pools to zeros through the [1, 1] factor instead.
                # The -1e9 is a [1, L] bias of one GEMM (scale, product and bias: ONNX Gemm) rather
                # than a [B, L] masked_fill pass.
                bias = torch.where(mask, 0.0, -1e9).to(keys.dtype)  # [1, L]
                scores = torch.addmm(bias, query, keys[0].transpose(0, 1), alpha=self.scale)  # [B, L]
                weights = floored_softmax(scores)
                has_events = mask.to(weights.dtype).amax(dim=-1, keepdim=True)  # [1, 1]: 1 or 0
                # the fields' pooled vectors in one product with the concatenated keys, then split
                pooled = (weights @ keys[0]) * has_events  # [B, F*d]
                return dict(zip(self.fields, pooled.split([emb[f].shape[-1] for f in self.fields], dim=-1),
                                strict=True))
            scores = torch.einsum("bld,bd->bl", keys, query) * self.scale
            weights = masked_softmax(scores, mask).unsqueeze(-1)
        else:
            weights = mask.unsqueeze(-1).to(emb[self.fields[0]].dtype)
            if self.mode == "mean":
                weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(1.0)
        return {f: (emb[f] * weights).sum(dim=1) for f in self.fields}
