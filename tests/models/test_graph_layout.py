"""The layers' export-friendly formulations compute what the plain definitions compute.

MGDIN's layers are written for the graph ONNX Runtime runs (batched matmuls instead of einsum,
single-head attention without head reshapes, token-major per-token FFN, LayerNorm on 2-D rows, a
three-op masked softmax for masks without gradient, one GEMM with a bias for the shared-history
target attention). Each test below writes the definition plainly as the reference (a softmax over
the kept entries, "fewer than k entries are larger" for top-k, einsum for the per-token map; none
reuses the layer's own algorithm) and checks that the layer gives the same outputs (and gradients),
in train and eval mode, with the same weights. The paper's equations, entry by entry:
test_mgdin_equations.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from ctrserve.models.layers.deferred import DeferredLayer, hierarchical_masks, masked_attention_weights
from ctrserve.models.layers.grouping import TokenwiseLinear
from ctrserve.models.layers.sequence import SequencePooling

ATOL = 1e-5


# -- the plain definitions --------------------------------------------------------------------------------
def ref_tokenwise(lin: TokenwiseLinear, x: Tensor) -> Tensor:
    return torch.einsum("bmi,mio->bmo", x, lin.weight) + lin.bias


def ref_masked_weights(scores: Tensor, mask: Tensor) -> Tensor:
    """The softmax over the kept entries of each row (the others weigh 0); a row with nothing kept is 0."""
    keep = mask > 0
    any_kept = keep.any(dim=-1, keepdim=True)
    kept_only = scores.masked_fill(~keep, float("-inf")).masked_fill(~any_kept, 0.0)
    return torch.softmax(kept_only, dim=-1) * any_kept


def ref_layer(layer: DeferredLayer, x: Tensor, mask: Tensor | None) -> Tensor:
    def heads(t: Tensor) -> Tensor:
        return t.reshape(-1, layer.tokens, layer.heads, layer.head_dim).transpose(1, 2)

    s = heads(layer.q(x)) @ heads(layer.k(x)).transpose(-1, -2) * layer.scale
    if mask is None:
        w = torch.softmax(s, dim=-1) if layer.attention == "softmax" else s
    else:
        mask = mask.unsqueeze(-3)
        w = ref_masked_weights(s, mask) if layer.attention == "softmax" else s * mask
    z = (w @ heads(layer.v(x))).transpose(1, 2).reshape(-1, layer.tokens, layer.dim)
    z_hat = layer.norm1(z + x)
    ffn = layer.ffn
    f = ref_tokenwise(ffn.down, ffn.drop(ffn.act(ref_tokenwise(ffn.up, z_hat))))
    return layer.norm2(f + z_hat)


def ref_hierarchical_masks(a0: Tensor, ks: list[int]) -> Tensor:
    """Layer l keeps entry (i, j) iff fewer than k_l entries of A0 are larger (no ties in random scores)."""
    flat = a0.flatten(-2)
    larger = (flat.unsqueeze(-2) > flat.unsqueeze(-1)).sum(-1)  # [..., m²]: entries above each entry
    return torch.stack([larger < k for k in ks], dim=-2).to(a0.dtype).unflatten(-1, a0.shape[-2:])


# -- tests ---------------------------------------------------------------------------------------------------
@pytest.mark.quick
def test_tokenwise_linear_is_the_einsum() -> None:
    torch.manual_seed(0)
    lin = TokenwiseLinear(5, 12, 7)
    with torch.no_grad():
        lin.bias.normal_()
    x = torch.randn(9, 5, 12)
    torch.testing.assert_close(lin(x), ref_tokenwise(lin, x), rtol=0, atol=ATOL)


@pytest.mark.quick
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("shape", [(3, 4, 6, 6), (6, 6)])
def test_masked_weights_without_gradient_equal_the_multiplicative_form(shape, training: bool) -> None:
    torch.manual_seed(0)
    scores = torch.randn(*shape) * 3
    scores[..., 1, :] *= 40  # kept entries further than the floor below their row's max
    mask = (torch.rand(*shape) < 0.4).float()
    mask[..., 0, :] = 0.0  # an all-masked row gives zeros
    got = masked_attention_weights(scores, mask, training)
    torch.testing.assert_close(got, ref_masked_weights(scores, mask), rtol=0, atol=ATOL)
    assert (got[..., 0, :] == 0).all()


@pytest.mark.quick
def test_masked_weights_gradient_to_scores_is_unchanged() -> None:
    torch.manual_seed(0)
    scores = torch.randn(4, 5, 5, requires_grad=True)
    mask = (torch.rand(4, 5, 5) < 0.5).float()
    g = torch.randn(4, 5, 5)
    (got,) = torch.autograd.grad((masked_attention_weights(scores, mask) * g).sum(), scores)
    (want,) = torch.autograd.grad((ref_masked_weights(scores, mask) * g).sum(), scores)
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)


@pytest.mark.quick
@pytest.mark.parametrize("m", [1, 3, 6])
def test_hierarchical_masks_are_unchanged(m: int) -> None:
    torch.manual_seed(m)
    a0 = torch.randn(8, m, m)
    ks = [math.floor(r * m * m) for r in (0.0, 0.33, 0.66, 1.0)]
    torch.testing.assert_close(hierarchical_masks(a0, ks), ref_hierarchical_masks(a0, ks), rtol=0, atol=0)
    ste = hierarchical_masks(a0, ks, straight_through=True)
    torch.testing.assert_close(ste, ref_hierarchical_masks(a0, ks), rtol=0, atol=0)


@pytest.mark.quick
@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("attention", ["softmax", "raw"])
@pytest.mark.parametrize("mask_kind", ["none", "static", "dynamic", "ste"])
@pytest.mark.parametrize("train", [False, True])
def test_deferred_layer_outputs_and_gradients_are_unchanged(heads: int, attention: str, mask_kind: str,
                                                            train: bool) -> None:
    torch.manual_seed(0)
    b, m, d = 7, 5, 8
    layer = DeferredLayer(m, d, heads=heads, attention=attention).train(train)
    with torch.no_grad():  # non-trivial norms and biases
        for p in layer.parameters():
            if p.dim() < 3:
                p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(b, m, d)
    if mask_kind == "none":
        mask = None
    elif mask_kind == "static":
        mask = (torch.rand(m, m) < 0.4).float()
    else:
        a0 = torch.randn(b, m, m, requires_grad=mask_kind == "ste")
        mask = hierarchical_masks(a0, [7], straight_through=mask_kind == "ste")[:, 0]
    got = layer(x, mask)
    want = ref_layer(layer, x, mask)
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
    params = list(layer.parameters())
    g = torch.randn_like(got)
    torch.testing.assert_close(torch.autograd.grad((got * g).sum(), params),
                               torch.autograd.grad((want * g).sum(), params), rtol=0, atol=ATOL)


@pytest.mark.quick
def test_ffn_dropout_draws_the_same_masks_as_before() -> None:
    torch.manual_seed(0)
    layer = DeferredLayer(4, 8, dropout=0.3).train()
    x = torch.randn(6, 4, 8)
    torch.manual_seed(1)
    got = layer(x)
    torch.manual_seed(1)
    want = ref_layer(layer, x, None)
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)


@pytest.mark.quick
def test_shared_history_target_pooling_is_unchanged(tiny_fmap, tiny_batch) -> None:
    """The batch-1 history path (one GEMM with a -1e9 bias, fields in one product) against the
    plain masked softmax on the history repeated per candidate, incl. an empty history."""
    batch, _ = tiny_batch
    seq = tiny_fmap.sequences[0]
    torch.manual_seed(0)
    pool = SequencePooling(seq, 4, "target").eval()
    b, length = 6, batch[seq.fields[0]].shape[1]
    for row in (0, 1):  # row 0 of tiny_batch has an empty history
        item_ids = batch[seq.fields[0]][row:row + 1]
        emb = {f: torch.randn(1, length, 4) for f in seq.fields}
        emb.update({t: torch.randn(b, 4) for t in seq.targets})
        got = pool(emb, item_ids)
        keys = torch.cat([emb[f] for f in seq.fields], dim=-1).expand(b, -1, -1)
        query = pool.query(torch.cat([emb[t] for t in seq.targets], dim=-1))
        scores = torch.einsum("bld,bd->bl", keys, query) / math.sqrt(keys.shape[-1])
        weights = ref_masked_weights(scores, (item_ids != 0).expand(b, -1).float()).unsqueeze(-1)
        for f in seq.fields:
            torch.testing.assert_close(got[f], (emb[f].expand(b, -1, -1) * weights).sum(dim=1), rtol=0, atol=ATOL)


@pytest.mark.quick
def test_field_tokens_stack_mixed_batches(tiny_fmap, tiny_batch) -> None:
    from ctrserve.models.layers.tokens import FieldTokens

    batch, _ = tiny_batch
    torch.manual_seed(0)
    tokens = FieldTokens(tiny_fmap, 4, "mean").eval()
    full = tokens(batch)
    emb = tokens.embedding(batch)
    for name, pool in tokens.pools.items():
        emb.update(pool(emb, batch[tokens.seq_items[name]]))
    torch.testing.assert_close(full, torch.stack([emb[n] for n in tokens.order], dim=1), rtol=0, atol=0)


@pytest.mark.quick
def test_floored_softmax_is_the_softmax_to_float32_precision() -> None:
    """Entries far below the row max (masked at -1e9 or -inf, or just tiny) keep a weight of at
    most e^-60; all-masked rows stay uniform, as torch.softmax gives them."""
    from ctrserve.models.layers.softmax import SOFTMAX_FLOOR, floored_softmax

    torch.manual_seed(0)
    scores = torch.randn(5, 7, 40) * 8
    scores[..., :10] = -1e9
    scores[0, 0, 10:20] = float("-inf")
    scores[1, 2, 11:] = scores[1, 2, 11:] - 300.0  # kept, but far below the row's max (entry 10)
    scores[1, 2, 10] = 50.0
    scores[2, 3, :] = -1e9  # all masked
    got, want = floored_softmax(scores), torch.softmax(scores, dim=-1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-7)
    assert torch.isfinite(got).all()
    assert (got[:2, :, :10] <= math.exp(-SOFTMAX_FLOOR) * 1.0001).all()  # rows with something kept
    torch.testing.assert_close(got[2, 3], torch.full((40,), 1 / 40))
