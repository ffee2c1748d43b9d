"""CDNet (models/zoo/cdnet.py, models/layers/core_behaviour.py): straight-through top-k (forward uses
exactly k behaviours, backward reaches the others), the interest histogram, padding, short and empty
histories, ablations, and trace / ONNX export with a dynamic batch axis."""

from __future__ import annotations

from pathlib import Path
from unittest.mock import patch

import pytest
import torch
from export_checks import check_onnx, check_trace
from torch import nn

from ctrserve.models.layers.core_behaviour import CoreBehaviourSelector, InterestDistribution, relevance
from ctrserve.models.registry import build_model

pytestmark = pytest.mark.quick

SMALL = {"embedding_dim": 8, "k": 4, "bins": 5, "num_layers": 1, "heads": 2, "hidden": [16]}


def _build(fmap, **over) -> nn.Module:
    torch.manual_seed(0)
    return build_model("cdnet", fmap, {**SMALL, **over})


def _toy(seed: int = 0, length: int = 10, valid: int = 7, dim: int = 6):
    g = torch.Generator().manual_seed(seed)
    seq = torch.randn(2, length, dim, generator=g, requires_grad=True)
    cand = torch.randn(2, dim, generator=g)
    mask = torch.zeros(2, length, dtype=torch.bool)
    mask[0, :valid] = True
    mask[1, :length] = True
    return seq, cand, mask


def test_relevance_in_unit_interval_and_zero_on_padding() -> None:
    seq, cand, mask = _toy()
    a = relevance(cand, seq, mask)
    cos = torch.nn.functional.cosine_similarity(cand.unsqueeze(1), seq, dim=-1)
    torch.testing.assert_close(a[mask], ((cos + 1) / 2)[mask])
    assert (a[~mask] == 0).all() and a.min() >= 0 and a.max() <= 1


def test_forward_uses_exactly_the_top_k_behaviours() -> None:
    seq, cand, mask = _toy()
    a = relevance(cand, seq, mask)
    core, valid = CoreBehaviourSelector(k=3, max_len=10)(seq, a, mask)
    assert core.shape == (2, 3, 6) and valid.all()
    for b in range(2):
        ranked = torch.where(mask[b], a[b], torch.tensor(-1.0))
        top = torch.argsort(ranked, descending=True)[:3]
        torch.testing.assert_close(core[b], seq[b, top])  # exact rows, value unscaled by A


def test_backward_reaches_non_selected_behaviours_but_not_padding() -> None:
    seq, cand, mask = _toy()
    a = relevance(cand, seq, mask)
    selector = CoreBehaviourSelector(k=3, max_len=10)
    core, _ = selector(seq, a, mask)
    (core * torch.randn_like(core)).sum().backward()
    grad = seq.grad.norm(dim=-1)  # [B, L]
    ranked = torch.where(mask, a, torch.full_like(a, -1.0))
    selected = torch.zeros_like(mask)
    selected.scatter_(1, torch.topk(ranked, 3).indices, True)
    non_selected = mask & ~selected
    assert non_selected.sum() >= 10
    assert (grad[non_selected] > 0).all(), "every non-selected real behaviour must get gradient"
    assert (grad[~mask] == 0).all(), "padding must get no gradient"


def test_fewer_events_than_k_fills_invalid_zero_slots() -> None:
    seq, cand, mask = _toy(valid=2)
    a = relevance(cand, seq, mask)
    core, valid = CoreBehaviourSelector(k=4, max_len=10)(seq, a, mask)
    assert valid[0].tolist() == [True, True, False, False] and valid[1].all()
    assert (core[0, 2:] == 0).all()
    assert CoreBehaviourSelector(k=50, max_len=10).k == 10  # clamped at construction


