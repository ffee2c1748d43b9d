"""MGDIN (Xu et al.): multi-granularity grouping of density-ordered feature tokens and
information-aware deferred interaction (paper eqs. 2–9; design notes in docs/models/mgdin.md).

Per window h (granularity g_h): group + tokenwise projection -> X0 (m tokens of width d) ->
L deferred layers, layer l keeping the top-k_l pairs of A0 -> pool. Windows run in parallel;
their pools are concatenated into an MLP.

Masks: ``mask_mode="dynamic"`` computes A0 per sample once (at the first layer) and derives
every layer's top-k mask from it; ``"static"`` uses per-window masks fixed by calibration
(``set_static_masks``), stored as buffers so they travel in ``state_dict()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from ctrserve.contract.feature_map import FeatureMap

from ..layers.deferred import A0Score, Attention, DeferredLayer, deferred_k, hierarchical_masks
from ..layers.embedding import Batch
from ..layers.grouping import GroupProjection
from ..layers.mlp import MLP
from ..layers.tokens import FieldTokens
from ..registry import register

A0Mode = Literal["layer1", "ste"]
InputNorm = bool | Literal["layer", "batch"]
MaskMode = Literal["dynamic", "static"]


class DeferredBranch(nn.Module):
    """One window: ``tokens [B, n, e] -> X_L [B, m, d]``."""

    def __init__(self, num_tokens: int, embedding_dim: int, granularity: int, model_dim: int,
                 ratios: Sequence[float], heads: int, ffn_dim: int | None, attention: Attention,
                 a0_mode: A0Mode, deferred: bool, dropout: float, ste_temperature: float,
                 input_norm: InputNorm = False, ste_detach_input: bool = True):
        super().__init__()
        self.granularity = granularity
        # ste: the surrogate gradient trains Q0/K0 only; letting it reach X0 (embeddings and group
        # projections) diverged on Frappe (docs/models/mgdin.md, r03)
        self.ste_detach_input = ste_detach_input
        self.group = GroupProjection(num_tokens, embedding_dim, granularity, model_dim)
        m = self.groups = self.group.groups
        # optional norm on X0 (a deviation, docs/models/mgdin.md): L2-regularised embeddings are tiny
        # (row norms ~0.02), so X0 = W·x + b is mostly its bias. "layer" (or true): LayerNorm per token;
        # "batch": BatchNorm per (group, channel), which removes the bias and rescales the signal to
        # unit variance as the baselines' BatchNorm after their first layer does
        self.input_norm = _input_norm(input_norm, m, model_dim)
        self.deferred, self.a0_mode, self.ste_temperature = deferred, a0_mode, ste_temperature
        self.ks = deferred_k(m, ratios) if deferred else [m * m] * len(ratios)
        # a layer that keeps all m² pairs (k_l = m², e.g. r_l = 1) is standard attention: its all-ones
        # mask changes nothing but costs five graph nodes (where, floor, multiply), so it gets none
        self.keeps_all = [k >= m * m for k in self.ks]
        self.layers = nn.ModuleList(
            DeferredLayer(m, model_dim, heads, ffn_dim, attention, dropout) for _ in ratios
        )
        # eq. 3's own Q0/K0 exist only where they can be trained (straight-through masks)
        self.a0_score = A0Score(model_dim) if deferred and a0_mode == "ste" else None
        self.register_buffer("static_masks", torch.ones(len(ratios), m, m))

    def a0(self, x0: Tensor, first_scores: Tensor) -> Tensor:
        """A0 ``[B, m, m]`` from the first-layer representations (eq. 3); ``first_scores``: layer
        1's ``head_scores`` or ``scores`` of ``x0``."""
        if self.a0_score is not None:
            return self.a0_score(x0.detach() if self.ste_detach_input else x0)
        # layer 1's own scores, heads averaged; one head: [B, m, m] from head_scores as it is (no
        # ReduceMean in the graph), or [B, 1, m, m] from scores
        if first_scores.dim() == 3:
            return first_scores
        return first_scores.squeeze(1) if first_scores.shape[1] == 1 else first_scores.mean(dim=1)

    def dynamic_masks(self, x0: Tensor, first_scores: Tensor) -> Tensor:
        return hierarchical_masks(self.a0(x0, first_scores), self.ks,
                                  straight_through=self.a0_score is not None, temperature=self.ste_temperature)

    def x0(self, tokens: Tensor) -> Tensor:
        """First-layer representations X0 ``[B, m, d]`` (eq. 2)."""
        return self.input_norm(self.group(tokens))

    def forward(self, tokens: Tensor, mask_mode: MaskMode) -> Tensor:
        x = self.x0(tokens)
        first_scores = self.layers[0].head_scores(x)
        if not self.deferred:
            masks = None  # w/o DI: every pair at every layer
        elif mask_mode == "static":
            masks = self.static_masks  # [L, m, m], broadcast over the batch
        else:
            masks = self.dynamic_masks(x, first_scores)  # [B, L, m, m]
        per_layer = [None] * len(self.layers) if masks is None else masks.unbind(-3)  # one Split, no Squeeze per layer
        for i, (layer, mask) in enumerate(zip(self.layers, per_layer, strict=True)):
            x = layer(x, None if self.keeps_all[i] else mask, first_scores if i == 0 else None)
        return x


