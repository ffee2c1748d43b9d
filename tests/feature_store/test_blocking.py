"""The Redis store's BlockingReader against a real redis-server: reads without an event loop,
sent now and collected later, on the blocking pool (feature_store/blocking.py)."""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest
import redis
from store_records import assert_items, assert_user, make_records, make_store

from ctrserve.feature_store import BlockingReader, StoreTimeout, StoreUnavailable

pytestmark = pytest.mark.redis


async def test_blocking_read_matches_async_read_and_defers_version_changes(redis_url: str) -> None:
    """The same features as ``online_read``; None (use the async read, which adopts and checks the
    version) before the first read and after a flip; typed errors."""
    users, items = make_records(0)
    new_users, new_items = make_records(2)
    async with make_store(redis_url) as store, make_store(redis_url) as reader_store:
        await store.bulk_load(users, items)
        reader = reader_store.blocking_reader()
        assert isinstance(reader, BlockingReader) and reader_store.blocking_reader() is reader  # one per store
        assert reader.timeout_s == 2.0  # the socket timeout: timeout_ms
        assert reader.read("u1", ["i1"]) is None  # no version adopted yet
        ref = await reader_store.online_read("u1", ["i3", "no-such-item", "i0"])
        got = reader.read("u1", ["i3", "no-such-item", "i0"])
        assert got is not None and got.version == ref.version
        assert_user(got, users, 1)
        np.testing.assert_array_equal(got.missing_items, [1])
        for f in ref.items:
            np.testing.assert_array_equal(got.items[f], ref.items[f])
        assert got.item_cache_hits == 2  # the async read cached i3 and i0 for the blocking one
        cold = reader.read("nobody", [])
        assert cold is not None and cold.user_missing and cold.sequence_length["hist"] == 0

        await store.bulk_load(new_users, new_items)  # a flip: the blocking read hands back to the async one
        assert reader.read("u2", ["i0"]) is None
        assert_user(await reader_store.online_read("u2", ["i0"]), new_users, 2)
        got = reader.read("u2", ["i0", "i5"])
        assert got is not None
        assert_user(got, new_users, 2)
        assert_items(got, new_items, [0, 5])
    async with make_store(redis_url, timeout_ms=100) as store:
        await store.online_read("u1", ["i1"])
        with redis.Redis.from_url(redis_url) as client:
            client.execute_command("CLIENT", "PAUSE", "600", "ALL")
        with pytest.raises(StoreTimeout, match="100 ms"):
            store.blocking_reader().read("u1", ["i1"])
        await asyncio.sleep(0.7)
        assert_user(store.blocking_reader().read("u1", ["i1"]), new_users, 1)


async def test_pending_read_across_a_flip(redis_url: str) -> None:
    """A read sent before a flip answers under the version it was sent for; one sent after the
    flip, under the version the store adopted before it, gives None (read with online_read)."""
    users, items = make_records(0)
    new_users, new_items = make_records(2)
    async with make_store(redis_url) as store, make_store(redis_url) as loader:
        version = await loader.bulk_load(users, items)
        await store.online_read("u1", [])  # adopts the version
        reader = store.blocking_reader()
        before = reader.begin("u1", ["i2"])
        await loader.bulk_load(new_users, new_items)
        got = before.result()
        assert got is not None and got.version == version
        assert_user(got, users, 1)
        after = reader.begin("u1", ["i2"])
        assert after is not None and after.result() is None
        assert reader.pool.busy == 0 and reader.pool.idle == 1  # both connections' replies were read
        assert_user(await store.online_read("u1", []), new_users, 1)
        assert_user(reader.begin("u1", []).result(), new_users, 1)


async def test_cancel_returns_the_connection_and_saturated_when_all_are_out(redis_url: str) -> None:
    users, items = make_records(0)
    async with make_store(redis_url, pool_size=2) as store:
        await store.bulk_load(users, items)
        await store.online_read("u1", [])
        reader = store.blocking_reader()
        first = reader.begin("u1", ["i1"])
        assert not reader.saturated and reader.pool.busy == 1
        second = reader.begin("u2", ["i2"])
        assert reader.saturated and reader.pool.busy == 2  # a third begin() would wait for a connection
        second.cancel()
        assert not reader.saturated and reader.pool.busy == 1 and reader.pool.idle == 1
        second.cancel()  # a no-op the second time
        with pytest.raises(RuntimeError, match="already collected or cancelled"):
            second.result()
        assert_user(first.result(), users, 1)
        assert reader.pool.busy == 0 and reader.pool.idle == 2