def test_histogram_counts_match_hand_count_and_ignore_padding() -> None:
    # bins for n=5: [0, .2], (.2, .4], (.4, .6], (.6, .8], (.8, 1]
    a = torch.tensor([[0.0, 0.2, 0.21, 0.5, 0.61, 0.8, 1.0, 0.9, 0.3, 0.7]])
    mask = torch.tensor([[True] * 8 + [False] * 2])  # 0.3 and 0.7 are padding
    gid = InterestDistribution(bins=5, max_len=10, dim=4)
    counts = gid.counts(a, mask)
    assert counts.tolist() == [[2.0, 1.0, 1.0, 2.0, 2.0]]
    token, p = gid(a, mask)
    assert token.shape == (1, 4) and p.tolist() == counts.tolist()
    empty, p0 = gid(a, torch.zeros_like(mask))
    assert p0.sum() == 0 and torch.isfinite(empty).all()


def test_forward_backward_every_parameter(tiny_fmap, tiny_batch) -> None:
    batch, labels = tiny_batch
    model = _build(tiny_fmap)
    logits = model(batch)
    assert logits.shape == labels.shape and torch.isfinite(logits).all()
    torch.nn.functional.binary_cross_entropy_with_logits(logits, labels).backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None]


def test_short_and_empty_histories_give_finite_output(tiny_fmap, tiny_batch) -> None:
    batch, _ = tiny_batch
    seq = tiny_fmap.sequences[0]
    longest = int((batch[seq.fields[0]] != 0).sum(dim=1).argmax())
    short = {k: v[[longest] * 3].clone() for k, v in batch.items()}
    for f in seq.fields:
        short[f][0] = 0  # empty
        short[f][1, 1:] = 0  # one event
    assert (short[seq.fields[0]][2] != 0).sum() > 1
    model = _build(tiny_fmap, k=16).eval()
    with torch.no_grad():
        out = model(short)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(("flag", "marker"), [("core", ".core_proj."), ("gid", ".gid.")])
def test_ablations_remove_their_view(flag: str, marker: str, tiny_fmap, tiny_batch) -> None:
    batch, _ = tiny_batch
    full, ablated = _build(tiny_fmap), _build(tiny_fmap, **{flag: False})
    full_names = {n for n, _ in full.named_parameters()}
    removed = {n for n in full_names if marker in n}
    assert removed
    abl_names = {n for n, _ in ablated.named_parameters()}
    assert abl_names == full_names - removed
    assert ablated.num_tokens == full.num_tokens - (SMALL["k"] if flag == "core" else 1)
    with torch.no_grad():
        assert not torch.allclose(full.eval()(batch), ablated.eval()(batch))


def test_full_sequence_reference_keeps_every_event(tiny_fmap) -> None:
    max_len = tiny_fmap.sequences[0].max_len
    model = _build(tiny_fmap, k=10_000)
    assert model.views[0].core.k == max_len
    assert model.num_tokens == max_len + 1 + sum(f.kind != "sequence" for f in tiny_fmap.features)


def test_non_sequence_head_reads_only_the_distribution_and_context_tokens(tiny_fmap, tiny_batch,
                                                                         tmp_path: Path) -> None:
    """``head="non_sequence"``: the head's input is the distribution token and the contextual
    tokens (which attended to the behaviours), not the k core slots; gradients still reach the
    behaviour embeddings through attention; it traces and exports like the default head."""
    batch, labels = tiny_batch
    n_ctx = sum(f.kind != "sequence" for f in tiny_fmap.features)
    model = _build(tiny_fmap, head="non_sequence")
    assert model.head.net[0].in_features == (1 + n_ctx) * SMALL["embedding_dim"]
    assert model.head_slots == list(range(SMALL["k"], SMALL["k"] + 1 + n_ctx))
    seen = {}
    model.head.register_forward_hook(lambda m, i, o: seen.update(x=i[0]))
    torch.nn.functional.binary_cross_entropy_with_logits(model(batch), labels).backward()
    assert seen["x"].shape[1] == (1 + n_ctx) * SMALL["embedding_dim"]
    assert model.views[0].core_proj.weight.grad.abs().sum() > 0
    assert _build(tiny_fmap, head="non_sequence", gid=False).head_slots == list(range(SMALL["k"], SMALL["k"] + n_ctx))
    check_trace(model.eval(), batch)
    check_onnx(model, batch, tmp_path / "cdnet.onnx")
    with pytest.raises(ValueError, match="head must be"):
        _build(tiny_fmap, head="pooled")


