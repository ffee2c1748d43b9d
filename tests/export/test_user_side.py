"""The shared user-side form: models that broadcast batch-1 user inputs ship it (manifest
``user_side: shared``, parity passed); a model that cannot falls back to the expanded form with
the reason recorded. The wire contract (user inputs batch 1, candidates batch B) is the same."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from ctrserve.contract.feature_map import FeatureMap
from ctrserve.contract.manifest import Manifest
from ctrserve.export import exporter
from ctrserve.export.exporter import export_run
from ctrserve.export.serving_module import as_tensors, build_serving_module, example_request, split_inputs

pytestmark = pytest.mark.slow  # torch.export per case: seconds


class ConcatsUserAndItem(nn.Module):
    """Test-only: joins user-side and candidate-side embeddings along the batch-sized axis of a
    concat, so batch-1 user inputs cannot broadcast (it raises, like an unprepared model would)."""

    def __init__(self, fmap: FeatureMap):
        super().__init__()
        self.user, self.cand = split_inputs(fmap)
        self.w = nn.Linear(len(self.user) + len(self.cand), 1)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        cols = [batch[n].float().reshape(batch[n].shape[0], -1).mean(dim=1, keepdim=True) * 1e-2
                for n in self.user + self.cand]
        return self.w(torch.cat(cols, dim=1)).squeeze(-1)


class AssumesEqualBatches(nn.Module):
    """Test-only: runs with batch-1 user inputs and returns the right shape, but uses the ratio
    of candidate to user batch sizes (1 in training), so it is silently wrong unless the user
    inputs are expanded: only the parity gate can tell."""

    def __init__(self, fmap: FeatureMap):
        super().__init__()
        self.user, self.cand = split_inputs(fmap)
        self.scale = nn.Parameter(torch.tensor(0.1))

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        c = batch[self.cand[0]].float() * 1e-3
        u = batch[self.user[0]].float().reshape(batch[self.user[0]].shape[0], -1)[:, 0] * 1e-3
        return c + u + self.scale * (c.shape[0] / u.shape[0])


def _with_model(monkeypatch: pytest.MonkeyPatch, make: type[nn.Module]) -> None:
    real = exporter._load

    def load(run_dir: Path):
        cfg, fmap, _ = real(run_dir)
        return cfg, fmap, make(fmap).eval()

    monkeypatch.setattr(exporter, "_load", load)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("model_name", ["dnn", "mgdin"])
def test_broadcasting_models_ship_the_shared_form(model_name: str, fmt: str, run_factory, tmp_path: Path) -> None:
    m = export_run(run_factory(model_name), fmt, tmp_path, name=model_name).manifest
    assert m.user_side == "shared" and m.user_side_reason == ""
    assert m.parity.passed and {c.name for c in m.parity.checks} >= {"held_out_rows", "empty_sequence"}
    assert Manifest.load(tmp_path / model_name / "1").user_side == "shared"
    # the wire contract does not depend on the form
    assert all(t.shape[0] == (1 if t.side == "user" else -1) for t in m.inputs)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_model_that_cannot_broadcast_falls_back_with_reason(fmt: str, run_factory, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    _with_model(monkeypatch, ConcatsUserAndItem)
    m = export_run(run_factory("lr"), fmt, tmp_path, name="concat").manifest
    assert m.user_side == "expanded" and m.parity.passed
    assert m.user_side_reason.startswith("shared user-side form failed to run or export: RuntimeError")


def test_silently_wrong_shared_form_is_caught_by_parity(run_factory, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    _with_model(monkeypatch, AssumesEqualBatches)
    m = export_run(run_factory("lr"), "onnx", tmp_path, name="sums").manifest
    assert m.user_side == "expanded" and m.parity.passed
    assert m.user_side_reason.startswith("shared user-side form failed the parity gate: held_out_rows")
    assert list((tmp_path / "sums").iterdir()) != [] and not list((tmp_path / "sums").glob(".staging-*"))


def test_serving_module_forms_agree_and_reject_unknown(run_factory) -> None:
    _cfg, fmap, model = exporter._load(run_factory("mgdin"))
    req = as_tensors(build_serving_module(model, fmap), example_request(fmap, candidates=5))
    with torch.no_grad():
        shared = build_serving_module(model, fmap, "shared")(*req)
        expanded = build_serving_module(model, fmap, "expanded")(*req)
    assert shared.shape == (5,)
    torch.testing.assert_close(shared, expanded, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="user_side must be one of"):
        build_serving_module(model, fmap, "broadcast")  # type: ignore[arg-type]
