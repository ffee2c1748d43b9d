"""DLF (models/zoo/dlf.py): gate lower bound, each ablation removes exactly its block, gradients
reach every parameter, and the model traces and exports to ONNX (dynamic batch, ORT parity)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from export_checks import check_onnx, check_trace
from torch import Tensor, nn

from ctrserve.models.layers.naf import BlockAttentionLayer
from ctrserve.models.layers.rli import FactorizedInteraction, GatedResidual
from ctrserve.models.registry import build_model

pytestmark = pytest.mark.quick

SMALL = {"embedding_dim": 4, "num_layers": 2, "attention_layers": 2, "rank": 3, "block_tokens": 3}


def _build(fmap, **over) -> nn.Module:
    torch.manual_seed(0)
    return build_model("dlf", fmap, {**SMALL, **over})


def test_gate_lower_bound_eps() -> None:
    torch.manual_seed(0)
    res = GatedResidual(dim=6, eps=0.05)
    with torch.no_grad():
        res.gate.weight.normal_(std=3.0)
        res.gate.bias.fill_(-1.0)  # push many pre-activations below eps
    r = torch.randn(32, 5, 6)
    pre = res.gate(r)
    g = res.gate_values(r)
    assert (pre < 0.05).any() and (pre > 0.05).any()
    assert g.min().item() >= 0.05
    torch.testing.assert_close(g, torch.where(pre < 0.05, torch.full_like(pre, 0.05), pre))
    torch.testing.assert_close(res(r), g * r)


def test_gate_eps_must_be_positive() -> None:
    with pytest.raises(ValueError, match="gate_eps must be > 0"):
        GatedResidual(dim=4, eps=0.0)


@pytest.mark.parametrize("scale", [1.0, 300.0])
def test_block_attention_matches_literal_equations(scale: float) -> None:
    """The batched NAF layer equals eqs. 11-13 written per block with per-pair softmaxes, also when
    the blocks' scores lie far apart (a shared softmax shift would underflow a block to 0/0)."""
    torch.manual_seed(0)
    m, n, d = 3, 5, 4
    layer = BlockAttentionLayer(m, d)
    z = torch.randn(2, m, n, d) * scale
    qkv = torch.einsum("bmnd,mde->bmne", z, layer.w_qkv) + layer.b_qkv
    q, k, v = qkv.split(d, dim=-1)

    def att(i: int, x: int) -> Tensor:
        return torch.softmax(q[:, i] @ k[:, x].transpose(1, 2) / d**0.5, dim=-1) @ v[:, x]

    expected = []
    for i in range(m):
        others = [x for x in range(m) if x != i]
        w_c = torch.cat([layer.w_cross[i].view(m, d, d)[x] for x in others])  # W_M^C: [(M-1) d, d]
        att_c = torch.relu(torch.cat([att(i, x) for x in others], dim=-1) @ w_c + layer.b_cross[i])
        expected.append(att_c + att(i, i))
    out = layer(z)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.stack(expected, dim=1), rtol=1e-4, atol=1e-4 * scale)


def test_factorized_interaction_is_eq5() -> None:
    """Z = ReLU(W_O vec(E1 · (Elᵀ W_I)) + b) computed by hand."""
    torch.manual_seed(0)
    block = FactorizedInteraction(left_tokens=3, right_tokens=4, dim=5, rank=2, out_tokens=6)
    e1, el = torch.randn(2, 3, 5), torch.randn(2, 4, 5)
    inner = torch.stack([e1[b] @ (el[b].T @ block.w_in) for b in range(2)])  # [B, 3, 2]
    expected = torch.relu(inner.flatten(1) @ block.out.weight.T + block.out.bias).view(2, 6, 5)
    torch.testing.assert_close(block(e1, el), expected)


@pytest.mark.parametrize("over", [{}, {"input_norm": True, "implicit_hidden": [8], "head_hidden": [8]}])
def test_forward_backward_reaches_every_parameter(over: dict, tiny_fmap, tiny_batch) -> None:
    batch, labels = tiny_batch
    model = _build(tiny_fmap, **over)
    logits = model(batch)
    assert logits.shape == labels.shape and torch.isfinite(logits).all()
    torch.nn.functional.binary_cross_entropy_with_logits(logits, labels).backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"parameters without gradient: {dead}"


BLOCK_OF_FLAG = {"gate": ".residual.gate.", "rli": ".blocks.low.", "naf": ".naf."}


@pytest.mark.parametrize("flag", sorted(BLOCK_OF_FLAG))
def test_ablation_removes_exactly_its_block(flag: str, tiny_fmap, tiny_batch) -> None:
    batch, _ = tiny_batch
    full, ablated = _build(tiny_fmap), _build(tiny_fmap, **{flag: False})
    full_names = {n for n, _ in full.named_parameters()}
    ablated_names = {n for n, _ in ablated.named_parameters()}
    block = {n for n in full_names if BLOCK_OF_FLAG[flag] in n}
    assert block, f"the full model has no {flag} parameters"
    assert ablated_names == full_names - block
    assert not any(BLOCK_OF_FLAG[flag].strip(".") in n for n, _ in ablated.named_modules())
    with torch.no_grad():
        assert not torch.allclose(full.eval()(batch), ablated.eval()(batch))


def test_gate_at_identity_equals_plain_residual(tiny_fmap, tiny_batch) -> None:
    """W_gate = 0, bias = 1 makes the gate exactly 1: the full model then equals the w/o-gate model."""
    batch, _ = tiny_batch
    full, plain = _build(tiny_fmap).eval(), _build(tiny_fmap, gate=False).eval()
    with torch.no_grad():
        for layer in full.layers:
            layer.residual.gate.weight.zero_()
            layer.residual.gate.bias.fill_(1.0)
    missing, unexpected = plain.load_state_dict(full.state_dict(), strict=False)
    assert not missing and all(".residual.gate." in k for k in unexpected)
    with torch.no_grad():
        torch.testing.assert_close(full(batch), plain(batch))


def test_rli_false_and_naf_false_token_counts(tiny_fmap) -> None:
    n = SMALL["block_tokens"]
    assert _build(tiny_fmap).layers[-1].out_tokens == 4 * n  # [Z_L; Z_C; Z_D; Att]
    assert _build(tiny_fmap, naf=False).layers[-1].out_tokens == 3 * n
    assert _build(tiny_fmap, rli=False).layers[-1].out_tokens == 3 * n
    assert _build(tiny_fmap, rli=False, naf=False).layers[-1].out_tokens == 2 * n


def test_bad_parameters_are_clear_errors(tiny_fmap) -> None:
    with pytest.raises(ValueError, match="num_layers must be >= 1"):
        _build(tiny_fmap, num_layers=0)
    with pytest.raises(ValueError, match="attention_layers must be >= 1"):
        _build(tiny_fmap, attention_layers=0)


def test_traces_and_matches_eager(tiny_fmap, tiny_batch) -> None:
    check_trace(_build(tiny_fmap), tiny_batch[0])


def test_onnx_export_dynamic_batch_matches_eager(tiny_fmap, tiny_batch, tmp_path: Path) -> None:
    check_onnx(_build(tiny_fmap, num_layers=1, attention_layers=1), tiny_batch[0], tmp_path / "dlf.onnx")
