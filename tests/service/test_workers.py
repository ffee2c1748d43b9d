"""The embedded backend's inference threads (``Workers``): results and errors reach the awaiting
request, a timed-out call does not break the next one, and the threads exit on close or when
their owner is garbage collected (as a ThreadPoolExecutor's do)."""

from __future__ import annotations

import asyncio
import gc
import threading
import time

import pytest

from ctrserve.service.backends.onnxruntime import Workers

pytestmark = pytest.mark.quick


class _Owner:
    pass


def _alive(name: str) -> int:
    return sum(t.name.startswith(name) and t.is_alive() for t in threading.enumerate())


def _wait_gone(name: str, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if _alive(name) == 0:
            return True
        time.sleep(0.01)
    return False


async def test_results_errors_and_timeouts() -> None:
    owner = _Owner()
    w = Workers(owner, 2, "wk-test")
    assert await w.submit(lambda a, b: a + b, 2, 3) == 5
    assert threading.current_thread().name not in await w.submit(lambda: threading.current_thread().name)

    def fail() -> None:
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        await w.submit(fail)
    with pytest.raises(TimeoutError):  # the late result is dropped, not set on a cancelled future
        async with asyncio.timeout(0.02):
            await w.submit(time.sleep, 0.2)
    assert await asyncio.gather(*(w.submit(lambda i=i: i * i) for i in range(20))) == [i * i for i in range(20)]
    w.close()
    with pytest.raises(RuntimeError, match="closed"):
        w.submit(int)
    assert _wait_gone("wk-test")


async def test_threads_exit_when_the_owner_is_collected() -> None:
    owner = _Owner()
    owner.pool = Workers(owner, 1, "wk-gc")  # the owner holds its workers, as the backend does
    assert await owner.pool.submit(lambda: 1) == 1
    assert _alive("wk-gc") == 1
    del owner
    gc.collect()
    assert _wait_gone("wk-gc")


async def test_calls_queued_while_all_threads_are_busy_all_run_before_close() -> None:
    owner = _Owner()
    w = Workers(owner, 2, "wk-busy")
    release = threading.Event()
    started = [threading.Event(), threading.Event()]
    order: list[int] = []

    def block(i: int) -> int:
        started[i].set()
        release.wait(5)
        return i

    blocked = [w.submit(block, i) for i in range(2)]
    for e in started:  # both threads are busy
        assert await asyncio.to_thread(e.wait, 5)
    queued = [w.submit(order.append, i) for i in range(5)]
    w.close()  # the queued calls still run, then the threads exit
    release.set()
    assert await asyncio.gather(*blocked) == [0, 1]
    await asyncio.gather(*queued)
    assert sorted(order) == list(range(5))  # two threads: taken in order, finished in any
    assert _wait_gone("wk-busy")
