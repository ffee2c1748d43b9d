"""The baseline a user might write instead of the gateway: FastAPI + the PyTorch model, eagerly.

The client sends already-encoded features (the user side once, one list per candidate-side
input); a plain ``def`` endpoint (FastAPI's thread pool) validates the body with pydantic and runs
the trained model (export/runtimes.py ``EagerModel``) with torch's default threads. Measured
under the same Locust load as the gateway (``--mode baseline``).

    CTRSERVE_BASELINE_RUN=work/runs/... uvicorn --factory ctrserve.loadtests.eager_baseline:app_from_env
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel


class PredictRequest(BaseModel):
    #: user-side input name -> values (1 for a profile feature, L for a sequence field)
    user: dict[str, list[float]]
    #: candidate-side input name -> one value per candidate
    candidates: dict[str, list[float]]


class PredictResponse(BaseModel):
    arm: str = "eager"
    scores: list[float]


def create_app(run_dir: Path) -> FastAPI:
    from ctrserve.export.runtimes import EagerModel

    model = EagerModel(run_dir)
    user_names, cand_names = set(model.user_inputs), set(model.candidate_inputs)
    app = FastAPI(title="eager PyTorch baseline")

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/predict", response_model=PredictResponse)
    def predict(req: PredictRequest) -> PredictResponse:
        if set(req.user) != user_names or set(req.candidates) != cand_names:
            raise HTTPException(422, f"need user inputs {sorted(user_names)} and candidate inputs "
                                     f"{sorted(cand_names)}")
        sizes = {len(v) for v in req.candidates.values()}
        if len(sizes) != 1 or 0 in sizes:
            raise HTTPException(422, "every candidate input needs the same, non-zero number of values")
        inputs = {name: np.asarray(values, dtype=model.dtype(name)) for name, values in req.candidates.items()}
        for name, values in req.user.items():  # profile value [1], sequence [1, L]
            inputs[name] = np.asarray(values, dtype=model.dtype(name)).reshape((1, -1) if model.is_sequence(name)
                                                                                else (1,))
        return PredictResponse(scores=model(inputs).tolist())

    return app


def app_from_env() -> FastAPI:
    """The app on the run directory in ``CTRSERVE_BASELINE_RUN``, for ``uvicorn --factory``."""
    return create_app(Path(os.environ["CTRSERVE_BASELINE_RUN"]))
