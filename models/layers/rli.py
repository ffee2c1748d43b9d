"""DLF's Residual-Aware Low-Order Interaction network (Wang et al., SIGIR 2025, §4.2, eqs. 5-9).

Representations are token matrices ``[B, T, d]`` (T field tokens of width d). One RLI layer runs
three pathways on ``E(l)`` and the gated residual that forms ``E(l+1)``:

- low-rank block (eq. 5):   Z_L = ReLU(W_LO vec(E(1) · (E(l)ᵀ W_LI)) + b_L),  W_LI: [T, R]
- high-rank block (eq. 6):  Z_C = ReLU(W_CO vec(E(l) · (E(l)ᵀ W_CI)) + b_C),  W_CI: [T, R]
- implicit block (eq. 7):   Z_D = ReLU(W_D vec(E(l)) + b_D)
- gated residual (eq. 9):   E(l+1) = Z + max(ε, W_gate E(l)) ⊙ E(l)

Each block emits ``n`` tokens of width d; the fusion (``naf.py`` or plain concatenation) builds Z.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class FactorizedInteraction(nn.Module):
    """``left · (rightᵀ W_in)`` -> ``[B, T_left, R]``, flattened, ``W_out`` + bias + ReLU -> ``[B, n, d]``.

    With ``left = E(1)`` this is the low-rank block (eq. 5); with ``left = right = E(l)`` the
    CrossNet-style high-rank block (eq. 6). ``W_in`` mixes the T_right tokens of ``right`` into R
    rank-components per embedding coordinate; each left token then takes an inner product with
    every component, so the output holds R pairwise-interaction scores per left token.
    """

    def __init__(self, left_tokens: int, right_tokens: int, dim: int, rank: int, out_tokens: int):
        super().__init__()
        self.w_in = nn.Parameter(torch.empty(right_tokens, rank))
        nn.init.xavier_uniform_(self.w_in)
        self.out = nn.Linear(left_tokens * rank, out_tokens * dim)
        self.shape = (out_tokens, dim)

    def forward(self, left: Tensor, right: Tensor) -> Tensor:
        proj = torch.matmul(right.transpose(1, 2), self.w_in)  # [B, d, R]
        inter = torch.bmm(left, proj).flatten(1)  # [B, T_left * R]
        return torch.relu(self.out(inter)).view(-1, *self.shape)


class ImplicitBlock(nn.Module):
    """Eq. 7: a dense ReLU layer over the flattened tokens (optionally preceded by hidden layers)."""

    def __init__(self, in_tokens: int, dim: int, out_tokens: int, hidden: list[int] | tuple[int, ...] = ()):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_tokens * dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers += [nn.Linear(width, out_tokens * dim), nn.ReLU()]
        self.net = nn.Sequential(*layers)
        self.shape = (out_tokens, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1)).view(-1, *self.shape)


class GatedResidual(nn.Module):
    """Eq. 9 residual term ``max(ε, W_gate r) ⊙ r`` with ``r`` the (token-projected) input.

    ``W_gate`` is d×d, shared by every token (the paper's stated shape). Its bias starts at 1 so
    that the layer starts as a plain residual: with FuxiCTR-scale embeddings (std 1e-4) a bias-free
    gate sits at ε and would cut the residual path at initialisation (see docs/models/dlf.md).
    ``gate=False`` (the paper's "w/o gate" ablation) gives the plain residual ``r``.
    """

    def __init__(self, dim: int, eps: float, gate: bool = True):
        super().__init__()
        if eps <= 0:
            raise ValueError(f"gate_eps must be > 0, got {eps}")
        self.eps = eps
        self.gate = nn.Linear(dim, dim) if gate else None
        if self.gate is not None:
            nn.init.ones_(self.gate.bias)

    def gate_values(self, r: Tensor) -> Tensor:
        assert self.gate is not None
        return torch.clamp_min(self.gate(r), self.eps)

    def forward(self, r: Tensor) -> Tensor:
        if self.gate is None:
            return r
        return self.gate_values(r) * r


class TokenProjection(nn.Module):
    """Linear map over the token axis ``[B, T_in, d] -> [B, T_out, d]`` (residual shape change)."""

    def __init__(self, in_tokens: int, out_tokens: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_tokens, in_tokens))
        nn.init.xavier_uniform_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return torch.matmul(self.weight, x)


class RLIBlocks(nn.Module):
    """The pathways of one RLI layer: ``(E(1), E(l)) -> [Z_L, Z_C, Z_D]`` (Z_L absent when ``rli=False``).

    ``rli=False`` is the paper's "w/o RLI" ablation: the low-order pathway that ties every layer back
    to E(1) is removed, leaving the conventional explicit (CrossNet-style) and implicit blocks.
    """

    def __init__(
        self, base_tokens: int, in_tokens: int, dim: int, rank: int, out_tokens: int,
        rli: bool = True, implicit_hidden: list[int] | tuple[int, ...] = (),
    ):
        super().__init__()
        self.low = FactorizedInteraction(base_tokens, in_tokens, dim, rank, out_tokens) if rli else None
        self.high = FactorizedInteraction(in_tokens, in_tokens, dim, rank, out_tokens)
        self.implicit = ImplicitBlock(in_tokens, dim, out_tokens, implicit_hidden)
        self.num_blocks = 3 if rli else 2

    def forward(self, e1: Tensor, el: Tensor) -> list[Tensor]:
        blocks = [] if self.low is None else [self.low(e1, el)]
        blocks.append(self.high(el, el))
        blocks.append(self.implicit(el))
        return blocks