@register("mgdin")
class MGDIN(nn.Module):
    def __init__(
        self,
        feature_map: FeatureMap,
        embedding_dim: int = 16,
        windows: Sequence[int] = (2, 4),
        multi_granularity: bool = True,
        model_dim: int = 32,
        layers: int = 3,
        ratios: Sequence[float] | None = (0.33, 0.66, 1.0),
        heads: int = 1,
        ffn_dim: int | None = None,
        attention: Attention = "softmax",
        a0_mode: A0Mode = "layer1",
        deferred: bool = True,
        mask_mode: MaskMode = "dynamic",
        pooling: Literal["mean", "flatten"] = "mean",
        hidden: Sequence[int] = (400, 400, 400),
        dropout: float = 0.2,
        batch_norm: bool = True,
        ffn_dropout: float = 0.0,
        ste_temperature: float = 1.0,
        input_norm: InputNorm = False,
        ste_detach_input: bool = True,
        head_embeddings: bool = False,
        seq_pooling: str = "target",
    ):
        super().__init__()
        windows = [int(g) for g in windows]
        if not windows or min(windows) < 1:
            raise ValueError(f"windows must be a non-empty list of granularities >= 1, got {windows}")
        ratios = [(i + 1) / layers for i in range(layers)] if ratios is None else list(ratios)
        if len(ratios) != layers:
            raise ValueError(f"ratios has {len(ratios)} entries but layers={layers}; give one ratio per layer")
        if a0_mode not in ("layer1", "ste"):
            raise ValueError(f"a0_mode must be 'layer1' or 'ste', got {a0_mode!r}")
        if mask_mode not in ("dynamic", "static"):
            raise ValueError(f"mask_mode must be 'dynamic' or 'static', got {mask_mode!r}")
        if pooling not in ("mean", "flatten"):
            raise ValueError(f"pooling must be 'mean' or 'flatten', got {pooling!r}")
        if not multi_granularity:
            windows = windows[:1]  # w/o MG: the first window alone
        self.mask_mode, self.pooling, self.windows, self.ratios = mask_mode, pooling, windows, ratios
        # densest first, so consecutive tokens (and hence groups) carry similar information
        self.tokens = FieldTokens(feature_map, embedding_dim, seq_pooling, order=feature_map.density_order())
        n = self.tokens.num_fields
        self.branches = nn.ModuleList(
            DeferredBranch(n, embedding_dim, g, model_dim, ratios, heads, ffn_dim, attention, a0_mode,
                           deferred, ffn_dropout, ste_temperature, input_norm, ste_detach_input)
            for g in windows
        )
        width = sum(model_dim * (b.groups if pooling == "flatten" else 1) for b in self.branches)
        # deviation (off by default): the MLP also sees the raw feature tokens, as DCN/AutoInt+ heads do
        self.head_embeddings = head_embeddings
        width += n * embedding_dim if head_embeddings else 0
        self.mlp = MLP(width, list(hidden), 1, dropout, batch_norm)
        # static masks are usable only once calibrated; the flag travels with the state dict
        self.register_buffer("masks_calibrated", torch.zeros((), dtype=torch.bool))
        self._static_ready = False
        self.register_load_state_dict_post_hook(_sync_calibrated)

    def forward(self, batch: Batch) -> Tensor:
        if self.mask_mode == "static" and not self._static_ready:
            raise RuntimeError("MGDIN is in static mask mode but its masks were never calibrated: "
                               "run `ctrserve calibrate --run RUN_DIR` (or set_static_masks)")
        tokens = self.tokens(batch)
        pooled = []
        for branch in self.branches:
            x = branch(tokens, self.mask_mode)
            pooled.append(x.mean(dim=1) if self.pooling == "mean" else x.flatten(1))
        if self.head_embeddings:
            pooled.append(tokens.flatten(1))
        return self.mlp(torch.cat(pooled, dim=-1)).squeeze(-1)

    # -- calibration (offline, not part of the exported graph) ------------------------------
    @torch.no_grad()
    def a0_scores(self, batch: Batch) -> list[Tensor]:
        """Per-sample A0 ``[B, m_h, m_h]`` for every window."""
        tokens = self.tokens(batch)
        out = []
        for branch in self.branches:
            x0 = branch.x0(tokens)
            out.append(branch.a0(x0, branch.layers[0].head_scores(x0)))
        return out

    @torch.no_grad()
    def dynamic_masks(self, batch: Batch) -> list[Tensor]:
        """Per-sample hard masks ``[B, L, m_h, m_h]`` for every window (all ones w/o DI)."""
        return [hierarchical_masks(a0, b.ks) for a0, b in zip(self.a0_scores(batch), self.branches, strict=True)]

    @torch.no_grad()
    def masks_from_a0(self, a0_means: Sequence[Tensor]) -> list[Tensor]:
        """Top-k masks ``[L, m, m]`` per window from averaged A0 ``[m, m]``."""
        if len(a0_means) != len(self.branches):
            raise ValueError(f"need one A0 per window ({len(self.branches)}), got {len(a0_means)}")
        return [hierarchical_masks(a0.float(), b.ks) for a0, b in zip(a0_means, self.branches, strict=True)]

    @torch.no_grad()
    def set_static_masks(self, masks: Sequence[Tensor]) -> None:
        """Install fixed masks ``[L, m, m]`` per window (e.g. ``masks_from_a0(mean A0)``)."""
        if len(masks) != len(self.branches):
            raise ValueError(f"need masks for {len(self.branches)} windows, got {len(masks)}")
        for mask, branch in zip(masks, self.branches, strict=True):
            if tuple(mask.shape) != tuple(branch.static_masks.shape):
                raise ValueError(f"window g={branch.granularity}: mask shape {tuple(mask.shape)}, "
                                 f"expected {tuple(branch.static_masks.shape)}")
            for layer, keeps_all in enumerate(branch.keeps_all):
                # such a layer runs as standard attention (DeferredBranch.forward): its mask is all ones
                if keeps_all and not bool((mask[layer] != 0).all()):
                    raise ValueError(f"window g={branch.granularity}, layer {layer + 1} keeps all "
                                     f"{branch.groups ** 2} pairs (k = m²), so its mask must be all ones")
            branch.static_masks.copy_(mask.to(branch.static_masks.dtype))
        self.masks_calibrated.fill_(True)
        self._static_ready = True


class _TokenBatchNorm(nn.Module):
    """BatchNorm over ``[B, m, d]`` with one channel per (token, feature): an affine constant at eval."""

    def __init__(self, tokens: int, dim: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(tokens * dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.flatten(1)).view_as(x)


def _input_norm(kind: InputNorm, tokens: int, dim: int) -> nn.Module:
    if kind is False or kind is None:
        return nn.Identity()
    if kind is True or kind == "layer":
        return nn.LayerNorm(dim)
    if kind == "batch":
        return _TokenBatchNorm(tokens, dim)
    raise ValueError(f"input_norm must be false, true/'layer' or 'batch', got {kind!r}")


def _sync_calibrated(module: nn.Module, incompatible_keys: object) -> None:
    module._static_ready = bool(module.masks_calibrated)
