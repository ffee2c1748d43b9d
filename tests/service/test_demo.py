"""``ctrserve demo`` end to end with the real processes (redis-server, the gateway, tritonserver):

- the default demo: a 50/50 split between the baseline (deepfm) and MGDIN calibrated to static
  masks, test users replayed with clicks, and a report holding both arms with impressions and
  clicks;
- ``--triton``: the local tritonserver on the demo's model repository, the sample requests routed
  through it, everything stopped at the end; then the default demo (embedded ONNX Runtime) on the
  same work directory, which must not start Triton;
- ``--model mgdin`` on a work directory already holding the first demo's exports: the arms are
  MGDIN with per-request masks and with static ones, nothing goes to deepfm;
- ``--serve`` stopped by SIGTERM or SIGINT sent to the demo's pid alone: it exits within 10 s and
  its redis-server and gateway are gone.

Bounded: tiny models stand in for the demo's training (copied in as finished demo runs, so the
demo reuses them instead of training for minutes)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.redis, pytest.mark.slow]

SEED = 1
OTHER = "mgdin"  # the second demo's model
TREATMENT = "mgdin_static"  # the static-mask arm every demo serves
TINY_OTHER = {"embedding_dim": 8, "windows": [2], "model_dim": 8, "layers": 2, "ratios": [0.5, 1.0], "hidden": [16]}


@pytest.fixture(scope="module")
def demo_work(exported, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A work dir holding finished demo runs of deepfm (the gateway tests' run) and of a tiny mgdin."""
    from ctrserve.models.train.config import resolve_config
    from ctrserve.models.train.trainer import train

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not found on PATH")
    work = tmp_path_factory.mktemp("demo_work")
    shutil.copytree(exported.runs[1], work / "runs" / "synthetic" / "deepfm" / f"demo-s{SEED}-test")
    cfg = resolve_config(OTHER, "synthetic", seed=SEED, variant="demo", overrides={
        "train": {"max_epochs": 1, "batch_size": 256, "threads": 1}, "model": TINY_OTHER})
    train(cfg, exported.prepared, work / "runs", progress=False)
    return work


def _env(work: Path) -> dict[str, str]:
    return {**os.environ, "CTRSERVE_WORK_DIR": str(work), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}


def _demo(work: Path, *args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "ctrserve", "demo", "--seed", str(SEED), "--requests", "2", *args],
                       env=_env(work), capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    return out


def _repo_models(work: Path) -> list[str]:
    return sorted(d.name for d in (work / "demo" / "model_repository").iterdir() if (d / "1").is_dir())


def _report_row(out: str, arm: str) -> tuple[int, int]:
    """(impressions, clicks) of ``arm`` in the demo's outcome report (0, 0 when it is missing)."""
    row = re.search(rf"^{re.escape(arm)}\s+([\d,]+)\s+([\d,]+)\s", out, re.MULTILINE)
    return (int(row.group(1).replace(",", "")), int(row.group(2).replace(",", ""))) if row else (0, 0)


def test_demo_serves_two_arms_and_reports_both(demo_work: Path) -> None:
    out = _demo(demo_work)
    assert "embedded ONNX Runtime" in out, out
    assert set(_repo_models(demo_work)) >= {"deepfm", TREATMENT}, out
    calibrated = next((demo_work / "runs" / "synthetic" / OTHER).glob("demo_static_masks-*/calibration.json"))
    calibration = json.loads(calibrated.read_text())
    assert Path(calibration["source_run"]).name.startswith(f"demo-s{SEED}-"), calibration["source_run"]
    arms = re.findall(r"-> arm (\S+) \((\S+) v1\)", out)
    assert len(arms) == 2 and all(arm == model and arm in ("deepfm", TREATMENT) for arm, model in arms), out
    for arm in ("deepfm", TREATMENT):
        impressions, clicks = _report_row(out, arm)
        assert impressions > 0 and 0 < clicks < impressions, f"{arm}: {impressions} impressions, {clicks} clicks\n{out}"
    assert re.search(rf"^{TREATMENT} vs deepfm, ctr: .* -> ", out, re.MULTILINE), out
    assert re.search(rf"^{TREATMENT} vs deepfm, auc: ", out, re.MULTILINE), out


