"""One launcher for the processes ctrserve starts on this machine: redis-server, the gateway,
tritonserver (``ctrserve.export.triton_local`` starts it through ``Launcher.spawn``) and any other
child (Locust, the eager baseline). The demo, the benchmarks and the tests all use it.

Every child runs in a session and process group of its own (a terminal's Ctrl-C reaches only us,
and we stop the whole group), with PR_SET_PDEATHSIG(SIGTERM) so it gets SIGTERM if we die, even
by SIGKILL; its stdin is /dev/null, its output goes to a log file, and the servers bind 127.0.0.1
unless told otherwise.

``Launcher`` owns its children. Leaving its ``with`` block (normally, by an exception, or by
SIGTERM or SIGINT sent to our pid alone) stops every child: SIGTERM to each group, one shared
grace period, then SIGKILL, so the whole stop takes the grace period at most plus a moment.
While the block is open, SIGTERM and SIGINT raise ``Interrupted`` (a KeyboardInterrupt) in the
main thread so that ``finally`` blocks run; the previous handlers come back on exit. SIGINT is
handled even when it was inherited as ignored (a background job of a shell script keeps SIGINT
ignored): a deliberate ``kill -INT`` on our pid stops us and our children.

Readiness waits (``wait_ready``) fail at once with the child's log tail when the child exits, at
once when the check reports an error that retrying cannot fix (a ``LaunchError``, e.g. the
gateway's configuration error), and after the timeout with the last reason and the log tail.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from types import FrameType
from typing import Any

from ctrserve.net import LOOPBACK, connect_host, free_port, http_get, redis_ping

#: seconds between SIGTERM and SIGKILL when stopping children (shared by all children of one stop)
GRACE_S = 5.0
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_PR_SET_PDEATHSIG = 1


class LaunchError(RuntimeError):
    """A child that could not start or did not become ready; the message says why."""


class ChildExited(LaunchError):
    """The child exited while we waited for it to become ready."""


class NotReady(LaunchError):
    """The child did not become ready within the timeout."""


class GatewayConfigError(LaunchError):
    """The gateway reports a configuration error that retrying cannot fix."""


class Pending(Exception):
    """Raised by a readiness check: not ready yet, and why (kept for the timeout message)."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT arrived while a ``Launcher`` was open."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


