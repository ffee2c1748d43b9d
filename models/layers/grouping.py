"""Multi-granularity feature grouping (MGDIN eq. 2) and tokenwise (per-position) linear maps.

``g`` consecutive feature tokens are concatenated into one group token; the last group is
padded with zero tokens when ``n`` is not a multiple of ``g``. Each group position then has
its own projection to the model width ("tokenwise projection"): groups hold different
features, so sharing one matrix across positions would mix unrelated feature spaces.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def group_count(num_tokens: int, granularity: int) -> int:
    """Number of groups ``m = ceil(n / g)``."""
    if num_tokens < 1 or granularity < 1:
        raise ValueError(f"need n >= 1 tokens and granularity g >= 1, got n={num_tokens}, g={granularity}")
    return math.ceil(num_tokens / granularity)


class TokenwiseLinear(nn.Module):
    """``[B, m, in] -> [B, m, out]`` with separate weights (and bias) for each of the m positions."""

    def __init__(self, tokens: int, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(tokens, in_dim, out_dim))
        self.bias = nn.Parameter(torch.zeros(tokens, out_dim))
        # the same fan-in scaled init nn.Linear uses, per position
        bound = 1.0 / math.sqrt(in_dim)
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        # a batched matmul over the positions rather than einsum: ONNX Runtime's Einsum kernel
        # measured slower than MatMul at these shapes (ORT folds the transpose in; see
        # loadtests/bench_graph.py); the bias is added batch-major, one contiguous [m, out] block per row
        return (x.transpose(0, 1) @ self.weight).transpose(0, 1) + self.bias


def group_tokens(x: Tensor, granularity: int, num_tokens: int | None = None) -> Tensor:
    """``[B, n, e] -> [B, ceil(n/g), g*e]``: concatenate g consecutive tokens, zero-pad the tail.
    Pass ``num_tokens`` (= n) as a Python int when tracing so the padding is a constant."""
    n = x.shape[1] if num_tokens is None else num_tokens
    m = group_count(n, granularity)
    pad = m * granularity - n
    if pad:  # n and g are static, so this branch is fixed at trace time
        x = F.pad(x, (0, 0, 0, pad))
    return x.reshape(-1, m, granularity * x.shape[2])


class GroupProjection(nn.Module):
    """One window of eq. 2: group ``n`` tokens of width ``e`` by ``g`` and project each group to ``d``."""

    def __init__(self, num_tokens: int, embedding_dim: int, granularity: int, model_dim: int):
        super().__init__()
        self.num_tokens, self.granularity = num_tokens, granularity
        self.groups = group_count(num_tokens, granularity)
        self.proj = TokenwiseLinear(self.groups, granularity * embedding_dim, model_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(group_tokens(x, self.granularity, self.num_tokens))
