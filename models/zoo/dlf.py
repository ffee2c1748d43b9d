"""DLF (Wang et al., SIGIR 2025): Dynamic Low-Order-Aware Fusion.

L stacked layers, each: RLI pathways (low-rank with E(1), high-rank CrossNet-style, implicit MLP;
``layers/rli.py``) -> NAF fusion (``layers/naf.py``) -> gated residual (eq. 9). Head: a linear
layer on the flattened E(L+1) (eq. 16); the trainer's BCE on logits is eq. 17.

Ablations (paper Table 3): ``gate=False`` plain residual, ``rli=False`` no low-rank E(1) pathway,
``naf=False`` the block outputs are concatenated without attention fusion.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ctrserve.contract.feature_map import FeatureMap

from ..layers.embedding import Batch
from ..layers.mlp import MLP
from ..layers.naf import NetworkAwareAttentionFusion
from ..layers.rli import GatedResidual, RLIBlocks, TokenProjection
from ..layers.tokens import FieldTokens
from ..registry import register


class DLFLayer(nn.Module):
    """One interaction layer: ``(E(1), E(l)) -> E(l+1)``."""

    def __init__(
        self, base_tokens: int, in_tokens: int, dim: int, rank: int, block_tokens: int,
        rli: bool, naf: bool, gate: bool, gate_eps: float, attention_layers: int,
        implicit_hidden: list[int], dropout: float, layer_norm: bool,
    ):
        super().__init__()
        self.blocks = RLIBlocks(base_tokens, in_tokens, dim, rank, block_tokens, rli, implicit_hidden)
        n_blocks = self.blocks.num_blocks
        self.naf = NetworkAwareAttentionFusion(n_blocks, dim, attention_layers) if naf else None
        self.out_tokens = block_tokens * (n_blocks + (1 if naf else 0))
        self.project = TokenProjection(in_tokens, self.out_tokens) if in_tokens != self.out_tokens else None
        self.residual = GatedResidual(dim, gate_eps, gate)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.norm = nn.LayerNorm(dim) if layer_norm else nn.Identity()

    def forward(self, e1: Tensor, el: Tensor) -> Tensor:
        blocks = self.blocks(e1, el)
        z = self.naf(blocks) if self.naf is not None else torch.cat(blocks, dim=1)  # w/o NAF: plain concatenation
        r = self.project(el) if self.project is not None else el
        return self.norm(self.dropout(z) + self.residual(r))


@register("dlf")
class DLF(nn.Module):
    def __init__(
        self,
        feature_map: FeatureMap,
        embedding_dim: int = 64,
        num_layers: int = 8,
        attention_layers: int = 2,
        rank: int = 8,
        block_tokens: int | None = None,
        implicit_hidden: list[int] = (),
        gate: bool = True,
        rli: bool = True,
        naf: bool = True,
        gate_eps: float = 1e-3,
        dropout: float = 0.0,
        layer_norm: bool = True,
        input_norm: bool = False,
        head_hidden: list[int] = (),
        head_batch_norm: bool = False,
        head_dropout: float = 0.0,
        seq_pooling: str = "mean",
    ):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.tokens = FieldTokens(feature_map, embedding_dim, seq_pooling)
        # optional LayerNorm of E(1): under strong embedding L2 the raw embeddings stay ~1e-3, and
        # the products E(1)·E(l)ᵀ of eq. 5 then carry almost no signal (docs/models/dlf.md)
        self.input_norm = nn.LayerNorm(embedding_dim) if input_norm else nn.Identity()
        base = self.tokens.num_fields
        n = block_tokens or base
        layers, tokens = [], base
        for _ in range(num_layers):
            layer = DLFLayer(base, tokens, embedding_dim, rank, n, rli, naf, gate, gate_eps,
                             attention_layers, list(implicit_hidden), dropout, layer_norm)
            layers.append(layer)
            tokens = layer.out_tokens
        self.layers = nn.ModuleList(layers)
        # eq. 16 when head_hidden is empty; hidden layers (with BatchNorm/dropout) as the baselines' deep part
        self.head = MLP(tokens * embedding_dim, list(head_hidden), 1, head_dropout, head_batch_norm)

    def forward(self, batch: Batch) -> Tensor:
        e1 = self.input_norm(self.tokens(batch))
        e = e1
        for layer in self.layers:
            e = layer(e1, e)
        return self.head(e.flatten(1)).squeeze(-1)