# -- one child -------------------------------------------------------------------------------
@cache
def _prctl() -> Callable[..., int] | None:
    """libc's prctl, resolved in the parent so the child only calls it between fork and exec."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: no PDEATHSIG, the launcher still stops children
        return None


def child_setup(parent: int | None = None) -> None:
    """Runs in the child between fork and exec: its own session and process group, and SIGTERM
    when the parent dies. With ``parent``: exit if that parent already died before the prctl."""
    os.setsid()
    prctl = _prctl()
    if prctl is not None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if parent is not None and os.getppid() != parent:
        os._exit(1)


@dataclass
class Child:
    """A child process of a ``Launcher``: its name, its ``Popen`` and its log file."""

    name: str
    proc: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _terminate(children: Sequence[Child], grace: float, sig: int = signal.SIGTERM) -> None:
    """``sig`` to every child's group, one shared grace period, then SIGKILL to every group (the
    leaders that outlived the grace and whatever their groups left behind)."""
    for child in children:
        if child.running:
            _signal_group(child.proc, sig)
    deadline = time.monotonic() + grace
    for child in children:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.proc.wait(max(0.0, deadline - time.monotonic()))
    for child in children:
        _signal_group(child.proc, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.proc.wait(5)


def _log_tail(child: Child | None) -> str:
    return f"; log {child.log}:\n{child.log_tail()}" if child is not None else ""


def wait_ready(child: Child | None, check: Callable[[], bool], timeout: float, what: str | None = None,
               interval: float = 0.1) -> None:
    """Poll ``check`` until it returns True.

    Fails at once (``ChildExited``, with the log tail) when ``child`` exits, at once when the
    check raises a ``LaunchError``, and after ``timeout`` seconds with ``NotReady`` naming the last
    reason (a ``Pending`` the check raised, or the connection error) and the log tail."""
    what = what or (child.name if child else "the server")
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while True:
        if child is not None and not child.running:
            raise ChildExited(f"{what} exited with code {child.proc.returncode} while starting{_log_tail(child)}")
        try:
            if check():
                return
        except Pending as exc:
            last = str(exc)
        except (OSError, ValueError, http.client.HTTPException) as exc:  # refused, reset, timed out: not up yet
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() >= deadline:
            raise NotReady(f"{what} not ready within {timeout:.0f} s (last: {last}){_log_tail(child)}")
        time.sleep(interval)


# -- the launcher ----------------------------------------------------------------------------
class Launcher:
    """Owns child processes; a context manager that stops all of them on exit, on an exception
    and on SIGTERM/SIGINT (see the module docstring).

    ``workdir`` holds the logs of children started without an explicit log path (default: a
    private temp dir, removed on close). ``handle_signals=False`` leaves the signal handlers alone
    (a test session's launcher, or one inside a program that handles signals itself)."""

    def __init__(self, workdir: Path | None = None, *, grace: float = GRACE_S, handle_signals: bool = True):
        self._own_dir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="ctrserve-launch-")) if workdir is None else Path(workdir)
        self.grace = grace
        self.handle_signals = handle_signals
        self.children: list[Child] = []
        self._previous: dict[int, Any] = {}
        self._spawning = False
        self._deferred: int | None = None  # a signal that arrived while a child was being registered
        self._closing = False

    def __enter__(self) -> Launcher:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.handle_signals and threading.current_thread() is threading.main_thread():
            for sig in _STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._closing:  # already stopping everything, within a bounded time: let it finish
            return
        if self._spawning:
            self._deferred = signum
            return
        raise Interrupted(signum)

    def close(self) -> None:
        """Stop every child, restore the signal handlers, remove a private workdir."""
        self._closing = True
        try:
            self.stop_all()
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
            self._previous.clear()
            self._closing = False
            if self._own_dir:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def spawn(self, name: str, cmd: Sequence[str | Path], *, env: Mapping[str, str | None] | None = None,
              log: Path | None = None, cwd: Path | None = None) -> Child:
        """Start ``cmd`` as a child of this launcher.

        ``env`` entries override our environment (a None value removes the variable). Output is
        appended to ``log`` (default ``workdir/<name>.log``). Spawn from the main thread (or one
        that outlives the child): PDEATHSIG follows the thread that forked."""
        log = Path(log) if log is not None else self.workdir / f"{name}.log"
        full_env = dict(os.environ)
        for key, value in (env or {}).items():
            if value is None:
                full_env.pop(key, None)
            else:
                full_env[key] = value
        _prctl()
        self._spawning = True
        try:
            with open(log, "ab") as out:
                proc = subprocess.Popen([str(c) for c in cmd], env=full_env, stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=subprocess.STDOUT, cwd=cwd, preexec_fn=partial(child_setup, os.getpid()))
            child = Child(name, proc, log)
            self.children.append(child)
        finally:
            self._spawning = False
        if self._deferred is not None:  # now that the child is ours to stop
            signum, self._deferred = self._deferred, None
            raise Interrupted(signum)
        return child

    def stop(self, child: Child, grace: float | None = None, sig: int = signal.SIGTERM) -> int | None:
        """Stop one child: ``sig`` to its process group, SIGKILL after ``grace`` seconds (default:
        the launcher's). Returns its exit code."""
        _terminate([child], self.grace if grace is None else grace, sig)
        self.children = [c for c in self.children if c is not child]
        return child.proc.returncode

    def stop_all(self, grace: float | None = None) -> None:
        """Stop every child at once: one shared grace period, not one per child."""
        children = list(reversed(self.children))
        _terminate(children, self.grace if grace is None else grace)
        self.children = [c for c in self.children if c not in children]

    def wait_any(self, interval: float = 0.5) -> Child:
        """Block until one of the children exits and return it (SIGTERM/SIGINT interrupt the wait
        with ``Interrupted`` when the launcher handles signals)."""
        while True:
            for child in self.children:
                if not child.running:
                    return child
            time.sleep(interval)


# -- redis-server ----------------------------------------------------------------------------
class RedisServer:
    """A private redis-server owned by a launcher: no persistence, its own data dir, loopback.

    ``stop()``/``start()``/``restart()`` keep the port and the data dir (the store-failure tests
    stop it and start it again); data survives a restart only if a ``SAVE`` ran before the stop."""

    def __init__(self, launcher: Launcher, port: int = 0, data_dir: Path | None = None, host: str = LOOPBACK,
                 name: str = "redis", extra_args: Sequence[str] = ()):
        """``extra_args``: more ``redis-server`` options (a cluster node's, ``ctrserve.launch_cluster``)."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise LaunchError("redis-server not found on PATH (install it, e.g. `apt-get install redis-server`)")
        self.binary, self.launcher, self.host, self.name = binary, launcher, host, name
        self.port = port or free_port(host)
        self.data_dir = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="redis-", dir=launcher.workdir))
        self.extra_args = list(extra_args)
        self.child: Child | None = None

    @property
    def url(self) -> str:
        return f"redis://{connect_host(self.host)}:{self.port}/0"

    @property
    def proc(self) -> subprocess.Popen | None:
        return self.child.proc if self.child else None

    @property
    def running(self) -> bool:
        return self.child is not None and self.child.running

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start it (no-op when running) and wait until it answers PING."""
        if self.running:
            return self
        self.child = self.launcher.spawn(self.name, [
            self.binary, "--port", str(self.port), "--bind", self.host, "--save", "", "--appendonly", "no",
            "--dir", str(self.data_dir), *self.extra_args])
        try:
            wait_ready(self.child, lambda: redis_ping(self.port, connect_host(self.host)), timeout, "redis-server")
        except LaunchError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.child is not None:
            self.launcher.stop(self.child)
            self.child = None

    def restart(self) -> None:
        self.stop()
        self.start()


