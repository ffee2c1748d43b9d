"""``ctrserve.launch`` with real processes: each child in its own process group with PDEATHSIG,
stdin /dev/null and a log; stopped on exit, on an exception and on SIGTERM/SIGINT sent to the
owning process alone (also while its main thread is busy, as a benchmark's is); readiness waits
that fail at once when the child exits or reports an error retrying cannot fix; redis-server
restartable on its port.

The children are ``sleep`` and small Python scripts, so the module takes a few seconds."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ctrserve import launch
from ctrserve.launch import ChildExited, GatewayConfigError, Launcher, NotReady, Pending

SLEEPER = ["sleep", "60"]


def _gone(pid: int, within: float = 10.0) -> bool:
    """True once ``pid`` no longer exists (or is a zombie nobody has reaped yet)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


def test_child_has_own_group_devnull_stdin_and_a_log(tmp_path: Path) -> None:
    with Launcher(tmp_path) as launcher:
        child = launcher.spawn("sleeper", SLEEPER)
        assert os.getpgid(child.pid) == child.pid != os.getpgid(0)
        assert os.getsid(child.pid) == child.pid
        assert os.readlink(f"/proc/{child.pid}/fd/0") == os.devnull
        talker = launcher.spawn("talker", ["sh", "-c", "echo to-stdout; echo to-stderr >&2"])
        talker.proc.wait(10)
        assert talker.log == tmp_path / "talker.log"
        assert talker.log_tail().splitlines() == ["to-stdout", "to-stderr"]
    assert _gone(child.pid)


def test_exit_and_exception_stop_children_and_restore_handlers(tmp_path: Path) -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with Launcher(tmp_path) as launcher:
        assert signal.getsignal(signal.SIGTERM) == launcher._on_signal
        first = launcher.spawn("first", SLEEPER)
    assert _gone(first.pid) and not launcher.children
    assert {s: signal.getsignal(s) for s in before} == before
    with pytest.raises(ZeroDivisionError), Launcher(tmp_path) as launcher:
        second = launcher.spawn("second", SLEEPER)
        1 / 0  # noqa: B018
    assert _gone(second.pid)
    assert {s: signal.getsignal(s) for s in before} == before


def test_stop_kills_what_ignores_sigterm_and_the_rest_of_its_group(tmp_path: Path) -> None:
    stubborn = "trap '' TERM; sleep 60 & echo $! > grandchild; wait"
    with Launcher(tmp_path, grace=0.5) as launcher:
        child = launcher.spawn("stubborn", ["sh", "-c", stubborn], cwd=tmp_path)
        deadline = time.monotonic() + 10
        while not (tmp_path / "grandchild").exists() or not (tmp_path / "grandchild").read_text().strip():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        grandchild = int((tmp_path / "grandchild").read_text())
        assert launcher.stop(child) == -signal.SIGKILL
        assert _gone(grandchild)


def test_stop_sends_sigterm_to_the_whole_group(tmp_path: Path) -> None:
    """A member of the group gets SIGTERM too (its chance to clean up), not only the leader."""
    member = ("import signal, sys, time; from pathlib import Path\n"
              "signal.signal(signal.SIGTERM, lambda *_: (Path('got').write_text('TERM'), sys.exit(0)))\n"
              "Path('ready').write_text('')\ntime.sleep(60)")
    with Launcher(tmp_path) as launcher:
        child = launcher.spawn("leader", ["sh", "-c", f'"{sys.executable}" -c "$0" & wait', member], cwd=tmp_path)
        deadline = time.monotonic() + 20
        while not (tmp_path / "ready").exists():
            assert time.monotonic() < deadline and child.running, child.log_tail()
            time.sleep(0.05)
        launcher.stop(child)
    assert (tmp_path / "got").read_text() == "TERM"


def test_env_overrides_and_removes_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CTRSERVE_LAUNCH_TEST_DROP", "inherited")
    monkeypatch.setenv("CTRSERVE_LAUNCH_TEST_KEEP", "inherited")
    with Launcher(tmp_path) as launcher:
        child = launcher.spawn("env", ["sh", "-c", 'echo "[$CTRSERVE_LAUNCH_TEST_DROP][$CTRSERVE_LAUNCH_TEST_KEEP]'
                                                   '[$CTRSERVE_LAUNCH_TEST_SET]"'],
                               env={"CTRSERVE_LAUNCH_TEST_DROP": None, "CTRSERVE_LAUNCH_TEST_SET": "set"})
        child.proc.wait(10)
        assert child.log_tail() == "[][inherited][set]"


# -- readiness --------------------------------------------------------------------------------
def test_wait_fails_at_once_with_the_log_tail_when_the_child_exits(tmp_path: Path) -> None:
    with Launcher(tmp_path) as launcher:
        child = launcher.spawn("crasher", ["sh", "-c", "echo bad flag --frobnicate; exit 3"])
        t0 = time.monotonic()
        with pytest.raises(ChildExited, match=r"(?s)crasher exited with code 3 while starting.*bad flag --frobnicate"):
            launch.wait_ready(child, lambda: False, timeout=120)
        assert time.monotonic() - t0 < 30  # not the 120 s timeout


