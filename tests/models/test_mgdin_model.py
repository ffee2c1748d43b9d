"""The MGDIN model: ablation flags, gradients to every parameter (A0 included), static == dynamic
when the masks coincide, static masks in the state dict, tracing / ONNX export in both mask modes."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from mgdin_small import make


def bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)


# -- ablations ----------------------------------------------------------------------------------
@pytest.mark.quick
def test_wo_mg_keeps_only_the_first_window(tiny_fmap) -> None:
    full = make(tiny_fmap, windows=[2, 4])
    single = make(tiny_fmap, windows=[2, 4], multi_granularity=False)
    assert [b.granularity for b in full.branches] == [2, 4]
    assert [b.granularity for b in single.branches] == [2]
    assert single.branches[0].ks == full.branches[0].ks
    # the window-2 branch and the embeddings are the same shapes; only branch 1 and the MLP input differ
    fs, ss = full.state_dict(), single.state_dict()
    for key, value in ss.items():
        if not key.startswith("mlp.net.0."):
            assert fs[key].shape == value.shape, key
    assert {k for k in fs if k not in ss and not k.startswith("branches.1.")} == set()
    assert full.mlp.net[0].in_features == 2 * single.mlp.net[0].in_features


@pytest.mark.quick
@pytest.mark.parametrize("a0_mode", ["layer1", "ste"])
def test_wo_di_is_all_ones_masks_and_nothing_else(tiny_fmap, tiny_batch, a0_mode: str) -> None:
    batch, _ = tiny_batch
    full = make(tiny_fmap, a0_mode=a0_mode).eval()
    wo_di = make(tiny_fmap, a0_mode=a0_mode, deferred=False).eval()
    all_open = make(tiny_fmap, a0_mode=a0_mode, ratios=[1.0, 1.0, 1.0]).eval()
    extra = set(full.state_dict()) - set(wo_di.state_dict())
    assert set(wo_di.state_dict()) <= set(full.state_dict())
    assert all(".a0_score." in k for k in extra) and (bool(extra) == (a0_mode == "ste"))
    wo_di.load_state_dict(full.state_dict(), strict=False)
    all_open.load_state_dict(full.state_dict())
    for masks in wo_di.dynamic_masks(batch):
        assert (masks == 1).all()
    with torch.no_grad():
        torch.testing.assert_close(wo_di(batch), all_open(batch), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(wo_di(batch), full(batch), atol=1e-5), "deferral changed nothing"


@pytest.mark.quick
def test_bad_config_is_a_clear_error(tiny_fmap) -> None:
    with pytest.raises(ValueError, match="ratios has 2 entries but layers=3"):
        make(tiny_fmap, ratios=[0.5, 1.0])
    with pytest.raises(ValueError, match="mask_mode"):
        make(tiny_fmap, mask_mode="sometimes")
    with pytest.raises(ValueError, match="bad parameters for model 'mgdin'"):
        make(tiny_fmap, no_such_param=1)


@pytest.mark.quick
def test_ratios_default_to_l_over_L(tiny_fmap) -> None:
    model = make(tiny_fmap, layers=4, ratios=None, windows=[2])
    m = model.branches[0].groups
    assert model.branches[0].ks == [math.floor(Fraction(i, 4) * m * m) for i in range(1, 5)]


@pytest.mark.quick
def test_features_are_ordered_densest_first(tiny_fmap) -> None:
    model = make(tiny_fmap)
    assert model.tokens.order == tiny_fmap.density_order()


# -- gradients ----------------------------------------------------------------------------------
@pytest.mark.quick
@pytest.mark.parametrize("params", [
    {"a0_mode": "layer1", "attention": "softmax"},
    {"a0_mode": "layer1", "attention": "raw"},
    {"a0_mode": "ste", "attention": "softmax"},
    {"a0_mode": "ste", "attention": "raw"},
    {"heads": 2, "pooling": "flatten", "input_norm": True},
    {"windows": (1, 2), "head_embeddings": True},
    {"input_norm": "batch"},
])
def test_every_parameter_gets_a_gradient(tiny_fmap, tiny_batch, params) -> None:
    batch, labels = tiny_batch
    model = make(tiny_fmap, **params)
    bce(model(batch), labels).backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"parameters without gradient: {dead}"
    if params.get("a0_mode") == "ste":
        assert any(".a0_score." in n for n, _ in model.named_parameters())


@pytest.mark.quick
def test_batch_input_norm_standardises_x0_per_group_channel(tiny_fmap, tiny_batch) -> None:
    """input_norm="batch": in training each (group, channel) of X0 has batch mean 0 and variance 1,
    whatever the (tiny) embedding scale and the projection bias; at eval it is a fixed affine map."""
    batch, _ = tiny_batch
    model = make(tiny_fmap, input_norm="batch", windows=(2,))
    with torch.no_grad():
        for table in model.tokens.embedding.tables.values():
            table.weight.normal_(0.0, 0.1)  # signal variance well above BatchNorm's eps (1e-5)
        model.branches[0].group.proj.bias.add_(5.0)  # a bias that dominates X0
    model.train()
    x0 = model.branches[0].x0(model.tokens(batch))
    assert x0.mean(0).abs().max() < 1e-3
    var = x0.var(0, unbiased=False)
    varying = var > 1e-3  # constant channels (a group of zero padding) stay at 0
    assert varying.float().mean() > 0.5
    assert var[varying].median() > 0.97 and var[varying].max() < 1.0 + 1e-4  # eps keeps it just below 1
    model.eval()
    a, b = model(batch), model(batch)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="input_norm"):
        make(tiny_fmap, input_norm="group")


@pytest.mark.quick
@pytest.mark.parametrize("detach", [True, False])
def test_ste_surrogate_reaches_x0_only_when_asked(tiny_fmap, tiny_batch, detach: bool) -> None:
    batch, _ = tiny_batch
    model = make(tiny_fmap, a0_mode="ste", ste_detach_input=detach)
    branch = model.branches[0]
    x0 = branch.x0(model.tokens(batch)).detach().requires_grad_(True)
    a0 = branch.a0(x0, branch.layers[0].scores(x0))
    a0.pow(2).sum().backward()
    assert branch.a0_score.q.weight.grad.abs().sum() > 0  # Q0/K0 always learn from A0
    reached = x0.grad is not None and bool(x0.grad.abs().sum() > 0)
    assert reached is not detach


# -- static vs dynamic ----------------------------------------------------------------------------
@pytest.mark.quick
@pytest.mark.parametrize("a0_mode", ["layer1", "ste"])
def test_static_equals_dynamic_when_masks_coincide(tiny_fmap, tiny_batch, a0_mode: str) -> None:
    batch, _ = tiny_batch
    dynamic = make(tiny_fmap, a0_mode=a0_mode).eval()
    static = make(tiny_fmap, a0_mode=a0_mode, mask_mode="static").eval()
    static.load_state_dict(dynamic.state_dict())
    with torch.no_grad():
        dyn_out = dynamic(batch)
        per_sample = dynamic.dynamic_masks(batch)
        differ = 0
        for i in range(6):
            static.set_static_masks([masks[i] for masks in per_sample])
            one = {k: v[i : i + 1] for k, v in batch.items()}
            torch.testing.assert_close(static(one), dyn_out[i : i + 1], rtol=0, atol=1e-6)
            differ += int(any(not torch.equal(masks[i], masks[0]) for masks in per_sample))
        assert differ, "all samples had the same masks: the comparison would be trivial"


@pytest.mark.quick
def test_uncalibrated_static_model_refuses_to_run(tiny_fmap, tiny_batch) -> None:
    batch, _ = tiny_batch
    model = make(tiny_fmap, mask_mode="static")
    with pytest.raises(RuntimeError, match="never calibrated"):
        model(batch)


@pytest.mark.quick
def test_static_masks_travel_in_the_state_dict(tiny_fmap, tiny_batch) -> None:
    batch, _ = tiny_batch
    src = make(tiny_fmap, mask_mode="static").eval()
    src.set_static_masks(src.masks_from_a0([a.mean(0) for a in src.a0_scores(batch)]))
    dst = make(tiny_fmap, seed=1, mask_mode="static").eval()
    dst.load_state_dict(src.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(dst(batch), src(batch), rtol=0, atol=0)



@pytest.mark.quick
def test_layer_keeping_every_pair_runs_unmasked_and_rejects_a_partial_static_mask(tiny_fmap, tiny_batch) -> None:
    batch, _ = tiny_batch
    model = make(tiny_fmap, windows=[2], mask_mode="static").eval()
    branch = model.branches[0]
    m = branch.groups
    assert branch.ks[-1] == m * m  # ratio 1.0
    masks = torch.ones(len(branch.ks), m, m)
    masks[-1, 0, 1] = 0.0
    with pytest.raises(ValueError, match="must be all ones"):
        model.set_static_masks([masks])
    # only the layers that drop pairs get a mask; the last one runs as standard attention
    masks[-1] = 1.0
    masks[0].fill_(0.0)
    masks[0].fill_diagonal_(1.0)
    model.set_static_masks([masks])
    calls = []
    hooks = [layer.register_forward_pre_hook(lambda mod, args: calls.append(args[1] is None))
             for layer in branch.layers]
    with torch.no_grad():
        model(batch)
    for h in hooks:
        h.remove()
    assert calls == [False, False, True]


# -- tracing and ONNX ------------------------------------------------------------------------------
def _static_model(tiny_fmap, batch, **params):
    model = make(tiny_fmap, mask_mode="static", **params).eval()
    model.set_static_masks(model.masks_from_a0([a.mean(0) for a in model.a0_scores(batch)]))
    return model


@pytest.mark.quick
@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_traces_and_matches_eager(tiny_fmap, tiny_batch, mode: str) -> None:
    batch, _ = tiny_batch
    model = _static_model(tiny_fmap, batch) if mode == "static" else make(tiny_fmap).eval()
    with torch.no_grad():
        traced = torch.jit.trace(model, example_kwarg_inputs={"batch": batch}, strict=False)
        small = {k: v[:5] for k, v in batch.items()}
        torch.testing.assert_close(traced(small), model(small), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "a0_mode"), [("dynamic", "layer1"), ("dynamic", "ste"), ("static", "layer1")])
def test_onnx_export_matches_onnxruntime(tiny_fmap, tiny_batch, tmp_path, mode: str, a0_mode: str) -> None:
    ort = pytest.importorskip("onnxruntime")
    batch, _ = tiny_batch
    model = _static_model(tiny_fmap, batch, a0_mode=a0_mode) if mode == "static" else make(tiny_fmap, a0_mode=a0_mode)
    model.eval()
    dim = torch.export.Dim("batch", min=1)
    path = tmp_path / "mgdin.onnx"
    torch.onnx.export(model, (), kwargs={"batch": batch}, f=str(path), dynamo=True, opset_version=18,
                      dynamic_shapes={"batch": {k: {0: dim} for k in batch}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    small = {k: v[:7] for k, v in batch.items()}  # another batch size than exported with
    feeds = {i.name: small[i.name.removeprefix("batch_")].numpy() for i in session.get_inputs()}
    got = session.run(None, feeds)[0]
    with torch.no_grad():
        want = model(small).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
