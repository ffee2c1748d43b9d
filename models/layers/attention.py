"""Multi-head self-attention over field tokens (AutoInt's interacting layer)."""

from __future__ import annotations

from torch import Tensor, nn


class InteractingLayer(nn.Module):
    """AutoInt: multi-head self-attention with a projected residual and ReLU."""

    def __init__(self, in_dim: int, attention_dim: int, heads: int, use_residual: bool = True):
        super().__init__()
        self.attn = nn.MultiheadAttention(in_dim, heads, batch_first=True, kdim=in_dim, vdim=in_dim)
        self.out = nn.Linear(in_dim, attention_dim, bias=False)
        self.residual = nn.Linear(in_dim, attention_dim, bias=False) if use_residual else None
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.attn(x, x, x, need_weights=False)
        h = self.out(h)
        if self.residual is not None:
            h = h + self.residual(x)
        return self.act(h)