async def test_begun_read_is_collected_or_cancelled_and_frees_its_connection(redis_server, redis_url: str) -> None:
    """``begin`` sends the MGET; ``result()`` gives what ``read`` gives; ``cancel()`` drains the
    reply, so a pool of one connection keeps answering correctly; a connection broken by a
    server restart is healed once."""
    users, items = make_records(0)
    async with make_store(redis_url, pool_size=1) as store:
        await store.bulk_load(users, items)
        await store.online_read("u1", ["i1"])  # adopts the version
        reader = store.blocking_reader()
        pending = reader.begin("u1", ["i2", "i4"])
        assert pending is not None
        got = pending.result()
        assert got is not None
        assert_user(got, users, 1)
        assert_items(got, items, [2, 4])
        pending.cancel()  # no-op once collected
        with pytest.raises(RuntimeError, match="already collected"):
            pending.result()
        for _ in range(3):  # each cancelled reply leaves the socket: the next read gets its own
            reader.begin("u2", ["i0"]).cancel()
        got = reader.begin("u3", ["i5"]).result()
        assert_user(got, users, 3)
        assert_items(got, items, [5])
        # two reads in flight on one thread: the second takes a connection of its own (the pool's only
        # one is taken, so it waits its timeout and fails clearly), the first still gets its answer
        first = reader.begin("u1", ["i1"])
        assert reader.saturated
        with pytest.raises(StoreUnavailable):
            reader.begin("u2", ["i2"])
        assert_user(first.result(), users, 1)
        assert not reader.saturated
        assert reader.pool.idle == 1  # the connection waits for the next read, not in the pool
        with redis.Redis.from_url(redis_url) as client:
            client.save()
        redis_server.stop()
        try:
            with pytest.raises(StoreUnavailable, match="cannot reach"):
                reader.read("u1", ["i1"])
        finally:
            redis_server.start()
        assert_user(reader.read("u1", ["i1"]), users, 1)  # the same pool reconnects
    assert reader.pool.idle == 0  # closed: back to the pool and disconnected


async def test_first_connection_refused_is_a_typed_error(redis_server, redis_url: str) -> None:
    """A version adopted, then Redis goes away before the blocking pool has any connection."""
    users, items = make_records(0)
    async with make_store(redis_url) as store:
        await store.bulk_load(users, items)
        await store.online_read("u1", [])
        with redis.Redis.from_url(redis_url) as client:
            client.save()
        redis_server.stop()
        try:
            with pytest.raises(StoreUnavailable, match="cannot reach.*read user 'u1'|read user 'u1'.*cannot reach"):
                store.blocking_reader().read("u1", ["i1"])
        finally:
            redis_server.start()
        assert_user(store.blocking_reader().read("u1", ["i1"]), users, 1)


async def test_forked_child_reads_on_its_own_connections(redis_url: str) -> None:
    """A child forked with idle and checked-out connections in its parent's pool starts with none
    (it must not read replies meant for the parent); both then read correctly."""
    users, items = make_records(0)
    async with make_store(redis_url, pool_size=2) as store:
        await store.bulk_load(users, items)
        await store.online_read("u1", [])
        reader = store.blocking_reader()
        held = reader.begin("u2", ["i1"])  # one connection checked out, its reply unread
        reader.read("u1", [])  # and one idle
        assert reader.pool.idle == 1 and reader.pool.busy == 1
        pid = os.fork()
        if pid == 0:  # the child: report through the exit status only
            code = 1
            try:
                if reader.pool.idle == 0 and reader.pool.busy == 0 and not reader.saturated:
                    got = reader.read("u3", ["i5"])
                    code = 0 if got is not None and int(got.user["user_id"]) == users.profile["user_id"][3] else 2
                    reader.begin("u0", [])  # left uncollected: on a shared socket the parent would read it
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        got = reader.read("u1", ["i1"])  # on the connection idle at the fork: no stray reply of the child's
        assert_user(got, users, 1)
        assert_items(got, items, [1])
        assert_user(held.result(), users, 2)
