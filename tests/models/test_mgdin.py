"""MGDIN's layers: exact top-k per layer and nested hierarchical masks, grouping with padding,
masked pairs contribute nothing, fully masked rows, the folded key projection at inference."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from mgdin_small import make

from ctrserve.models.layers.deferred import DeferredLayer, deferred_k, hierarchical_masks
from ctrserve.models.layers.grouping import GroupProjection, group_count, group_tokens


# -- k_l and the hierarchical masks ---------------------------------------------------------
@pytest.mark.quick
@pytest.mark.parametrize("m", [1, 2, 3, 5, 6, 10])
@pytest.mark.parametrize("ratios", [(0.33, 0.66, 1.0), (0.1, 0.29, 0.5, 1.0), (0.0, 1.0)])
def test_k_is_floor_of_ratio_times_pairs(m: int, ratios) -> None:
    expected = [math.floor(Fraction(str(r)) * m * m) for r in ratios]
    assert deferred_k(m, ratios) == expected


@pytest.mark.quick
def test_bad_ratio_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"ratios must lie in \[0, 1\]"):
        deferred_k(3, [0.5, 1.5])


@pytest.mark.quick
def test_masks_keep_exactly_k_largest_and_are_nested() -> None:
    torch.manual_seed(0)
    a0 = torch.randn(7, 5, 5)
    ks = deferred_k(5, (0.33, 0.66, 1.0))
    masks = hierarchical_masks(a0, ks)
    assert masks.shape == (7, 3, 5, 5)
    assert masks.flatten(-2).sum(-1).tolist() == [ks] * 7
    assert (masks[:, 1] >= masks[:, 0]).all() and (masks[:, 2] >= masks[:, 1]).all()
    for b in range(7):  # the kept entries are the k largest scores
        for layer, k in enumerate(ks):
            kept = a0[b].flatten()[masks[b, layer].flatten().bool()]
            dropped = a0[b].flatten()[~masks[b, layer].flatten().bool()]
            assert kept.numel() == k
            if k and dropped.numel():
                assert kept.min() > dropped.max()


@pytest.mark.quick
def test_model_masks_per_layer_count_exact_k(tiny_fmap, tiny_batch) -> None:
    batch, _ = tiny_batch
    model = make(tiny_fmap, windows=[2, 4], ratios=[0.33, 0.66, 1.0])
    n = len(tiny_fmap.input_names)
    for g, branch, masks in zip([2, 4], model.branches, model.dynamic_masks(batch), strict=True):
        m = math.ceil(n / g)
        ks = [math.floor(Fraction(str(r)) * m * m) for r in (0.33, 0.66, 1.0)]
        assert branch.ks == ks
        assert masks.shape == (len(next(iter(batch.values()))), 3, m, m)
        assert (masks.flatten(-2).sum(-1) == torch.tensor(ks, dtype=masks.dtype)).all()


@pytest.mark.quick
def test_straight_through_masks_are_exact_in_forward_and_carry_gradient() -> None:
    torch.manual_seed(0)
    a0 = torch.randn(4, 3, 3, requires_grad=True)
    ks = deferred_k(3, (0.33, 0.66, 1.0))
    hard = hierarchical_masks(a0.detach(), ks)
    ste = hierarchical_masks(a0, ks, straight_through=True)
    assert torch.equal(ste, hard)
    (ste * torch.randn_like(ste)).sum().backward()
    assert a0.grad is not None and a0.grad.abs().sum() > 0


# -- grouping ---------------------------------------------------------------------------------
@pytest.mark.quick
@pytest.mark.parametrize(("n", "g", "m"), [(10, 2, 5), (10, 4, 3), (11, 4, 3), (3, 4, 1), (7, 1, 7)])
def test_grouping_shapes_and_zero_padding(n: int, g: int, m: int) -> None:
    x = torch.randn(6, n, 5) + 10.0  # never zero
    grouped = group_tokens(x, g)
    assert group_count(n, g) == m
    assert grouped.shape == (6, m, g * 5)
    pad = m * g - n
    flat = grouped.reshape(6, m * g, 5)
    assert torch.equal(flat[:, :n], x)  # consecutive features, in order
    if pad:
        assert (flat[:, n:] == 0).all()
    proj = GroupProjection(n, 5, g, 12)
    assert proj(x).shape == (6, m, 12)


@pytest.mark.quick
def test_projection_is_tokenwise() -> None:
    torch.manual_seed(0)
    proj = GroupProjection(10, 4, 2, 6)
    x = torch.randn(3, 10, 4)
    before = proj(x)
    with torch.no_grad():
        proj.proj.weight[1] += 1.0  # only group 1's weights
    after = proj(x)
    changed = (after - before).abs().sum(dim=(0, 2)) > 0
    assert changed.tolist() == [False, True, False, False, False]


# -- masked pairs contribute nothing ------------------------------------------------------------
@pytest.mark.quick
@pytest.mark.parametrize("attention", ["softmax", "raw"])
def test_static_masked_pair_does_not_reach_layer1_output(tiny_fmap, tiny_batch, attention: str) -> None:
    batch, _ = tiny_batch
    batch = {k: v[:8] for k, v in batch.items()}
    model = make(tiny_fmap, windows=[2], attention=attention, mask_mode="static").eval()
    branch = model.branches[0]
    m = branch.groups
    gen = torch.Generator().manual_seed(3)
    layer1 = (torch.rand(m, m, generator=gen) < 0.5).float()
    layer1.fill_diagonal_(1.0)
    masks = torch.stack([layer1, torch.ones(m, m), torch.ones(m, m)])
    model.set_static_masks([masks])

    captured: dict[str, torch.Tensor] = {}
    perturb: dict[str, int] = {}

    def on_group(_mod, _inp, out):  # perturb group token j of X0 for every layer downstream
        if "j" in perturb:
            out = out.clone()
            out[:, perturb["j"]] += 5.0
        return out

    branch.group.register_forward_hook(on_group)
    branch.layers[0].register_forward_hook(lambda _m, _i, out: captured.__setitem__("out", out))
    with torch.no_grad():
        model(batch)
        base = captured["out"].clone()
        checked_masked = checked_kept = 0
        for j in range(m):
            perturb["j"] = j
            model(batch)
            out = captured["out"]
            for i in range(m):
                if i == j:
                    continue
                moved = (out[:, i] - base[:, i]).abs().max().item()
                if layer1[i, j] == 0:
                    assert moved == 0.0, f"masked pair ({i}, {j}) changed token {i}"
                    checked_masked += 1
                else:
                    assert moved > 1e-6, f"kept pair ({i}, {j}) had no effect: the test would prove nothing"
                    checked_kept += 1
    assert checked_masked and checked_kept


@pytest.mark.quick
@pytest.mark.parametrize("training", [False, True])
def test_fully_masked_rows_attend_to_nothing(training: bool) -> None:
    """An all-zero mask: Z = 0 (no NaN from an empty softmax), so the layer is LN(PFFN(LN(X)) + LN(X))."""
    torch.manual_seed(0)
    layer = DeferredLayer(3, 8).train(training)
    x = torch.randn(2, 3, 8)
    out = layer(x, torch.zeros(3, 3))
    z_hat = layer.norm1(x)
    torch.testing.assert_close(out, layer.norm2(layer.ffn(z_hat) + z_hat), rtol=0, atol=1e-6)


@pytest.mark.quick
@pytest.mark.parametrize("heads", [1, 2])
def test_inference_scores_fold_the_key_projection_into_the_query(heads: int) -> None:
    """Eval mode computes one head's scores as x (Wqᵀ Wk / √d) xᵀ (one projection fewer in the
    exported graph); the values are the two-projection scores of training mode."""
    torch.manual_seed(0)
    layer = DeferredLayer(5, 8, heads=heads)
    x = torch.randn(4, 5, 8)
    trained = layer.train().head_scores(x)
    served = layer.eval().head_scores(x)
    assert served.shape == trained.shape
    torch.testing.assert_close(served, trained, rtol=1e-5, atol=1e-6)
    assert not torch.equal(served, torch.zeros_like(served))