def test_wait_times_out_with_the_last_reason(tmp_path: Path) -> None:
    def still_loading() -> bool:
        raise Pending("model ctr v2 still loading")

    with Launcher(tmp_path) as launcher:
        child = launcher.spawn("slow", SLEEPER)
        with pytest.raises(NotReady, match=r"slow not ready within 0 s \(last: model ctr v2 still loading\)"):
            launch.wait_ready(child, still_loading, timeout=0.3)
        with pytest.raises(NotReady, match=r"last: ConnectionRefusedError"):
            launch.wait_ready(child, lambda: launch.redis_ping(launch.free_port()), timeout=0.3)


def test_a_launch_error_from_the_check_fails_at_once(tmp_path: Path) -> None:
    def misconfigured() -> bool:
        raise GatewayConfigError("no routing config given")

    with Launcher(tmp_path) as launcher:
        child = launcher.spawn("gw", SLEEPER)
        t0 = time.monotonic()
        with pytest.raises(GatewayConfigError):
            launch.wait_ready(child, misconfigured, timeout=120)
        assert time.monotonic() - t0 < 30


@pytest.mark.quick
@pytest.mark.parametrize(("answer", "reason"), [
    ({"status": "not ready", "config_error": "no routing config given and the model repository /r holds models "
                                             "['a', 'b']", "checks": {"routing": "no config in effect: ..."}},
     "no routing config given and the model repository /r holds models ['a', 'b']"),
    ({"status": "not ready", "config_error": "bad routing file", "checks": {}}, "bad routing file"),
    ({"status": "not ready", "checks": {"routing": "no config in effect: starting", "store": "ok"}}, None),
    ({"status": "not ready", "checks": {"routing": "ok (abc)", "models": "ctr v1 loading"}}, None),
    (["not", "a", "dict"], None),
])
def test_readyz_config_error(answer: object, reason: str | None) -> None:
    assert launch.readyz_config_error(answer) == reason


# -- signals to the owning process ----------------------------------------------------------------
OWNER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from ctrserve.launch import Launcher, start_redis
    kind, work = sys.argv[1], Path(sys.argv[2])
    with Launcher(work) as launcher:
        redis = start_redis(launcher)
        sleeper = launcher.spawn("sleeper", ["sleep", "60"])
        print(redis.proc.pid, sleeper.pid, flush=True)
        if kind == "wait_any":
            launcher.wait_any()
        else:  # busy elsewhere, as a benchmark polling its Locust run
            while True:
                time.sleep(1)
""")


@pytest.mark.redis
@pytest.mark.parametrize("kind", ["wait_any", "busy"])
@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "SIGINT ignored at start"])
def test_signal_to_the_owner_alone_stops_it_and_its_children(kind: str, how: str, tmp_path: Path) -> None:
    """SIGINT inherited as ignored is how a shell script starts a background job (`cmd &`)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not found on PATH")
    sig = signal.SIGTERM if how == "SIGTERM" else signal.SIGINT
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if "ignored" in how else None
    owner = subprocess.Popen([sys.executable, "-c", OWNER, kind, str(tmp_path)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True, preexec_fn=ignore)
    try:
        pids = [int(p) for p in owner.stdout.readline().split()]
        assert len(pids) == 2, [*pids, owner.stdout.read()]
        owner.send_signal(sig)
        owner.wait(10)
        assert all(_gone(p, within=1) for p in pids), pids
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()


@pytest.mark.parametrize("owner_exit", ["SIGKILL", "exit"])
def test_children_die_with_their_owner(owner_exit: str, tmp_path: Path) -> None:
    """PDEATHSIG: even an owner killed by SIGKILL (no cleanup at all) leaves no child behind."""
    script = textwrap.dedent(f"""
        import os, signal
        from ctrserve.launch import Launcher
        launcher = Launcher({str(tmp_path)!r}, handle_signals=False)
        child = launcher.spawn("orphan-to-be", ["sleep", "60"])
        print(child.pid, flush=True)
        if {owner_exit!r} == "SIGKILL":
            os.kill(os.getpid(), signal.SIGKILL)
        os._exit(0)  # no atexit, no finally: only the kernel can stop the child
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    pid = int(out.stdout.split()[0])
    assert _gone(pid), f"child {pid} outlived its owner"


# -- redis-server ---------------------------------------------------------------------------------
@pytest.mark.redis
def test_redis_restarts_on_its_port_in_its_dir(tmp_path: Path) -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not found on PATH")
    with Launcher(tmp_path) as launcher:
        redis = launch.start_redis(launcher)
        port, first = redis.port, redis.proc.pid
        assert redis.url == f"redis://127.0.0.1:{port}/0" and launch.redis_ping(port)
        assert redis.data_dir.parent == tmp_path
        redis.stop()
        assert not redis.running and _gone(first)
        with pytest.raises(OSError):
            launch.redis_ping(port)
        redis.start()
        assert redis.port == port and redis.proc.pid != first and launch.redis_ping(port)
        listening = Path("/proc/net/tcp").read_text()
        assert f"0100007F:{port:04X}" in listening  # 127.0.0.1, the loopback bind