@pytest.mark.triton
def test_demo_with_local_triton_then_default(demo_work: Path, triton_install) -> None:
    out = _demo(demo_work, "--triton")
    assert "reusing" in out and "tritonserver ready" in out, out
    assert re.search(r"gateway\s+ready on .*\(Triton at 127\.0\.0\.1:\d+\)", out), out
    assert out.count("POST /v1/score") == 2, out
    served = re.search(r"served (\d+) inference requests for deepfm", out)
    # 2 sample requests + the connection-opening one (+ the gateway's warm-ups) went through Triton
    assert served and int(served.group(1)) >= 3, out
    assert "stopped (exit code 0)" in out, out
    assert (demo_work / "demo" / "tritonserver.log").exists()

    assert re.search(rf"served (\d+) inference requests for {TREATMENT}", out), out

    default = _demo(demo_work)
    assert "embedded ONNX Runtime" in default and "triton" not in default.lower(), default
    assert " ".join(default.split()).count("export reusing") == 2, default
    assert default.count("POST /v1/score") == 2, default


@pytest.mark.triton
def test_second_demo_routes_to_its_own_model_through_triton(demo_work: Path, triton_install) -> None:
    """The repository already holds the first demo's exports; the gateway must not wait for a
    routing config (120 s, then "gateway not ready", before the launcher routed the demo), and
    serves the arms of this demo only: MGDIN with per-request masks against static ones."""
    if "deepfm" not in _repo_models(demo_work):
        _demo(demo_work)
    out = _demo(demo_work, "--triton", "--model", OTHER)
    assert _repo_models(demo_work) == ["deepfm", OTHER, TREATMENT]
    assert re.search(r"gateway\s+ready on .*\(Triton at 127\.0\.0\.1:\d+\)", out), out
    # both sample requests scored by this demo's arms
    assert out.count(f"({OTHER} v1)") + out.count(f"({TREATMENT} v1)") == 2 and "(deepfm v1)" not in out, out
    for model in (OTHER, TREATMENT):  # the replay's traffic went through Triton on both arms
        served = re.search(rf"served (\d+) inference requests for {model}\b", out)
        assert served and int(served.group(1)) >= 3, out
        assert _report_row(out, model)[0] > 0, out
    assert "for deepfm" not in out, out  # Triton did not even load it
    assert "stopped (exit code 0)" in out, out


def _descendants(pid: int) -> dict[int, str]:
    import psutil

    return {p.pid: p.name() for p in psutil.Process(pid).children(recursive=True)}


def _running(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_stops_its_children_on_a_signal_to_its_pid(demo_work: Path, sig: int, tmp_path: Path) -> None:
    log = tmp_path / "demo.out"
    with open(log, "w") as out:  # its own session: the signal reaches the demo's pid and nothing else
        demo = subprocess.Popen([sys.executable, "-m", "ctrserve", "demo", "--seed", str(SEED), "--requests", "1",
                                 "--serve"], env=_env(demo_work), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while "serving" not in log.read_text():
            assert demo.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        children = _descendants(demo.pid)
        assert "redis-server" in children.values() and len(children) >= 2, children
        t0 = time.monotonic()
        demo.send_signal(sig)
        demo.wait(10)
        stopped_in = time.monotonic() - t0
        alive = {pid: name for pid, name in children.items() if _running(pid)}
        assert not alive, f"still running after the demo exited: {alive}"
        assert demo.returncode == 0, log.read_text()
        assert f"{signal.Signals(sig).name}: stopping" in log.read_text()
        print(f"{signal.Signals(sig).name}: the demo and its {len(children)} children stopped in {stopped_in:.1f} s")
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()


def test_triton_and_triton_url_are_exclusive(demo_work: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "ctrserve", "demo", "--triton", "--triton-url", "localhost:8001"],
                       env=_env(demo_work), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "pick one" in r.stdout + r.stderr


def test_demo_on_a_private_redis_cluster(demo_work: Path) -> None:
    if shutil.which("redis-cli") is None:
        pytest.skip("redis-cli not found on PATH")
    out = _demo(demo_work, "--redis-cluster")
    assert "private Redis Cluster (3 masters + 3 replicas)" in out and "redis+cluster://127.0.0.1:" in out, out
    assert out.count("POST /v1/score") == 2, out