def start_redis(launcher: Launcher, port: int = 0, data_dir: Path | None = None, host: str = LOOPBACK,
                timeout: float = 10.0) -> RedisServer:
    """A running private redis-server (see ``RedisServer``); its URL is ``.url``."""
    return RedisServer(launcher, port, data_dir, host).start(timeout)


# -- the gateway -----------------------------------------------------------------------------
def readyz_config_error(answer: object) -> str | None:
    """The configuration error a /readyz answer reports (its ``config_error``: a start-up failure
    the gateway's retries cannot fix, such as a repository of several models and no routing
    config), or None."""
    if isinstance(answer, dict) and answer.get("config_error"):
        return str(answer["config_error"])
    return None


def gateway_ready(url: str) -> bool:
    """Readiness check of a gateway at ``url`` for ``wait_ready``: True on /readyz 200; raises
    ``GatewayConfigError`` when /readyz reports a configuration error, ``Pending`` otherwise."""
    status, body = http_get(url + "/readyz")
    if status == 200:
        return True
    try:
        answer = json.loads(body)
    except ValueError:
        raise Pending(f"/readyz answered {status}") from None
    reason = readyz_config_error(answer)
    if reason is not None:
        raise GatewayConfigError(f"the gateway reports a configuration error: {reason}")
    checks = answer.get("checks", answer) if isinstance(answer, dict) else answer
    raise Pending(f"/readyz answered {status}: {json.dumps(checks)}")


@dataclass
class GatewayServer:
    """A gateway child: its address and the child process."""

    child: Child
    port: int
    host: str = LOOPBACK

    @property
    def url(self) -> str:
        return f"http://{connect_host(self.host)}:{self.port}"

    @property
    def proc(self) -> subprocess.Popen:
        return self.child.proc

    def wait_ready(self, timeout: float = 120) -> None:
        wait_ready(self.child, partial(gateway_ready, self.url), timeout, "the gateway")


def start_gateway(launcher: Launcher, repo: Path, redis_url: str, *, port: int = 0, host: str = LOOPBACK,
                  routing: Path | None = None, triton_url: str | None = None,
                  env: Mapping[str, str | None] | None = None, args: Sequence[str] = (), name: str = "gateway",
                  log: Path | None = None, ready_timeout: float | None = 120) -> GatewayServer:
    """``python -m ctrserve serve`` on ``repo`` with its settings as CTRSERVE_* variables (``env``
    adds or overrides some, ``args`` adds command-line options); waits until /readyz answers 200
    unless ``ready_timeout`` is None, and stops the child if it does not become ready.

    Routing is what this call says: ``routing`` (a YAML file) or none (the gateway then serves the
    only model of ``repo``); CTRSERVE_ROUTING_* variables of our environment are not passed on."""
    port = port or free_port(host)
    settings: dict[str, str | None] = {k: None for k in os.environ if k.startswith("CTRSERVE_ROUTING_")}
    settings.update({"CTRSERVE_BACKEND_MODEL_REPOSITORY": str(repo), "CTRSERVE_REDIS_URL": redis_url,
                     "CTRSERVE_SERVER_HOST": host, "CTRSERVE_SERVER_PORT": str(port),
                     "CTRSERVE_BACKEND_TRITON_URL": triton_url,
                     "CTRSERVE_ROUTING_CONFIG": str(routing) if routing is not None else None})
    settings.update(env or {})
    child = launcher.spawn(name, [sys.executable, "-m", "ctrserve", "serve", *args], env=settings, log=log)
    gateway = GatewayServer(child, port, host)
    if ready_timeout is not None:
        try:
            gateway.wait_ready(ready_timeout)
        except LaunchError:
            launcher.stop(child)
            raise
    return gateway
