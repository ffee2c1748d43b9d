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
    and eq. 13 normalise over one block's keys) and a block-diagonal value matrix returns, for every
    query token, ``[A_M1 V_1, ..., A_MM V_M]`` side by side. The diagonal entry is the self-attention
    of eq. 13; W_M^C of eq. 12 reads the other M − 1 entries (its weights on the block's own entry
    are held at zero). Small tensors throughout: a loop of per-pair matmuls and softmaxes over
    10-wide rows is several times slower on CPU.
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
        eye = torch.eye(m)
        # rows of W_M^C that would read block M's own entry: zero, so eq. 12 sees only the others
        cross_mask = (1 - eye).repeat_interleave(dim, dim=1).unsqueeze(-1)  # [M, M d, 1]
        self.register_buffer("cross_mask", cross_mask, persistent=False)
        self.register_buffer("eye", eye, persistent=False)
        self.m, self.dim = m, dim
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, z: Tensor) -> Tensor:
        """``[B, M, n, d] -> [B, M, n, d]`` (Att_M^C + Att_M^S per block)."""
        m, n, d = self.m, z.shape[2], self.dim
        qkv = torch.einsum("bmnd,mde->bmne", z, self.w_qkv) + self.b_qkv
        q, k, v = qkv.split(d, dim=-1)  # each [B, M, n, d]
        scores = torch.bmm(q.reshape(-1, m * n, d), k.reshape(-1, m * n, d).transpose(1, 2)) * self.scale
        # softmax within each key block, shifted by that block's own max: a shared per-row shift
        # can underflow a whole block to 0/0 when blocks' scores are far apart
        scores = scores.view(-1, m * n, m, n)
        e = torch.exp(scores - scores.detach().amax(dim=-1, keepdim=True))
        w = (e / e.sum(dim=-1, keepdim=True)).view(-1, m * n, m * n)
        v_diag = (v.unsqueeze(2) * self.eye[None, :, :, None, None]).permute(0, 1, 3, 2, 4)  # [B, M, n, M, d]
        att = torch.bmm(w, v_diag.reshape(-1, m * n, m * d)).view(-1, m, n, m, d)  # [.., key block, d]
        att_s = (att * self.eye[None, :, None, :, None]).sum(dim=3)  # eq. 13
        att_c = torch.einsum("bmne,med->bmnd", att.flatten(3), self.w_cross * self.cross_mask)
        att_c = torch.relu(att_c + self.b_cross)  # eq. 12
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
