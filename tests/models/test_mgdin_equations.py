"""MGDIN's interaction layer against the paper's equations written out literally, one sample and
one entry at a time in float64 numpy (/work/shared/papers/mgdin.md, section 3.2):

    (3) A0 = (X0 Q0)(X0 K0)ᵀ
    (4) Z_l = [((X_{l-1} Q_l)(X_{l-1} K_l)ᵀ) ⊙ I(A0 ∈ Top-k_l)] X_{l-1} V_l
    (5) k_l = floor(l / L · n²)
    (6) Ẑ_l = LN(Z_l + X_{l-1})
    (7) X_l = LN(PFFN(Ẑ_l) + Ẑ_l)

Nothing here calls the code under test to build the expected value: the Top-k indicator is "fewer
than k entries of A0 are larger", LayerNorm and the per-token FFN are their textbook formulas.
The implementation's documented choices (docs/models/mgdin.md) are written in as such: scores are
scaled by 1/sqrt(d); ``attention="raw"`` is eq. 4 exactly (masked scores times values), the
default ``"softmax"`` normalises over the kept pairs instead; ``a0_mode="ste"`` has eq. 3's own
Q0/K0, ``"layer1"`` takes layer 1's Q/K as Q0/K0.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ctrserve.models.zoo.mgdin import DeferredBranch

pytestmark = pytest.mark.quick


def w(linear: torch.nn.Module) -> np.ndarray:
    """An ``nn.Linear`` weight as the paper's right-multiplied matrix (x W)."""
    return linear.weight.detach().double().numpy().T


def top_k(a0: np.ndarray, k: int) -> np.ndarray:
    """I(A0[i, j] ∈ Top-k): fewer than k entries of A0 are larger than A0[i, j]."""
    m = a0.shape[0]
    return np.array([[float((a0 > a0[i, j]).sum() < k) for j in range(m)] for i in range(m)])


def layer_norm(x: np.ndarray, norm: torch.nn.LayerNorm) -> np.ndarray:
    gamma, beta = norm.weight.detach().double().numpy(), norm.bias.detach().double().numpy()
    return np.stack([(r - r.mean()) / math.sqrt(r.var() + norm.eps) * gamma + beta for r in x])


def gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def pffn(z: np.ndarray, ffn: torch.nn.Module) -> np.ndarray:
    """Per-token FFN: token i has its own W1_i, b1_i, W2_i, b2_i."""
    p = {n: t.detach().double().numpy() for n, t in ffn.named_parameters()}
    return np.stack([gelu(z[i] @ p["up.weight"][i] + p["up.bias"][i]) @ p["down.weight"][i] + p["down.bias"][i]
                     for i in range(z.shape[0])])


def eq4(x: np.ndarray, layer: torch.nn.Module, indicator: np.ndarray, softmax: bool) -> np.ndarray:
    """Z for one sample ``x [m, d]``: entry by entry, scores scaled by 1/sqrt(d)."""
    m, d = x.shape
    xq, xk, xv = x @ w(layer.q), x @ w(layer.k), x @ w(layer.v)
    score = np.array([[xq[i] @ xk[j] for j in range(m)] for i in range(m)]) / math.sqrt(d)
    if softmax:  # normalised over the kept pairs only; a row with none kept gives zeros
        e = np.where(indicator > 0, np.exp(score - score.max()), 0.0)
        weight = e / np.maximum(e.sum(axis=1, keepdims=True), 1e-300)
    else:
        weight = score * indicator
    return np.stack([sum(weight[i, j] * xv[j] for j in range(m)) for i in range(m)])


def eqs_4_to_7(x: np.ndarray, layer: torch.nn.Module, indicator: np.ndarray, softmax: bool) -> np.ndarray:
    z_hat = layer_norm(eq4(x, layer, indicator, softmax) + x, layer.norm1)  # (6)
    return layer_norm(pffn(z_hat, layer.ffn) + z_hat, layer.norm2)  # (7)


def _randomise(module: torch.nn.Module) -> None:
    """Non-trivial LayerNorm affines and biases (the defaults 1 and 0 would hide their use)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn_like(p))


@pytest.mark.parametrize("attention", ["raw", "softmax"])
@pytest.mark.parametrize("a0_mode", ["ste", "layer1"])
def test_branch_is_eqs_3_to_7(attention: str, a0_mode: str) -> None:
    torch.manual_seed(0)
    m, d, layers = 4, 6, 3
    branch = DeferredBranch(num_tokens=m, embedding_dim=d, granularity=1, model_dim=d, ratios=[1 / 3, 2 / 3, 1.0],
                            heads=1, ffn_dim=5, attention=attention, a0_mode=a0_mode, deferred=True, dropout=0.0,
                            ste_temperature=1.0).eval()
    _randomise(branch)
    tokens = torch.randn(3, m, d)
    with torch.no_grad():
        got = branch(tokens, "dynamic").double().numpy()
        x0_all = branch.x0(tokens).double().numpy()  # eq. 2's grouping is tested in test_mgdin.py
    ks = [math.floor(i / layers * m * m) for i in range(1, layers + 1)]  # (5)
    assert branch.ks == ks == [5, 10, 16]
    q0, k0 = (branch.a0_score.q, branch.a0_score.k) if a0_mode == "ste" else (branch.layers[0].q, branch.layers[0].k)
    for b in range(len(tokens)):
        x = x0 = x0_all[b]
        a0 = (x0 @ w(q0)) @ (x0 @ w(k0)).T / math.sqrt(d)  # (3)
        for layer, k in zip(branch.layers, ks, strict=True):
            x = eqs_4_to_7(x, layer, top_k(a0, k), attention == "softmax")
        np.testing.assert_allclose(got[b], x, rtol=0, atol=2e-5)


def test_layer_with_a_given_indicator_is_eqs_4_to_7() -> None:
    """A single layer with a hand-made indicator (a row with nothing kept included): the masked
    pairs contribute nothing, exactly as eq. 4's product with the indicator says."""
    from ctrserve.models.layers.deferred import DeferredLayer

    torch.manual_seed(1)
    layer = DeferredLayer(5, 4, ffn_dim=3, attention="raw").eval()
    _randomise(layer)
    indicator = (torch.rand(5, 5) < 0.5).double()
    indicator[2] = 0.0
    x = torch.randn(2, 5, 4)
    with torch.no_grad():
        got = layer(x, indicator.float()).double().numpy()
    for b in range(2):
        want = eqs_4_to_7(x[b].double().numpy(), layer, indicator.numpy(), softmax=False)
        np.testing.assert_allclose(got[b], want, rtol=0, atol=2e-5)
