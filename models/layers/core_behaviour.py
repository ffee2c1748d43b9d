"""CDNet's two views of a behaviour sequence (Xu et al., §3.1-3.2, eqs. 2-4).

- ``relevance``: a_j = (cos(f_i, s_j) + 1) / 2 between the candidate's representation f_i and
  each behaviour s_j (padding masked).
- ``CoreBehaviourSelector`` (eqs. 2-3): top-k indices I_k of A and the straight-through
  S_core = Gather(S ⊙ (sg[M − A] + A), I_k).
- ``InterestDistribution`` (eq. 4): counts of a_j in n equal bins over [0, 1] (unpadded events
  only), each count embedded, averaged into one token S_gid.

Everything has static shapes and no data-dependent Python control flow, so it traces and exports.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def relevance(candidate: Tensor, behaviours: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """``[B, D]``, ``[B, L, D]``, ``[B, L]`` bool -> a ``[B, L]`` in [0, 1]; padded positions are 0."""
    f = candidate / candidate.norm(dim=-1, keepdim=True).clamp_min(eps)
    s = behaviours / behaviours.norm(dim=-1, keepdim=True).clamp_min(eps)
    cos = torch.einsum("bd,bld->bl", f, s).clamp(-1.0, 1.0)
    return (cos + 1.0) / 2.0 * mask


class CoreBehaviourSelector(nn.Module):
    """Eqs. 2-3: the k most relevant behaviours, ``[B, L, D] -> ([B, k, D], valid [B, k])``.

    Forward: exactly the top-k behaviours (padding never outranks a real event; slots beyond a
    short sequence are zero and reported invalid). Backward: eq. 3 literally would send gradient
    only to the k gathered behaviours, because Gather drops the rest. To let "model parameters be
    updated based on all behaviours" (the paper's stated intent) the gather is straight-through too:
    forward the hard one-hot selection P, backward a soft selection P_soft whose every row is A
    normalised over the valid events (the mask read as a probability distribution). Non-selected
    behaviours then receive gradient through A_j (docs/models/cdnet.md).
    """

    def __init__(self, k: int, max_len: int):
        super().__init__()
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = min(k, max_len)  # clamp at construction: no data-dependent branch in forward
        self.max_len = max_len

    def forward(self, seq: Tensor, a: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        ranked = torch.where(mask, a, torch.full_like(a, -1.0))  # valid a >= 0 > -1
        idx = torch.topk(ranked, self.k, dim=-1).indices  # I_k, eq. 2: [B, k]
        hard = F.one_hot(idx, self.max_len).to(a.dtype) * mask.unsqueeze(1).to(a.dtype)  # [B, k, L]
        m = hard.sum(dim=1)  # M of eq. 3: [B, L] in {0, 1}
        weights = (m - a).detach() + a  # sg[M − A] + A: forward M, backward dA
        masked = seq * weights.unsqueeze(-1)  # S ⊙ (sg[M − A] + A)
        soft = a * mask / (a * mask).sum(dim=-1, keepdim=True).clamp_min(1e-12)  # [B, L]
        soft = soft.unsqueeze(1).expand_as(hard)
        select = (hard - soft).detach() + soft  # straight-through Gather(·, I_k)
        core = torch.bmm(select, masked)  # [B, k, D]
        return core, hard.sum(dim=-1) > 0


class InterestDistribution(nn.Module):
    """Eq. 4: ``a [B, L], mask [B, L] -> (S_gid [B, d], counts [B, n])``.

    Bins c_1 = [0, 1/n], c_j = ((j−1)/n, j/n]. A count p_j is embedded by bin and by
    ``floor(log2(1 + p_j))`` (log buckets keep the table small for sequences of hundreds of
    events while small counts stay distinct); S_gid is the mean of the n count embeddings.
    """

    def __init__(self, bins: int, max_len: int, dim: int):
        super().__init__()
        if bins < 1:
            raise ValueError(f"bins must be >= 1, got {bins}")
        self.bins = bins
        self.buckets = math.floor(math.log2(1 + max_len)) + 1
        self.embedding = nn.Embedding(bins * self.buckets, dim)
        nn.init.normal_(self.embedding.weight, std=1e-4)
        self.register_buffer("offsets", torch.arange(bins) * self.buckets, persistent=False)

    def counts(self, a: Tensor, mask: Tensor) -> Tensor:
        """p_j over the unpadded events, ``[B, n]`` (float, exact integers)."""
        bin_idx = (torch.ceil(a * self.bins) - 1).clamp(0, self.bins - 1).long()
        one_hot = F.one_hot(bin_idx, self.bins).to(a.dtype) * mask.unsqueeze(-1).to(a.dtype)
        return one_hot.sum(dim=1)

    def forward(self, a: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        p = self.counts(a.detach(), mask)
        bucket = torch.floor(torch.log2(1.0 + p)).long().clamp_max(self.buckets - 1)
        gid = self.embedding(bucket + self.offsets).mean(dim=1)
        return gid, p