def test_fused_training_attention_is_the_same_function(tiny_fmap, tiny_batch) -> None:
    """``fused_attention`` gives the written-out attention's outputs and gradients, empty and
    one-event histories included, in training and in eager eval."""
    batch, labels = tiny_batch
    seq = tiny_fmap.sequences[0]
    for f in seq.fields:
        batch[f][0] = 0  # empty history: its core slots are all masked keys
        batch[f][1, 1:] = 0
    plain, fused = _build(tiny_fmap, k=10_000, dropout=0.0), _build(tiny_fmap, k=10_000, dropout=0.0,
                                                                      fused_attention=True)
    assert all(layer.fused_training for layer in fused.layers)
    grads = []
    for model in (plain, fused):
        logits = model.train()(batch)
        torch.nn.functional.binary_cross_entropy_with_logits(logits, labels).backward()
        grads.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-6)
    for name, g in grads[0][1].items():
        torch.testing.assert_close(g, grads[1][1][name], rtol=1e-4, atol=1e-7, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(batch), fused.eval()(batch), rtol=1e-5, atol=1e-6)
    flat_ctx = tiny_fmap.model_copy(update={"features": [f for f in tiny_fmap.features if f.kind == "sequence"]})
    with pytest.raises(ValueError, match="needs a key every row keeps"):
        build_model("cdnet", flat_ctx, {**SMALL, "gid": False, "fused_attention": True})


def test_length_chunks_give_the_same_outputs_and_gradients(tiny_fmap, tiny_batch) -> None:
    """Training on rows grouped by history length, padding columns dropped per group: the same
    logits and gradients as the whole batch (histories of every length, an empty one included)."""
    batch, labels = tiny_batch
    seq = tiny_fmap.sequences[0]
    lengths = (batch[seq.fields[0]] != 0).sum(dim=1)
    assert lengths.min() < lengths.max()  # groups differ, so columns really are dropped
    for f in seq.fields:
        batch[f][0] = 0
    runs = []
    for chunks in (0, 3):
        model = _build(tiny_fmap, k=10_000, dropout=0.0, length_chunks=chunks).train()
        logits = model(batch)
        torch.nn.functional.binary_cross_entropy_with_logits(logits, labels).backward()
        runs.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=1e-5, atol=1e-6)
    for name, g in runs[0][1].items():
        torch.testing.assert_close(g, runs[1][1][name], rtol=1e-4, atol=1e-7, msg=name)
    with pytest.raises(ValueError, match="length_chunks"):
        _build(tiny_fmap, length_chunks=-1)


def test_eager_eval_fast_paths_keep_the_exported_graph(tiny_fmap, tiny_batch, tmp_path) -> None:
    """``fused_attention`` and ``length_chunks`` also speed up eager eval (the full-sequence
    validation) with the same outputs; a trace or ONNX export takes the written-out graph (no SDPA
    node, no data-dependent grouping), which still matches eager at another batch size."""
    from ctrserve.models.zoo import cdnet

    batch, _ = tiny_batch
    plain = _build(tiny_fmap, k=10_000, dropout=0.0).eval()
    fast = _build(tiny_fmap, k=10_000, dropout=0.0, fused_attention=True, length_chunks=3).eval()
    fast.load_state_dict(plain.state_dict())
    calls = []
    sdpa = cdnet.F.scaled_dot_product_attention
    with torch.no_grad(), patch.object(cdnet.F, "scaled_dot_product_attention",
                                       lambda *a, **kw: calls.append(1) or sdpa(*a, **kw)):
        torch.testing.assert_close(fast(batch), plain(batch), rtol=1e-5, atol=1e-6)
        assert calls  # eager eval took the fused attention
        calls.clear()
        traced = torch.jit.trace(fast, example_kwarg_inputs={"batch": batch}, strict=False, check_trace=False)
        assert not calls and "scaled_dot_product" not in str(traced.graph)
    check_trace(fast, batch)
    check_onnx(fast, batch, tmp_path / "fast.onnx")


