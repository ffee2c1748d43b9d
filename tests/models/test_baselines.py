"""Every registered baseline: forward shape, finite output, backward reaches every parameter,
and the model traces (no data-dependent Python control flow in forward)."""

from __future__ import annotations

import pytest
import torch

from ctrserve.models.registry import build_model, list_models

BASELINES = ["lr", "fm", "dnn", "wide_deep", "deepfm", "dcnv2", "autoint"]
SMALL = {"embedding_dim": 8}
SMALL_DEEP = {"embedding_dim": 8, "hidden": [16, 16]}
PARAMS = {"lr": {}, "fm": SMALL, "dnn": SMALL_DEEP, "wide_deep": SMALL_DEEP, "deepfm": SMALL_DEEP,
          "dcnv2": {**SMALL_DEEP, "cross_layers": 2},
          "autoint": {"embedding_dim": 8, "attention_layers": 2, "attention_dim": 8, "heads": 2, "hidden": [16]}}

pytestmark = pytest.mark.quick


def test_all_baselines_registered() -> None:
    assert set(BASELINES) <= set(list_models())


@pytest.mark.parametrize("name", BASELINES)
def test_forward_backward(name: str, tiny_fmap, tiny_batch) -> None:
    torch.manual_seed(0)
    batch, labels = tiny_batch
    model = build_model(name, tiny_fmap, PARAMS[name])
    logits = model(batch)
    assert logits.shape == labels.shape
    assert torch.isfinite(logits).all()
    torch.nn.functional.binary_cross_entropy_with_logits(logits, labels).backward()
    # a gradient that exists but is all zeros is as dead as none (a detached or multiplied-away path)
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"parameters without gradient: {dead}"


@pytest.mark.parametrize("name", BASELINES)
def test_traces_and_matches_eager(name: str, tiny_fmap, tiny_batch) -> None:
    batch, _ = tiny_batch
    model = build_model(name, tiny_fmap, PARAMS[name]).eval()
    with torch.no_grad():
        traced = torch.jit.trace(model, example_kwarg_inputs={"batch": batch}, strict=False)
        small = {k: v[:5] for k, v in batch.items()}  # a different batch size than traced
        torch.testing.assert_close(traced(small), model(small), rtol=1e-5, atol=1e-6)


def test_unknown_model_is_a_clear_error(tiny_fmap) -> None:
    with pytest.raises(KeyError, match="unknown model 'nope'.*registered"):
        build_model("nope", tiny_fmap)


def test_bad_parameter_is_a_clear_error(tiny_fmap) -> None:
    with pytest.raises(ValueError, match="bad parameters for model 'dnn'"):
        build_model("dnn", tiny_fmap, {"no_such_param": 1})
