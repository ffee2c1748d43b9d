"""CDNet (Xu et al.): Core-Behaviours and Distributional-Compensation Dual-View Interaction Network.

Per behaviour sequence: relevance of each event to the candidate (its shared-feature embeddings),
the k most relevant events as tokens (straight-through top-k, eqs. 2-3) and one interest-
distribution token (eq. 4); these with one token per contextual (non-sequence) feature go through
H post-LN transformer layers (eqs. 5-6) and an MLP head on the flattened output.

Ablations (paper Table 2): ``core=False`` (CDNet-RCore), ``gid=False`` (CDNet-RGid);
``k >= max_len`` keeps every event: the full-sequence (OneTrans-style) reference.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ctrserve.contract.feature_map import FeatureMap

from ..layers.core_behaviour import CoreBehaviourSelector, InterestDistribution, relevance
from ..layers.deferred import PerTokenFFN
from ..layers.embedding import Batch, FeatureEmbedding
from ..layers.mlp import MLP
from ..layers.sequence import padding_mask
from ..layers.softmax import floored_softmax
from ..registry import register

FFN = Literal["per_token", "shared"]


def exporting() -> bool:
    """Whether this forward is being traced or exported (TorchScript trace, ONNX, torch.export):
    those keep the written-out, shape-static graph; eager eval may take the fused paths."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()


