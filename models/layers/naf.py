"""DLF's Network-Aware Attention Fusion (Wang et al., SIGIR 2025, §4.3, eqs. 10-15).

Input: the RLI block outputs ``Z_M`` (each ``[B, n, d]``, M over the blocks). Per attention layer:

- eq. 10: ``(Q_M, K_M, V_M) = Split(f_att(Z_M))``, f_att a per-block Linear(d, 3d) on each token
- eqs. 11-12: ``Att_M^C = ReLU(W_M^C [A_MX V_X; A_MY V_Y] + b_M^C)``, ``A_MX = softmax(Q_M K_Xᵀ/√d)``
- eq. 13: ``Att_M^S = softmax(Q_M K_Mᵀ/√d) V_M``

then eq. 14 ``Att = ReLU(W_F [Att_L^C + Att_L^S; ...] + b_F)`` and eq. 15 ``Z = [Z_L; Z_C; Z_D; Att]``
(concatenated on the token axis). With more than one attention layer, eqs. 10-13 are applied again
to ``Att_M^C + Att_M^S`` before the fusion of eq. 14.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class BlockAttentionLayer(nn.Module):
    """Eqs. 10-13 for every block at once: cross-attention against the other blocks plus self-attention.

    The n tokens of all M blocks form one ``[B, M n, d]`` matrix, so every (query block, key block)
    score comes out of a single batched matmul; the softmax is taken within each key block (eq. 11
    and eq. 13 normalise over one block's keys), and one matmul batched over (row, key block) gives,
    for every query token, ``A_MX V_X`` for every key block X. The entry with X = M is the
    self-attention of eq. 13; W_M^C of eq. 12 reads the other M − 1 entries (its weights on the
    block's own entry are held at zero). The per-block projections of eq. 10 run block-major
    (``[M, B n, d]``), where the bias gradient is a contiguous reduction: in the row-major layout
    that reduction alone took 15 % of DLF's training step on CPU (docs/decisions.md). Small tensors
    throughout: a loop of per-pair matmuls and softmaxes over 10-wide rows is several times slower.
    """

    def __init__(self, num_blocks: int, dim: int):
        super().__init__()
        if num_blocks < 2:
            raise ValueError("block attention needs at least two blocks")
        m = num_blocks
        self.w_qkv = nn.Parameter(torch.empty(m, dim, 3 * dim))  # f_att of eq. 10, per block
        self.b_qkv = nn.Parameter(torch.zeros(m, 1, 3 * dim))
        self.w_cross = nn.Parameter(torch.empty(m, m * dim, dim))  # W_M^C of eq. 12, per block
        self.b_cross = nn.Parameter(torch.zeros(m, 1, dim))
        nn.init.uniform_(self.w_qkv, -1.0 / math.sqrt(dim), 1.0 / math.sqrt(dim))
        nn.init.uniform_(self.w_cross, -1.0 / math.sqrt((m - 1) * dim), 1.0 / math.sqrt((m - 1) * dim))
        # rows of W_M^C that would read block M's own entry: zero, so eq. 12 sees only the others
        cross_mask = (1 - torch.eye(m)).repeat_interleave(dim, dim=1).unsqueeze(-1)  # [M, M d, 1]
        self.register_buffer("cross_mask", cross_mask, persistent=False)
        # positions of the (key block X, query block M) pairs with X = M in the flattened pair axis
        self.register_buffer("own_block", torch.arange(m) * (m + 1), persistent=False)
        self.m, self.dim = m, dim
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, z: Tensor) -> Tensor:
        """``[B, M, n, d] -> [B, M, n, d]`` (Att_M^C + Att_M^S per block)."""
        m, b, n, d = self.m, z.shape[0], z.shape[2], self.dim
        z_blocks = z.transpose(0, 1).reshape(m, b * n, d)
        qkv = torch.baddbmm(self.b_qkv, z_blocks, self.w_qkv)  # eq. 10, [M, B n, 3d]
        q, k, v = qkv.view(m, b, n, 3 * d).transpose(0, 1).split(d, dim=-1)  # each [B, M, n, d]
        scores = torch.bmm(q.reshape(b, m * n, d), k.reshape(b, m * n, d).transpose(1, 2)) * self.scale
        # softmax within each key block, shifted by that block's own max: a shared per-row shift
        # can underflow a whole block to 0/0 when blocks' scores are far apart
        scores = scores.view(b, m * n, m, n)
        e = torch.exp(scores - scores.detach().amax(dim=-1, keepdim=True))
        w = e / e.sum(dim=-1, keepdim=True)  # [B, query token, key block, key]
        att = torch.matmul(w.transpose(1, 2), v).view(b, m, m, n, d)  # A_MX V_X: [B, X, M, n, d]
        att_s = att.flatten(1, 2).index_select(1, self.own_block)  # eq. 13 (X = M), [B, M, n, d]
        w_cross = (self.w_cross * self.cross_mask).view(m, m, d, d)  # [M, X, d, d]
        att_c = torch.relu(torch.einsum("bxmnd,mxde->bmne", att, w_cross) + self.b_cross)  # eq. 12
        return att_c + att_s


class NetworkAwareAttentionFusion(nn.Module):
    """``[Z_M] -> Z = [Z_M...; Att]``, ``[B, (num_blocks + 1) * n, d]``."""

    def __init__(self, num_blocks: int, dim: int, layers: int = 1):
        super().__init__()
        if layers < 1:
            raise ValueError(f"attention_layers must be >= 1, got {layers}")
        self.layers = nn.ModuleList([BlockAttentionLayer(num_blocks, dim) for _ in range(layers)])
        self.fuse = nn.Linear(num_blocks * dim, dim)  # W_F, b_F of eq. 14

    def forward(self, blocks: list[Tensor]) -> Tensor:
        h = torch.stack(blocks, dim=1)  # [B, M, n, d]
        for layer in self.layers:
            h = layer(h)
        att = torch.relu(self.fuse(h.permute(0, 2, 1, 3).flatten(2)))  # eq. 14, per token position
        return torch.cat([*blocks, att], dim=1)  # eq. 15
