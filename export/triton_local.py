"""Run the ``tritonserver`` binary of the PyPI package nvidia-pytriton on a model repository.

What the wheel needs (measured on this machine, nvidia-pytriton 0.7.0 / Triton 2.51.0):

* ``LD_LIBRARY_PATH`` must include the wheel's ``nvidia_pytriton.libs``;
* ``--backend-directory`` must hold ``python/libtriton_python.so`` *and* the
  ``triton_python_backend_stub`` for this Python (3.11) from ``python_backend_stubs/3.11/``: we
  assemble that directory in a private temp dir instead of writing into site-packages;
* the stub is an embedded interpreter: ``PYTHONPATH`` gives it this environment's site-packages
  (numpy, onnxruntime). numpy must be 1.x: with numpy 2 the stub returns empty outputs silently.

Models are loaded with ``--model-control-mode=explicit``: ``load(name, versions=[1, 2])`` and then
``load(name, versions=[2])`` swaps versions without downtime (Triton loads the new versions
before it unloads the old ones; requests without a version go to the newest ready one).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ctrserve.launch import Child, Launcher, LaunchError, wait_ready
from ctrserve.net import LOOPBACK, connect_host, free_port

from .triton_repo import CONFIG_FILE, read_config


class TritonError(RuntimeError):
    pass


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    libs: Path
    backends: Path
    stub: Path


def find_install() -> TritonInstall:
    """Locate the binary, its libraries and the Python-backend stub inside the installed wheel."""
    purelib = Path(sysconfig.get_paths()["purelib"])
    root = purelib / "pytriton" / "tritonserver"
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    install = TritonInstall(binary=root / "bin" / "tritonserver", libs=purelib / "nvidia_pytriton.libs",
                            backends=root / "backends", stub=root / "python_backend_stubs" / ver /
                            "triton_python_backend_stub")
    missing = [str(p) for p in (install.binary, install.libs, install.backends / "python", install.stub)
               if not p.exists()]
    if missing:
        raise TritonError(f"tritonserver from nvidia-pytriton not found ({', '.join(missing)} missing); "
                          "install it with `pip install -e '.[triton]'`")
    return install


def check_numpy() -> None:
    import numpy

    if int(numpy.__version__.split(".")[0]) >= 2:
        raise TritonError(f"numpy {numpy.__version__} is installed: the Python-backend stub is built against numpy "
                          "1.x and returns empty outputs with numpy 2; install numpy<2")


def _backend_dir(install: TritonInstall, dest: Path) -> Path:
    """A backend directory with the Python backend and this Python's stub side by side."""
    py = dest / "python"
    shutil.copytree(install.backends / "python", py, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(install.stub, py / "triton_python_backend_stub")
    return dest


@dataclass
class TritonServer:
    """A running local tritonserver, a child of ``launcher``; stop it with ``stop()`` (or use it as
    a context manager), or let the launcher stop it with its other children."""

    child: Child
    launcher: Launcher
    model_repo: Path
    http_port: int
    grpc_port: int
    metrics_port: int
    workdir: Path
    log_path: Path
    host: str = LOOPBACK
    #: the launcher was made for this server alone (``start`` without one): closed with the server
    own_launcher: bool = False
    _stopped: bool = field(default=False, repr=False)

    @property
    def process(self) -> subprocess.Popen:
        return self.child.proc

    @property
    def http_url(self) -> str:
        return f"http://{connect_host(self.host)}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{connect_host(self.host)}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{connect_host(self.host)}:{self.metrics_port}/metrics"

    # -- HTTP control plane (stdlib only) ------------------------------------------------
    def _request(self, method: str, path: str, body: dict | None = None, timeout: float = 120) -> tuple[int, bytes]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.http_url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def is_ready(self) -> bool:
        try:
            return self._request("GET", "/v2/health/ready", timeout=2)[0] == 200
        except OSError:
            return False

    def model_ready(self, name: str, version: int | None = None) -> bool:
        path = f"/v2/models/{name}" + (f"/versions/{version}" if version else "") + "/ready"
        try:
            return self._request("GET", path, timeout=5)[0] == 200
        except OSError:
            return False

    def index(self) -> list[dict]:
        """The repository index: ``[{name, version, state, reason}]``."""
        status, body = self._request("POST", "/v2/repository/index", {})
        if status != 200:
            raise TritonError(f"repository index failed ({status}): {body.decode(errors='replace')}")
        return json.loads(body)

    def load(self, name: str, versions: list[int] | None = None) -> None:
        """Load (or reload) a model; ``versions`` overrides the config's version policy with
        ``specific`` so versions can be added and removed without touching files."""
        body: dict = {}
        if versions is not None:
            from google.protobuf import json_format

            cfg = read_config(self.model_repo / name / CONFIG_FILE)
            cfg.version_policy.Clear()
            cfg.version_policy.specific.versions.extend(versions)
            body = {"parameters": {"config": json_format.MessageToJson(cfg, preserving_proto_field_name=True)}}
        status, resp = self._request("POST", f"/v2/repository/models/{name}/load", body)
        if status != 200:
            raise TritonError(f"loading {name!r} failed ({status}): {resp.decode(errors='replace')}; "
                              f"server log: {self.log_path}")

    def unload(self, name: str) -> None:
        status, resp = self._request("POST", f"/v2/repository/models/{name}/unload", {})
        if status != 200:
            raise TritonError(f"unloading {name!r} failed ({status}): {resp.decode(errors='replace')}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # -- lifecycle -----------------------------------------------------------------------
    def stop(self, timeout: float = 30) -> int:
        """SIGTERM (Triton drains in-flight requests), SIGKILL after ``timeout``; returns the exit code."""
        if self._stopped:
            return self.process.returncode or 0
        self._stopped = True
        self.launcher.stop(self.child, grace=timeout)
        if self.own_launcher:
            self.launcher.close()
        # the private work dir goes after a clean exit; otherwise its log (if the default one) stays
        # as evidence and only the copied backends are removed
        clean = self.process.returncode == 0
        shutil.rmtree(self.workdir if clean else self.workdir / "backends", ignore_errors=True)
        return self.process.returncode

    def __enter__(self) -> TritonServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start(
    model_repo: Path,
    http_port: int = 0,
    grpc_port: int = 0,
    metrics_port: int = 0,
    models: list[str] | None = None,
    timeout: float = 120,
    log_path: Path | None = None,
    log_verbose: int = 0,
    host: str = LOOPBACK,
    launcher: Launcher | None = None,
) -> TritonServer:
    """Start tritonserver on ``model_repo`` and wait until it and the models are ready.

    Ports 0 pick free ports; HTTP, gRPC and metrics bind ``host`` (loopback unless told
    otherwise). ``models`` lists the models loaded at start (default: every model in the
    repository); more can be loaded later with ``load``. The server is a child of ``launcher``
    (stopped with its other children); without one it gets a launcher of its own that leaves
    signal handling to the caller (the child still dies with us, by PDEATHSIG).
    """
    model_repo = Path(model_repo).resolve()
    if not model_repo.is_dir():
        raise TritonError(f"model repository {model_repo} does not exist")
    install = find_install()
    check_numpy()
    http_port, grpc_port, metrics_port = (p or free_port(host) for p in (http_port, grpc_port, metrics_port))
    workdir = Path(tempfile.mkdtemp(prefix="ctrserve-triton-"))
    backends = _backend_dir(install, workdir / "backends")
    log_path = Path(log_path) if log_path else workdir / "tritonserver.log"

    def prepend(var: str, path: str) -> str:
        return os.pathsep.join(p for p in (path, os.environ.get(var, "")) if p)

    env = {"LD_LIBRARY_PATH": prepend("LD_LIBRARY_PATH", str(install.libs)),
           "PYTHONPATH": prepend("PYTHONPATH", sysconfig.get_paths()["purelib"]),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    cmd = [
        str(install.binary), f"--model-repository={model_repo}", f"--backend-directory={backends}",
        "--model-control-mode=explicit", f"--http-address={host}", f"--http-port={http_port}",
        f"--grpc-address={host}", f"--grpc-port={grpc_port}", f"--metrics-address={host}",
        f"--metrics-port={metrics_port}", "--allow-metrics=true", f"--log-verbose={log_verbose}",
        "--exit-timeout-secs=5", "--strict-readiness=true",
    ]
    cmd += [f"--load-model={m}" for m in (models if models is not None else ["*"])]
    own = launcher is None
    launcher = launcher or Launcher(workdir, handle_signals=False)
    child = launcher.spawn("tritonserver", cmd, env=env, log=log_path)
    server = TritonServer(child, launcher, model_repo, http_port, grpc_port, metrics_port, workdir, log_path, host,
                          own_launcher=own)
    try:
        wait_ready(child, server.is_ready, timeout, "tritonserver", interval=0.2)
    except BaseException as exc:  # not ready, or interrupted: nothing of it stays behind
        server.stop()
        if isinstance(exc, LaunchError):
            raise TritonError(str(exc)) from None
        raise
    return server
