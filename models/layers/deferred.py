"""MGDIN's information-aware deferred interaction (eqs. 3–7).

* ``deferred_k``: how many of the m² group pairs layer l may use, ``k_l = floor(r_l · m²)``.
* ``hierarchical_masks``: one descending sort of A0 gives every layer's top-k_l indicator, so
  the masks are nested (a pair unmasked at layer l stays unmasked later). With
  ``straight_through`` the hard masks get a sigmoid surrogate gradient towards A0.
* ``DeferredLayer``: attention whose scores are multiplied by the layer's indicator (eq. 4),
  then ``LN(Z + X)`` and ``LN(PFFN(Ẑ) + Ẑ)`` with per-token FFN weights (eqs. 6–7).

Everything is shape-static given (m, ratios): topk, scatter and comparisons only, no
data-dependent Python control flow, so it traces and exports to ONNX.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from .grouping import TokenwiseLinear
from .softmax import SOFTMAX_FLOOR, floored_softmax

Attention = Literal["softmax", "raw"]
_NEG = -1e9  # finite "minus infinity": keeps all-masked rows NaN-free in eager, TorchScript and ONNX


def deferred_k(groups: int, ratios: Sequence[float]) -> list[int]:
    """``k_l = floor(r_l · m²)`` per layer. Rounded to 9 decimals first so that, e.g., 0.29·100
    (28.999999999999996 in binary floating point) counts as 29."""
    pairs = groups * groups
    ks = []
    for r in ratios:
        if not 0.0 <= float(r) <= 1.0:
            raise ValueError(f"deferred ratios must lie in [0, 1], got {r}")
        ks.append(min(pairs, math.floor(round(float(r) * pairs, 9))))
    return ks


def hierarchical_masks(a0: Tensor, ks: Sequence[int], straight_through: bool = False,
                       temperature: float = 1.0) -> Tensor:
    """``a0 [..., m, m] -> masks [..., L, m, m]`` (same dtype): layer l keeps the ``ks[l]`` largest
    entries of A0 (exactly ``ks[l]``; ties broken by ``topk``).

    ``straight_through``: forward values stay exactly 0/1, but the gradient of mask l with
    respect to A0 is that of ``sigmoid((A0 - t_l) / temperature)``, t_l the midpoint between the
    k_l-th and (k_l+1)-th largest score — so whatever produces A0 learns which pairs to open.
    """
    m = a0.shape[-1]
    pairs = m * m
    flat = a0.flatten(-2)
    values, order = flat.detach().topk(pairs, dim=-1)  # descending
    positions = torch.arange(pairs, device=a0.device).expand_as(order)
    # rank[i] = place of entry i in the sort; order is a permutation, so the scatter overwrites every
    # entry of its base (order itself: no zeros tensor to build in the exported graph)
    rank = order.scatter(-1, order, positions)
    # the layers' masks concatenated flat and reshaped once (no Unsqueeze per layer in the graph)
    flat_masks = torch.cat([rank < k for k in ks], dim=-1).to(a0.dtype)  # [..., L*m*m]
    if not straight_through:
        return flat_masks.unflatten(-1, (len(ks), m, m))
    soft = []
    for k in ks:
        if 0 < k < pairs:
            threshold = (values[..., k - 1 : k] + values[..., k : k + 1]) / 2
            soft.append(torch.sigmoid((flat - threshold) / temperature))
        else:  # all open or all closed: the mask does not depend on A0
            soft.append(torch.zeros_like(flat))
    surrogate = torch.stack(soft, dim=-2)
    masks = flat_masks.unflatten(-1, (len(ks), pairs)) + (surrogate - surrogate.detach())  # exactly +0.0 forward
    return masks.unflatten(-1, (m, m))


def masked_attention_weights(scores: Tensor, mask: Tensor, training: bool = False) -> Tensor:
    """Softmax over kept entries only (masked entries at −∞), written multiplicatively,
    ``exp(s - max) · M / Σ exp(s - max) · M``, so that a straight-through mask still passes a
    gradient. Rows with nothing kept give zeros.

    A mask without gradient (layer-1 A0, static masks) takes the same function in fewer nodes:
    at inference ``_kept_softmax``, whose nodes are cheap in ONNX Runtime at these shapes (the
    exported graph); in ``training`` ``floored_softmax(where(M, s, -1e9)) · M``, the form recorded
    runs were trained with, so that they reproduce exactly. The multiplicative chain below is for
    straight-through masks only."""
    if not mask.requires_grad:
        if training:
            return floored_softmax(torch.where(mask > 0, scores, _NEG)) * mask
        return _kept_softmax(scores, mask)
    keep = mask > 0
    row_max = scores.detach().masked_fill(~keep, _NEG).amax(dim=-1, keepdim=True)
    # masked entries may exceed the kept maximum: clamp so exp never overflows (they are x0 anyway)
    e = torch.exp((scores - row_max).clamp(max=0.0)) * mask
    return e / e.sum(dim=-1, keepdim=True).clamp_min(1e-12)


def _kept_softmax(scores: Tensor, mask: Tensor) -> Tensor:
    """``exp(clip(s - kept max, -FLOOR, 0)) · M`` normalised per row: the softmax over kept entries.

    The kept maximum comes from ``s + (M - 1)·1e9`` (a constant bias for static masks). Clipping at
    0 keeps masked entries above the kept maximum finite before ``· M`` zeroes them; clipping at
    -SOFTMAX_FLOOR keeps the exponential off denormals (slow in ONNX Runtime, layers/softmax.py) and
    changes a kept weight by at most e^-60 of the largest one. A row with nothing kept sums to 0 and
    gives zeros. In the exported graph: Add, ReduceMax, Sub, Clip, Exp, Mul, ReduceSum, Max, Div on
    [B, m, m], faster than the former ``floored_softmax(where(M, s, -1e9)) · M`` (Where, ReduceMax,
    Sub, Max, Softmax, Mul), whose Softmax and broadcasting Max pay per row of only m entries
    (`ctrserve bench graph --compare`; docs/decisions.md, "MGDIN's masked softmax at inference")."""
    kept_max = (scores + (mask - 1.0) * -_NEG).amax(dim=-1, keepdim=True)
    e = torch.exp((scores - kept_max).clamp(-SOFTMAX_FLOOR, 0.0)) * mask
    return e / e.sum(dim=-1, keepdim=True).clamp_min(1e-30)


class PerTokenFFN(nn.Module):
    """PFFN: a two-layer FFN with separate weights for each token position."""

    def __init__(self, tokens: int, dim: int, hidden: int, dropout: float = 0.0, activation: type[nn.Module] = nn.GELU):
        super().__init__()
        self.up = TokenwiseLinear(tokens, dim, hidden)
        self.down = TokenwiseLinear(tokens, hidden, dim)
        self.act = activation()
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor, positions: Tensor | None = None) -> Tensor:
        """``x`` [B, m, dim]; ``positions`` [m] (optional): the token positions whose weights the m
        columns of ``x`` take, for a caller that dropped some columns (CDNet's length groups)."""
        if positions is not None:
            up_w, up_b = self.up.weight[positions], self.up.bias[positions]
            h = self.drop(self.act((x.transpose(0, 1) @ up_w).transpose(0, 1) + up_b))
            return (h.transpose(0, 1) @ self.down.weight[positions]).transpose(0, 1) + self.down.bias[positions]
        if self.training and isinstance(self.drop, nn.Dropout):
            # dropout draws its mask in [B, m, hidden] order: keep that order, so a seed gives the masks it gave
            return self.down(self.drop(self.act(self.up(x))))
        # the same map with the hidden activations token-major ([m, B, hidden]): both products are
        # batched matmuls over the m positions with one transpose in (which ONNX Runtime folds into
        # the matmul) and one out, instead of one pair per TokenwiseLinear
        h = self.act(x.transpose(0, 1) @ self.up.weight + self.up.bias.unsqueeze(1))
        return (h @ self.down.weight).transpose(0, 1) + self.down.bias


class DeferredLayer(nn.Module):
    """One interaction layer of one window: ``X_{l-1} [B, m, d] -> X_l [B, m, d]``.

    ``mask`` ``[B, m, m]`` or ``[m, m]`` multiplies the attention scores (eq. 4); ``None``
    means all pairs (standard attention). ``attention="softmax"`` normalises over the kept
    pairs; ``"raw"`` uses the masked scaled scores directly, as eq. 4 is written. ``scores``:
    this layer's ``head_scores`` of ``x`` when the caller has them already (layer 1, whose scores
    also give A0).
    """

    def __init__(self, tokens: int, dim: int, heads: int = 1, ffn_dim: int | None = None,
                 attention: Attention = "softmax", dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"model_dim {dim} is not divisible by heads {heads}")
        if attention not in ("softmax", "raw"):
            raise ValueError(f"attention must be 'softmax' or 'raw', got {attention!r}")
        self.tokens, self.dim, self.heads, self.attention = tokens, dim, heads, attention
        self.head_dim = dim // heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = PerTokenFFN(tokens, dim, ffn_dim or 2 * dim, dropout)
        self.norm2 = nn.LayerNorm(dim)

    def _heads(self, x: Tensor) -> Tensor:
        return x.reshape(-1, self.tokens, self.heads, self.head_dim).transpose(1, 2)  # [B, H, m, dh]

    def scores(self, x: Tensor) -> Tensor:
        """Scaled attention scores ``[B, H, m, m]`` of this layer's own Q/K on ``x``."""
        s = self.head_scores(x)
        return s.unsqueeze(1) if self.heads == 1 else s

    def head_scores(self, x: Tensor) -> Tensor:
        """The scores as ``forward`` takes them: ``[B, m, m]`` for one head (no split into heads,
        and no head axis added and squeezed away again: graph nodes too), else ``[B, H, m, m]``."""
        if self.heads == 1:
            if self.training:
                return self.q(x) @ self.k(x).transpose(-1, -2) * self.scale
            # inference: (x Wqᵀ)(x Wkᵀ)ᵀ·s = x (Wqᵀ Wk·s) xᵀ — the weight product is constant (folded into
            # one initializer at export), so the K projection and the scaling leave the graph (two
            # nodes per layer; `ctrserve bench graph --compare`, docs/models/mgdin.md). Training keeps
            # the two projections so that recorded runs reproduce exactly.
            return x @ (self.q.weight.t() @ self.k.weight * self.scale) @ x.transpose(-1, -2)
        return self._heads(self.q(x)) @ self._heads(self.k(x)).transpose(-1, -2) * self.scale

    def _attend(self, x: Tensor, mask: Tensor | None, scores: Tensor | None) -> Tensor:
        """Attention output ``Z`` ``[B, m, d]`` (before the residual)."""
        s = self.head_scores(x) if scores is None else scores  # one head: [B, m, m], else [B, H, m, m]
        if self.heads > 1:
            mask = None if mask is None else mask.unsqueeze(-3)  # the same indicator for every head
        if mask is None:
            w = torch.softmax(s, dim=-1) if self.attention == "softmax" else s
        else:
            w = masked_attention_weights(s, mask, self.training) if self.attention == "softmax" else s * mask
        if self.heads == 1:
            return w @ self.v(x)
        return (w @ self._heads(self.v(x))).transpose(1, 2).reshape(-1, self.tokens, self.dim)

    def forward(self, x: Tensor, mask: Tensor | None = None, scores: Tensor | None = None) -> Tensor:
        z = self._attend(x, mask, scores)
        m, d = self.tokens, self.dim
        # LN(Z + X) and LN(PFFN(Ẑ) + Ẑ) with each norm taken on [B·m, d] rows: ONNX Runtime fuses
        # a 3-D Add directly followed by a LayerNorm into SkipLayerNormalization, whose CPU kernel
        # measured ~5x slower than Add + LayerNormalization at d = 32 (loadtests/bench_graph.py);
        # the reshape between them prevents that. Same values: the norm is per row either way.
        z_hat = self.norm1((z + x).reshape(-1, d)).reshape(-1, m, d)
        return self.norm2((self.ffn(z_hat) + z_hat).reshape(-1, d)).reshape(-1, m, d)


class A0Score(nn.Module):
    """Eq. 3 with its own parameters: ``A0 = (X0 Q0)(X0 K0)ᵀ / √d``, ``[B, m, d] -> [B, m, m]``.
    Used by ``a0_mode="ste"``; its Q0/K0 learn only through the straight-through masks."""

    def __init__(self, dim: int):
        super().__init__()
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, x0: Tensor) -> Tensor:
        return self.q(x0) @ self.k(x0).transpose(-1, -2) * self.scale
