"""MGDIN's mechanism: exact top-k per layer, masked pairs contribute nothing, grouping with
padding, ablation flags, gradients to every parameter (A0 included), static == dynamic when
the masks coincide, tracing / ONNX export in both mask modes, calibrate round trip."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from ctrserve.models.layers.deferred import DeferredLayer, deferred_k, hierarchical_masks
from ctrserve.models.layers.grouping import GroupProjection, group_count, group_tokens
from ctrserve.models.registry import build_model

SMALL = {"embedding_dim": 8, "model_dim": 8, "hidden": [16], "dropout": 0.0, "batch_norm": False}


def make(fmap, seed: int = 0, **params):
    torch.manual_seed(seed)
    return build_model("mgdin", fmap, {**SMALL, **params})


def bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)


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


# -- calibrate round trip -----------------------------------------------------------------------------
@pytest.mark.slow
def test_calibrate_round_trip_through_load_run(tiny_prepared, tmp_path) -> None:
    from ctrserve.contract.prepared import load_split
    from ctrserve.models.calibrate import calibrate_run
    from ctrserve.models.train.config import RunConfig, TrainSettings
    from ctrserve.models.train.trainer import evaluate, load_run, train

    cfg = RunConfig(model="mgdin", dataset="synthetic", seed=7, params=dict(SMALL),
                    train=TrainSettings(batch_size=256, max_epochs=1, max_train_rows=600, threads=1))
    result = train(cfg, tiny_prepared, tmp_path / "runs", progress=False)
    new_dir, metrics, info = calibrate_run(result.run_dir, rows=300, command="test")

    assert new_dir != result.run_dir and new_dir.parent.parent.parent == tmp_path / "runs"
    cal = json.loads((new_dir / "calibration.json").read_text())
    assert cal["rows"] == 300 and cal["seed"] == 7 and cal["windows"] == info["windows"]
    for w in cal["windows"]:
        m = w["groups"]
        assert w["k"] == deferred_k(m, (0.33, 0.66, 1.0))
        assert [np.sum(layer) for layer in w["masks"]] == w["k"]
        assert w["mask_density"] == [k / (m * m) for k in w["k"]]
        # the share of each layer's per-sample pairs the static mask keeps: all of them where k = m²
        assert all(0.0 <= o <= 1.0 for o in w["overlap_with_dynamic"]) and w["overlap_with_dynamic"][-1] == 1.0
    assert metrics["variant"] == "static_masks" and metrics["seed"] == 7
    # the serving choice follows the valid split's AUC cost of static masks against the budget
    delta = cal["static_valid"]["auc"] - cal["dynamic_valid"]["auc"]
    assert cal["valid_auc_delta_static_minus_dynamic"] == pytest.approx(delta)
    assert cal["serving_mode"] == ("static" if -delta <= 0.002 else "dynamic")
    q = cal["test_prediction_shift"]
    assert 0.0 <= q["p50"] <= q["p99"] <= q["max"] <= 1.0 and q["mean"] <= q["max"]

    cfg2, fmap, model = load_run(new_dir)
    assert cfg2.variant == "static_masks" and cfg2.seed == 7 and cfg2.params["mask_mode"] == "static"
    assert model.mask_mode == "static" and bool(model.masks_calibrated)
    for w, branch in zip(cal["windows"], model.branches, strict=True):
        assert branch.static_masks.to(torch.int64).tolist() == w["masks"]
    test = load_split(tiny_prepared, "test")
    again = evaluate(model, test, fmap)
    assert again["auc"] == pytest.approx(metrics["auc"], abs=1e-9)
    assert again["auc"] == pytest.approx(cal["static_test"]["auc"], abs=1e-9)
    # the source run is untouched and still dynamic
    _, _, source = load_run(result.run_dir)
    assert source.mask_mode == "dynamic" and not bool(source.masks_calibrated)


@pytest.mark.slow
def test_finetuning_with_static_masks_keeps_them_and_the_epoch_best_on_valid(tiny_prepared, tmp_path) -> None:
    from ctrserve.models.calibrate import calibrate_run
    from ctrserve.models.train.config import RunConfig, TrainSettings
    from ctrserve.models.train.trainer import load_run, train

    cfg = RunConfig(model="mgdin", dataset="synthetic", seed=7, params=dict(SMALL),
                    train=TrainSettings(batch_size=256, max_epochs=1, max_train_rows=600, threads=1, lr=3e-3))
    result = train(cfg, tiny_prepared, tmp_path / "runs", progress=False)
    plain_dir, _, plain = calibrate_run(result.run_dir, rows=300)
    tuned_dir, metrics, info = calibrate_run(result.run_dir, rows=300, finetune_epochs=3)
    f = info["finetune"]
    assert len(f["valid_auc_by_epoch"]) == 4 and f["lr"] == pytest.approx(3e-4)
    # epoch 0 is the calibrated model as it was: the plain calibration's valid AUC
    assert f["valid_auc_by_epoch"][0] == pytest.approx(plain["static_valid"]["auc"], abs=1e-9)
    best = max(range(4), key=lambda e: (f["valid_auc_by_epoch"][e], -e))
    assert f["chosen_epoch"] == best
    assert info["static_valid"]["auc"] == pytest.approx(f["valid_auc_by_epoch"][best], abs=1e-9)
    assert metrics["variant"] == "static_masks_finetuned" and "fine-tuned" in metrics["notes"]
    # the masks are the calibrated ones: fine-tuning moves weights, never the masks
    _, _, before = load_run(plain_dir)
    _, _, after = load_run(tuned_dir)
    for b, a in zip(before.branches, after.branches, strict=True):
        assert torch.equal(b.static_masks, a.static_masks)
    moved = any(not torch.equal(p, q) for p, q in zip(before.parameters(), after.parameters(), strict=True))
    assert moved == (best > 0)


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
