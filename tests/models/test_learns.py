"""Every registered model learns a planted signal: a few epochs on the synthetic generator lift its
test AUC above a bar that a model which does not learn stays under.

The data: the synthetic generator (models/data/datasets/synthetic.py) with 100 users and 30 items,
6,000 rows (4,800 train, 600 test, ~28 % positive), inputs user id, segment, item id, category,
device and the history (item, category). The label's logit plants item quality (reachable only
through the item id), the user's bias (user id, segment) and the share of the history in the
candidate's category. The generator's dense inputs (quality, price, age) are left out on purpose:
a random dense weight ranks rows by quality at initialisation, so an untrained model could pass.

The bar, 0.72: a scorer independent of the rows has AUC std sqrt((n+ + n- + 1) / (12 n+ n-))
= 0.026 on these 600 test rows (170 positives), so 0.72 is 8.4 std above 0.5. An untrained
network is not that scorer: it ranks by its random id embeddings, which depend on only 30 items
and 100 users, so its AUC spreads wider: over 10 models x 20 initial seeds, untrained AUCs had
mean 0.498, std 0.071, range 0.36-0.68; the bar is 3.1 of those std above 0.5. Trained (3
epochs, seeds 0-2) the models reached 0.748-0.791 (LR lowest). The second test runs the same
training with every gradient zeroed (what a detached or disconnected path does) and checks that
the model then stays under the bar, so this file fails CI when a model stops learning.
The figures above: ``python tests/models/test_learns.py`` (~1 min).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ctrserve.contract.feature_map import FeatureMap
from ctrserve.contract.prepared import load_split
from ctrserve.models.registry import build_model, list_models
from ctrserve.models.train.batches import BatchIterator
from ctrserve.models.train.trainer import evaluate, train_step

pytestmark = pytest.mark.quick

BAR = 0.72
EPOCHS, BATCH, LR = 3, 128, 1e-2
SPEC = {
    "name": "planted", "loader": "synthetic", "label": "label", "user_id": "user_id",
    "source": {"n_rows": 6000, "n_users": 100, "n_items": 30, "n_cates": 6, "seed": 7},
    "features": [
        {"name": "user_id", "type": "sparse", "side": "user"},
        {"name": "segment", "type": "sparse", "side": "user"},
        {"name": "item_id", "type": "sparse", "side": "item"},
        {"name": "cate_id", "type": "sparse", "side": "item"},
        {"name": "device", "type": "sparse", "side": "context"},
        {"name": "hist", "type": "sequence", "max_len": 8,
         "fields": [{"name": "hist_item_id", "share": "item_id"}, {"name": "hist_cate_id", "share": "cate_id"}]},
    ],
}


def prepare_planted(root: Path) -> tuple[FeatureMap, dict, dict]:
    from ctrserve.models.data.prepare import prepare

    (root / "planted.yaml").write_text(yaml.safe_dump(SPEC))
    prepare(root / "planted.yaml", root, root / "prepared")  # the generator reads no files
    fmap = FeatureMap.load(root / "prepared" / "feature_map.json")
    return fmap, load_split(root / "prepared", "train"), load_split(root / "prepared", "test")


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[FeatureMap, dict, dict]:
    return prepare_planted(tmp_path_factory.mktemp("planted"))


def fit(name: str, params: dict, planted, epochs: int = EPOCHS, zero_grads: bool = False, seed: int = 0) -> float:
    """Test AUC after ``epochs`` of Adam through the trainer's own ``train_step``; ``params``: the
    model's tiny dimensions (tests/conftest.py TINY_PARAMS: the point is the gradient path, not the
    best AUC)."""
    fmap, train, test = planted
    torch.manual_seed(seed)
    model = build_model(name, fmap, params)
    if zero_grads:
        for p in model.parameters():
            p.register_hook(torch.zeros_like)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    batches = BatchIterator(train, fmap, BATCH, shuffle=True, seed=seed)
    loss = torch.nn.BCEWithLogitsLoss()
    for _ in range(epochs):
        model.train()
        for batch, labels in batches:
            train_step(model, optimizer, loss, batch, labels)
    return evaluate(model, test, fmap)["auc"]


@pytest.mark.parametrize("name", list_models())
def test_learns_the_planted_signal(name: str, tiny_params: dict, planted) -> None:
    assert fit(name, tiny_params[name], planted) > BAR


@pytest.mark.parametrize("name", list_models())
def test_every_parameter_gets_a_gradient(name: str, tiny_params: dict, planted) -> None:
    """The complement of the bar: cutting the embeddings' gradients sinks most models under it, but
    a cut elsewhere while the embeddings still learn can pass it (with every non-embedding gradient
    zeroed most models still reach it; docs/decisions.md); such a cut leaves parameters whose
    gradient is missing or all zeros, which this finds."""
    fmap, train, _ = planted
    torch.manual_seed(0)
    model = build_model(name, fmap, tiny_params[name])
    batch, labels = next(iter(BatchIterator(train, fmap, 256, shuffle=True, seed=0)))
    torch.nn.functional.binary_cross_entropy_with_logits(model(batch), labels).backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"parameters without gradient: {dead}"


@pytest.mark.parametrize("name", list_models())
def test_a_broken_gradient_path_stays_under_the_bar(name: str, tiny_params: dict, planted) -> None:
    # one epoch: with zero gradients Adam moves nothing, so more epochs would give the same model
    assert fit(name, tiny_params[name], planted, epochs=1, zero_grads=True) < BAR


if __name__ == "__main__":  # the docstring's figures: trained AUC per seed, the untrained spread
    import importlib.util
    import tempfile

    spec = importlib.util.spec_from_file_location("tests_conftest", Path(__file__).parents[1] / "conftest.py")
    shared = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shared)
    torch.set_num_threads(1)
    data = prepare_planted(Path(tempfile.mkdtemp()))
    labels = data[2]["label"]
    print(f"test rows {len(labels)}, positives {int(labels.sum())}")
    untrained = []
    for model_name in list_models():
        params = shared.TINY_PARAMS[model_name]
        trained = [round(fit(model_name, params, data, seed=s), 4) for s in range(3)]
        untrained += [fit(model_name, params, data, epochs=1, zero_grads=True, seed=s) for s in range(20)]
        print(model_name, "trained (seeds 0-2):", trained, flush=True)
    print(f"untrained: n {len(untrained)} mean {np.mean(untrained):.3f} std {np.std(untrained):.3f} "
          f"min {min(untrained):.3f} max {max(untrained):.3f}")
