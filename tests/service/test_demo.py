"""``ctrserve demo --triton`` end to end: the demo's own steps (export, private redis-server, the
gateway subprocess) with the local tritonserver started on the demo's model repository, the
sample requests routed through it, and everything stopped at the end; then the default demo
(embedded ONNX Runtime) on the same work directory, which must not start Triton.

Bounded: a one-epoch DeepFM of the tiny dataset stands in for the demo's training (copied in as a
finished demo run, so the demo reuses it instead of training for minutes)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.triton, pytest.mark.redis, pytest.mark.slow]

SEED = 1


@pytest.fixture(scope="module")
def demo_work(exported, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ctrserve.export import triton_local

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not found on PATH")
    try:
        triton_local.find_install()
    except triton_local.TritonError as exc:
        pytest.skip(str(exc))
    work = tmp_path_factory.mktemp("demo_work")
    shutil.copytree(exported.runs[1], work / "runs" / "synthetic" / "deepfm" / f"demo-s{SEED}-test")
    return work


def _demo(work: Path, *args: str) -> str:
    env = {**os.environ, "CTRSERVE_WORK_DIR": str(work), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    r = subprocess.run([sys.executable, "-m", "ctrserve", "demo", "--seed", str(SEED), "--requests", "2", *args],
                       env=env, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    return out


def test_demo_with_local_triton_then_default(demo_work: Path) -> None:
    out = _demo(demo_work, "--triton")
    assert "reusing" in out and "tritonserver ready" in out, out
    assert re.search(r"gateway\s+ready on .*\(Triton at 127\.0\.0\.1:\d+\)", out), out
    assert out.count("POST /v1/score") == 2, out
    served = re.search(r"served (\d+) inference requests for deepfm", out)
    # 2 sample requests + the connection-opening one (+ the gateway's warm-ups) went through Triton
    assert served and int(served.group(1)) >= 3, out
    assert "stopped (exit code 0)" in out, out
    assert (demo_work / "demo" / "tritonserver.log").exists()

    default = _demo(demo_work)
    assert "embedded ONNX Runtime" in default and "triton" not in default.lower(), default
    assert "export reusing" in " ".join(default.split()), default
    assert default.count("POST /v1/score") == 2, default


def test_triton_and_triton_url_are_exclusive(demo_work: Path) -> None:
    env = {**os.environ, "CTRSERVE_WORK_DIR": str(demo_work)}
    r = subprocess.run([sys.executable, "-m", "ctrserve", "demo", "--triton", "--triton-url", "localhost:8001"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "pick one" in r.stdout + r.stderr