def test_per_token_ffn_has_its_own_weights_per_slot() -> None:
    """The paper's PFFN: changing slot j's FFN weights changes only token j's output of the layer
    (attention comes before the FFN inside a layer); the shared FFN changes every token."""
    from ctrserve.models.zoo.cdnet import TransformerLayer

    torch.manual_seed(0)
    x, valid = torch.randn(3, 5, 8), torch.ones(3, 5, dtype=torch.bool)
    for ffn, changed in (("per_token", [2]), ("shared", [0, 1, 2, 3, 4])):
        layer = TransformerLayer(8, 2, 16, 0.0, tokens=5, ffn=ffn).eval()
        before = layer(x, valid)
        with torch.no_grad():
            if ffn == "per_token":
                layer.ffn.up.weight[2] += torch.randn_like(layer.ffn.up.weight[2])
            else:
                layer.ffn[0].weight += torch.randn_like(layer.ffn[0].weight)
        moved = (layer(x, valid) - before).abs().amax(dim=(0, 2)) > 1e-6
        assert moved.nonzero().squeeze(1).tolist() == changed, ffn
    per_token = TransformerLayer(8, 2, 16, 0.0, tokens=5)
    assert per_token.ffn.up.weight.shape == (5, 8, 16), "per-token is the default (the paper's)"


def test_per_token_ffn_by_positions_is_the_same_map(tiny_fmap, tiny_batch) -> None:
    """Length groups hand the layer a subset of token columns with their slot numbers: each column
    takes its own slot's weights, so the output equals the full layer's at those columns."""
    from ctrserve.models.zoo.cdnet import TransformerLayer

    torch.manual_seed(1)
    layer = TransformerLayer(8, 2, 16, 0.0, tokens=6).eval()
    x, valid = torch.randn(2, 6, 8), torch.ones(2, 6, dtype=torch.bool)
    valid[:, [1, 4]] = False  # masked keys: dropping those columns leaves the others unchanged
    cols = torch.tensor([0, 2, 3, 5])
    full = layer(x, valid)[:, cols]
    torch.testing.assert_close(layer(x[:, cols], valid[:, cols], cols), full, rtol=1e-5, atol=1e-6)
    shared = _build(tiny_fmap, ffn="shared")
    assert isinstance(shared.layers[0].ffn, nn.Sequential)
    with pytest.raises(ValueError, match="ffn must be"):
        _build(tiny_fmap, ffn="mixed")


def test_clear_errors(tiny_fmap) -> None:
    flat = tiny_fmap.model_copy(update={
        "features": [f for f in tiny_fmap.features if f.kind != "sequence"], "sequences": []})
    with pytest.raises(ValueError, match="cdnet needs a behaviour sequence"):
        build_model("cdnet", flat, SMALL)
    with pytest.raises(ValueError, match="core and gid cannot both be false"):
        _build(tiny_fmap, core=False, gid=False)
    with pytest.raises(ValueError, match="not divisible"):
        _build(tiny_fmap, heads=3)


def test_traces_and_matches_eager(tiny_fmap, tiny_batch) -> None:
    check_trace(_build(tiny_fmap), tiny_batch[0])


def test_onnx_export_dynamic_batch_matches_eager(tiny_fmap, tiny_batch, tmp_path: Path) -> None:
    check_onnx(_build(tiny_fmap), tiny_batch[0], tmp_path / "cdnet.onnx")
