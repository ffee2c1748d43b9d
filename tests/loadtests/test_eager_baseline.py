"""The eager FastAPI baseline answers what its model computes on the same inputs, and refuses a
body without the model's inputs (torch reached through export/runtimes.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

pytestmark = pytest.mark.slow


def test_baseline_scores_the_encoded_request(tiny_run: Path) -> None:
    from ctrserve.export.runtimes import EagerModel
    from ctrserve.export.serving_module import example_request
    from ctrserve.loadtests.eager_baseline import create_app

    model = EagerModel(tiny_run)
    inputs = example_request(model.feature_map, candidates=5)
    body = {"user": {n: inputs[n].reshape(-1).tolist() for n in model.user_inputs},
            "candidates": {n: inputs[n].tolist() for n in model.candidate_inputs}}
    client = TestClient(create_app(tiny_run))
    answer = client.post("/predict", json=body)
    assert answer.status_code == 200, answer.text
    scores = answer.json()["scores"]
    assert len(scores) == 5 and answer.json()["arm"] == "eager"
    np.testing.assert_allclose(scores, model(inputs), rtol=1e-5, atol=1e-6)
    del body["candidates"][model.candidate_inputs[0]]
    assert client.post("/predict", json=body).status_code == 422
    assert client.get("/healthz").json() == {"status": "ok"}
