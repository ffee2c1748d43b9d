"""``bench fusions``' candidates compute the served map: the windows fused into one stack, and a
layer's attention as ORT's MultiHeadAttention, both equal to the served model's (so their timings
compare like with like; the command also refuses a variant whose ORT outputs differ)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ctrserve.loadtests import bench_fusions
from ctrserve.models.registry import build_model

pytestmark = pytest.mark.quick


def _static_mgdin(tiny_fmap, batch):
    torch.manual_seed(0)
    model = build_model("mgdin", tiny_fmap, {"mask_mode": "static", "windows": [2, 4], "input_norm": True}).eval()
    with torch.no_grad():
        model.set_static_masks(model.masks_from_a0([a.mean(0) for a in model.a0_scores(batch)]))
        for p in model.parameters():  # away from the initial weights, so per-window weights differ clearly
            p.add_(0.1 * torch.randn_like(p))
    return model


def test_fused_windows_compute_the_served_stacks(tiny_fmap, tiny_batch) -> None:
    batch, _ = tiny_batch
    model = _static_mgdin(tiny_fmap, batch)
    assert len({b.groups for b in model.branches}) == 2  # windows of different sizes
    with torch.no_grad():
        tokens = model.tokens(batch)
        served = bench_fusions._served_stacks(model)(tokens)
        fused = bench_fusions._fused_stacks(model)(tokens)
    assert served.shape == (len(tokens), sum(b.groups for b in model.branches), model.branches[0].layers[0].dim)
    torch.testing.assert_close(fused, served, rtol=1e-4, atol=1e-5)


def test_multi_head_attention_node_computes_the_served_attention(tiny_fmap, tiny_batch, tmp_path) -> None:
    import onnxruntime as ort

    batch, _ = tiny_batch
    model = _static_mgdin(tiny_fmap, batch)
    branch = model.branches[0]
    mask = branch.static_masks[0].clone()
    mask[0] = 0.0  # an all-masked row: the served layer gives it zero weights, so must the node
    assert 0 < int(mask.sum()) < mask.numel() - mask.shape[1]
    with torch.no_grad():
        x0 = branch.x0(model.tokens(batch))
        served = bench_fusions._served_attention(branch.layers[0], mask)(x0).numpy()
    path = bench_fusions._mha_attention(branch.layers[0], mask.numpy(), tmp_path / "mha.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"x": x0.numpy()})[0], served, rtol=1e-4, atol=1e-5)
