"""Batch broadcasting: a model fed one user's user-side inputs with batch 1 and B candidates
gives what it gives on the same rows fully expanded to batch B (the training form), and the
training form itself is the target-attention formula written row by row."""

from __future__ import annotations

import math

import pytest
import torch

from ctrserve.export.serving_module import split_inputs
from ctrserve.models.layers.sequence import SequencePooling
from ctrserve.models.registry import build_model

pytestmark = pytest.mark.quick

SMALL_DEEP = {"embedding_dim": 8, "hidden": [16, 16]}
MGDIN = {"embedding_dim": 8, "windows": [2, 4], "model_dim": 8, "layers": 2, "ratios": [0.5, 1.0], "hidden": [16]}
CASES: dict[str, tuple[str, dict]] = {
    "lr": ("lr", {}),
    "fm": ("fm", {"embedding_dim": 8}),
    "dnn": ("dnn", SMALL_DEEP),
    "dnn_target": ("dnn", {**SMALL_DEEP, "seq_pooling": "target"}),
    "wide_deep": ("wide_deep", SMALL_DEEP),
    "deepfm": ("deepfm", {**SMALL_DEEP, "seq_pooling": "sum"}),
    "dcnv2": ("dcnv2", {**SMALL_DEEP, "cross_layers": 2}),
    "autoint": ("autoint", {"embedding_dim": 8, "attention_layers": 2, "attention_dim": 8, "heads": 2,
                            "hidden": [16], "use_linear": True}),
    "mgdin": ("mgdin", MGDIN),
    "mgdin_mean_pool": ("mgdin", {**MGDIN, "seq_pooling": "mean"}),
    "mgdin_ste_flatten": ("mgdin", {**MGDIN, "a0_mode": "ste", "pooling": "flatten"}),
    "cdnet": ("cdnet", {"embedding_dim": 8, "k": 4, "bins": 5, "num_layers": 1, "heads": 2, "hidden": [16]}),
}
ATOL = 1e-6  # GEMM vs per-row dot products: same sums in another order


def _model(name: str, params: dict, fmap) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(name, fmap, params)
    with torch.no_grad():  # embeddings init at 1e-4: scale up so the attention is not uniform
        for p in model.parameters():
            p.normal_(0, 0.3)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _requests(batch: dict[str, torch.Tensor], fmap, user_row: int, empty: bool = False):
    """(shared: user inputs [1, ...], expanded: the same user repeated B times); candidates = all rows."""
    user, _ = split_inputs(fmap)
    seq = {f.name for f in fmap.sequence_fields}
    shared = dict(batch)
    for u in user:
        shared[u] = batch[u][user_row: user_row + 1].clone()
        if empty and u in seq:
            shared[u].zero_()
    b = len(next(iter(batch.values())))
    expanded = {k: (v.expand(b, *v.shape[1:]).contiguous() if k in user else v) for k, v in shared.items()}
    return shared, expanded


@pytest.mark.parametrize("case", sorted(CASES))
def test_shared_user_side_equals_expanded(case: str, tiny_fmap, tiny_batch) -> None:
    name, params = CASES[case]
    batch, labels = tiny_batch
    model = _model(name, params, tiny_fmap)
    seq = tiny_fmap.sequence_fields[0].name
    users = [int((batch[seq] != 0).any(dim=1).float().argmax()), int((batch[seq] == 0).all(dim=1).float().argmax())]
    with torch.no_grad():
        for user_row in users:
            for empty in (False, True):
                shared, expanded = _requests(batch, tiny_fmap, user_row, empty)
                got, ref = model(shared), model(expanded)
                assert got.shape == ref.shape == labels.shape
                assert ref.std() > 1e-3, "outputs do not vary by candidate: the comparison would be vacuous"
                torch.testing.assert_close(got, ref, rtol=1e-6, atol=ATOL)
                one = {k: v[:1] for k, v in shared.items()}  # one candidate
                torch.testing.assert_close(model(one), ref[:1], rtol=1e-6, atol=ATOL)


def test_training_form_of_target_pooling_is_the_attention_formula(tiny_fmap, tiny_batch) -> None:
    """Equal batches (training): each row's pooled field is sum_l w_l e_l with w the softmax, over
    the row's present events, of key_l · query / sqrt(D); a row without events pools to zeros.
    Written row by row, not with the layer's batched path."""
    batch, _ = tiny_batch
    seq = tiny_fmap.sequences[0]
    torch.manual_seed(0)
    pool = SequencePooling(seq, 4, "target")
    emb = {n: torch.randn(*batch[n].shape, 4) for n in {*seq.fields, *seq.targets}}
    with torch.no_grad():
        got = pool(emb, batch[seq.fields[0]])
        query = pool.query(torch.cat([emb[t] for t in seq.targets], dim=-1))
    present = batch[seq.fields[0]] != 0  # PAD_ID 0: no event
    assert not present[0].any() and present.any(dim=1).sum() > 1, "need an empty history and non-empty ones"
    for b in range(len(query)):
        keys = torch.cat([emb[f][b] for f in seq.fields], dim=-1)[present[b]]  # [events, D]
        w = torch.softmax(keys @ query[b] / math.sqrt(keys.shape[-1]), dim=0) if len(keys) else None
        for f in seq.fields:
            want = w @ emb[f][b][present[b]] if w is not None else torch.zeros(4)
            torch.testing.assert_close(got[f][b], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["target", "mean", "sum"])
def test_pooling_keeps_the_history_batch(mode: str, tiny_fmap, tiny_batch) -> None:
    """A shared history is pooled once: mean/sum give [1, d], target gives [B, d] from [1, L, d] keys."""
    batch, _ = tiny_batch
    seq = tiny_fmap.sequences[0]
    pool = SequencePooling(seq, 4, mode)
    b = len(batch[seq.targets[0]])
    emb = {f: torch.randn(1, batch[f].shape[1], 4) for f in seq.fields}
    emb.update({t: torch.randn(b, 4) for t in seq.targets})
    out = pool(emb, batch[seq.fields[0]][:1])
    assert all(v.shape == ((b, 4) if mode == "target" else (1, 4)) for v in out.values())