class TransformerLayer(nn.Module):
    """Eqs. 5-6: X̂ = LN(MHA(X) + X); X' = LN(PFFN(X̂) + X̂), padded keys masked.

    ``ffn="per_token"`` (the paper's PFFN): each of the ``tokens`` positions has its own FFN weights
    (``layers.deferred.PerTokenFFN``, ReLU); ``"shared"``: one FFN for every token (the standard
    transformer's position-wise FFN).

    Written out (not ``nn.TransformerEncoderLayer``) so that eval mode takes no fused fast path and
    the masked softmax uses a finite fill: it traces and exports to ONNX unchanged.
    ``fused_training``: in training mode the attention is ``F.scaled_dot_product_attention`` (the same
    function, a fused kernel that never holds the [B, h, T, T] probabilities for backward: far less
    memory and time at T = 600), and in eager eval too (the full-sequence validation); tracing and
    export keep the written-out graph (``exporting``).
    """

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float, fused_training: bool = False,
                 tokens: int = 0, ffn: FFN = "per_token"):
        super().__init__()
        if ffn not in ("per_token", "shared"):
            raise ValueError(f"ffn must be 'per_token' or 'shared', got {ffn!r}")
        if ffn == "per_token" and tokens < 1:
            raise ValueError("a per-token FFN needs the number of tokens")
        if dim % heads:
            raise ValueError(f"d_model={dim} is not divisible by heads={heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.per_token = ffn == "per_token"
        self.ffn = (PerTokenFFN(tokens, dim, ffn_dim, activation=nn.ReLU) if self.per_token
                    else nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(), nn.Linear(ffn_dim, dim)))
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.fused_training = fused_training

    def forward(self, x: Tensor, key_valid: Tensor, positions: Tensor | None = None) -> Tensor:
        """``positions``: the token slots the columns of ``x`` are, when a caller dropped some (the
        per-token FFN takes their weights); ``None``: all of them, in order."""
        t, d = x.shape[1], x.shape[2]
        q, k, v = self.qkv(x).view(-1, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.fused_training and (self.training or not exporting()):
            # every row keeps at least one key (the context tokens), so no row is fully masked
            att = F.scaled_dot_product_attention(q, k, v, attn_mask=key_valid[:, None, None, :], scale=self.scale)
        else:
            scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale  # [B, h, T, T]
            scores = scores.masked_fill(~key_valid[:, None, None, :], -1e9)
            att = torch.matmul(floored_softmax(scores), v)  # off ORT's slow denormal path (layers/softmax.py)
        att = att.transpose(1, 2).reshape(-1, t, d)
        x = self.norm1(x + self.dropout(self.out(att)))
        ffn = self.ffn(x, positions) if self.per_token else self.ffn(x)
        return self.norm2(x + self.dropout(ffn))


class SequenceViews(nn.Module):
    """One behaviour sequence -> (tokens [B, k(+1), d_model], valid [B, k(+1)])."""

    def __init__(self, fields: list[str], targets: list[str], max_len: int, emb_dim: int, d_model: int,
                 k: int, bins: int, core: bool, gid: bool):
        super().__init__()
        self.fields, self.targets = fields, targets
        width = emb_dim * len(fields)
        self.core = CoreBehaviourSelector(k, max_len) if core else None
        self.core_proj = nn.Linear(width, d_model) if core else None
        self.gid = InterestDistribution(bins, max_len, d_model) if gid else None
        self.num_tokens = (self.core.k if self.core is not None else 0) + (1 if gid else 0)

    def forward(self, emb: dict[str, Tensor], item_ids: Tensor) -> tuple[Tensor, Tensor]:
        mask = padding_mask(item_ids)
        seq = torch.cat([emb[f] for f in self.fields], dim=-1)  # S: [B, L, F_s * d]
        cand = torch.cat([emb[t] for t in self.targets], dim=-1)  # f_i: [B, F_s * d]
        a = relevance(cand, seq, mask)
        tokens, valid = [], []
        if self.core is not None and self.core_proj is not None:
            core, core_valid = self.core(seq, a, mask)
            tokens.append(self.core_proj(core))
            valid.append(core_valid)
        if self.gid is not None:
            gid, _ = self.gid(a, mask)
            tokens.append(gid.unsqueeze(1))
            valid.append(torch.ones_like(a[:, :1], dtype=torch.bool))  # a has the candidate batch
        return torch.cat(tokens, dim=1), torch.cat(valid, dim=1)


@register("cdnet")
class CDNet(nn.Module):
    def __init__(
        self,
        feature_map: FeatureMap,
        embedding_dim: int = 16,
        d_model: int | None = None,
        k: int = 16,
        bins: int = 5,
        core: bool = True,
        gid: bool = True,
        num_layers: int = 2,
        heads: int = 2,
        ffn_dim: int | None = None,
        dropout: float = 0.0,
        hidden: list[int] = (256, 128),
        batch_norm: bool = False,
        embedding_init_std: float = 1e-4,
        fused_attention: bool = False,
        length_chunks: int = 0,
        head: Literal["flatten", "non_sequence"] = "flatten",
        ffn: FFN = "per_token",
    ):
        super().__init__()
        if not feature_map.sequences:
            raise ValueError(f"cdnet needs a behaviour sequence; dataset {feature_map.dataset!r} has none")
        if not (core or gid):
            raise ValueError("cdnet needs at least one sequence view: core and gid cannot both be false")
        d_model = d_model or embedding_dim
        # FuxiCTR's 1e-4 init by default; the first post-LN layer normalises such tiny tokens, and
        # on Amazon Sports one seed in two never left the constant-output plateau (docs/models/cdnet.md)
        self.embedding = FeatureEmbedding(feature_map, embedding_dim, init_std=embedding_init_std)
        self.views = nn.ModuleList([
            SequenceViews(list(s.fields), list(s.targets), s.max_len, embedding_dim, d_model, k, bins, core, gid)
            for s in feature_map.sequences
        ])
        self.seq_items = [s.fields[0] for s in feature_map.sequences]
        self.context = [f.name for f in feature_map.features if f.kind != "sequence"]
        if fused_attention and not (gid or self.context):
            raise ValueError("fused_attention needs a key every row keeps (the distribution token or a context "
                             "feature): an empty history would leave a row with none")
        self.ctx_proj = nn.Linear(embedding_dim, d_model) if d_model != embedding_dim else nn.Identity()
        n_tokens = sum(v.num_tokens for v in self.views) + len(self.context)
        # learned per-slot embedding: attention is permutation-invariant, and a core slot, the
        # distribution token and each contextual feature play different roles
        self.slot = nn.Parameter(torch.zeros(n_tokens, d_model))
        self.layers = nn.ModuleList([
            TransformerLayer(d_model, heads, ffn_dim or 4 * d_model, dropout, fused_attention, n_tokens, ffn)
            for _ in range(num_layers)
        ])
        if head not in ("flatten", "non_sequence"):
            raise ValueError(f"head must be 'flatten' or 'non_sequence', got {head!r}")
        # flatten: the paper's head over every output token. non_sequence (OneTrans-style, for the
        # full-sequence reference): only the distribution and contextual tokens' outputs, which have
        # attended to the behaviours; k = L = 600 flattened slots did not train on Taobao (cdnet.md)
        self.head_slots: list[int] | None = None
        if head == "non_sequence":
            self.head_slots, pos = [], 0
            for v in self.views:  # each view: its k core slots, then its distribution token (if any)
                self.head_slots += range(pos + (v.core.k if v.core is not None else 0), pos + v.num_tokens)
                pos += v.num_tokens
            self.head_slots += range(pos, n_tokens)  # the contextual tokens
        head_in = len(self.head_slots) if self.head_slots is not None else n_tokens
        self.head = MLP(head_in * d_model, list(hidden), 1, dropout, batch_norm)
        self.num_tokens = n_tokens
        if length_chunks < 0:
            raise ValueError(f"length_chunks must be >= 0, got {length_chunks}")
        self.length_chunks = length_chunks

    def forward(self, batch: Batch) -> Tensor:
        emb = self.embedding(batch)
        tokens, valid = [], []
        for view, item in zip(self.views, self.seq_items, strict=True):
            t, v = view(emb, batch[item])
            tokens.append(t)
            valid.append(v)
        # user-side context arrives with batch 1 in serving graphs: broadcast to the candidates
        ctx = self.ctx_proj(torch.stack(torch.broadcast_tensors(*[emb[n] for n in self.context]), dim=1))
        tokens.append(ctx)
        valid.append(torch.ones_like(ctx[:, :, 0], dtype=torch.bool))
        x = torch.cat(tokens, dim=1) + self.slot
        key_valid = torch.cat(valid, dim=1)
        if self.length_chunks > 1 and (self.training or not exporting()):
            x = self._layers_by_length(x, key_valid)
        else:
            for layer in self.layers:
                x = layer(x, key_valid)
        # zero the padded core slots so a short history's empty slots carry nothing to the head
        x = x * key_valid.unsqueeze(-1).to(x.dtype)
        if self.head_slots is not None:
            x = x[:, self.head_slots]
        return self.head(x.flatten(1)).squeeze(-1)

    def _layers_by_length(self, x: Tensor, key_valid: Tensor) -> Tensor:
        """The transformer layers on rows grouped by their number of valid tokens, each group
        dropping the token columns that are padding in all of its rows. Exactly the same outputs
        as the whole batch at once (such columns are masked keys for every row of the group and
        their outputs are zeroed before the head; each layer is per-token apart from attention),
        at a fraction of the cost when histories are much shorter than the sequence length —
        training and eager eval, never in a trace or export (``length_chunks`` groups; the
        full-sequence reference on Taobao, k = L = 600 with most histories far shorter,
        docs/models/cdnet.md)."""
        out = x.new_zeros(x.shape)
        for rows in key_valid.sum(dim=1).argsort().chunk(self.length_chunks):
            valid = key_valid[rows]
            cols = valid.any(dim=0).nonzero().squeeze(1)
            xg, vg = x[rows][:, cols], valid[:, cols]
            for layer in self.layers:
                xg = layer(xg, vg, cols)
            out = out.index_put((rows[:, None], cols[None, :]), xg)
        return out


def full_sequence_run(run: Path, out: Path) -> Path:
    """A copy of CDNet run directory ``run`` at ``out``, rebuilt as its full-sequence variant (k = L,
    the non-sequence head) with untrained weights and no test AUC: the graph whose cost ``ctrserve
    bench cdnet --full-seq-of`` measures (the same cost as a trained one's)."""
    import yaml

    from ..train.trainer import load_run

    cfg, fmap, _ = load_run(shutil.copytree(run, out))
    params = {**cfg.params, "k": 10_000, "head": "non_sequence"}
    (out / "config.yaml").write_text(yaml.safe_dump({**cfg.model_dump(), "params": params}, sort_keys=False))
    torch.save(CDNet(fmap, **params).state_dict(), out / "model.pt")
    (out / "metrics.json").write_text(json.dumps({"auc": float("nan")}))
    return out
