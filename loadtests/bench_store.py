"""``ctrserve bench store``: latency of one request's feature fetch against a private redis-server.

One request = a user with a full behaviour sequence (L = 600 events of the synthetic schema:
item id, category, timestamp) + 100 candidate items, read with ``RedisOnlineStore.online_read``
(one MGET round trip, decoded into numpy arrays) with the item cache off and warm. For scale
the same run times the bare client doing the same network work without decoding: a
non-transactional pipeline GET (sequence) + MGET (100 items), sync hiredis and
``redis.asyncio``. Variants run interleaved in rounds so machine noise hits them alike.

With ``--cluster`` (the default) the same data and requests also go to a local Redis Cluster of 3
masters + 3 replicas (``ctrserve.launch_cluster``), in the same rounds, and then a master is
killed during reads (``failover_run``) to time the error window.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import numpy as np
import typer

from ctrserve.feature_store import ItemRecords, RedisStoreConfig, SequenceSchema, StoreSchema, UserRecords
from ctrserve.launch import Launcher, start_redis
from ctrserve.launch_cluster import failover_run, start_redis_cluster

from .harness import Figures, failing_as_exit, interleave_async, latency_stats, machine_facts, print_table

SECTION = "store"


def bench_schema(max_len: int) -> StoreSchema:
    """The synthetic dataset's store schema (models/data/specs/synthetic.yaml) at a given L."""
    return StoreSchema(
        dataset="bench", user_id_feature="user_id", item_id_feature="item_id",
        user_sparse=["user_id", "segment"], user_dense=["age"],
        item_sparse=["item_id", "cate_id"], item_dense=["price", "quality"],
        sequences=[SequenceSchema(name="hist", fields=["hist_item_id", "hist_cate_id"],
                                  targets=["item_id", "cate_id"], max_len=max_len)],
    )


def bench_records(n_users: int, n_items: int, max_len: int, seed: int = 0) -> tuple[UserRecords, ItemRecords]:
    rng = np.random.default_rng(seed)
    hist_item = rng.integers(2, n_items + 2, (n_users, max_len))
    users = UserRecords(
        ids=[f"user{u}" for u in range(n_users)],
        profile={"user_id": np.arange(2, n_users + 2), "segment": rng.integers(2, 10, n_users),
                 "age": rng.normal(size=n_users).astype(np.float32)},
        sequences={"hist_item_id": hist_item, "hist_cate_id": hist_item % 50 + 2},
        timestamps={"hist": 1_700_000_000 - np.tile(np.arange(max_len) * 60, (n_users, 1))},
    )
    items = ItemRecords(ids=[f"item{i}" for i in range(n_items)], features={
        "item_id": np.arange(2, n_items + 2), "cate_id": np.arange(n_items) % 50 + 2,
        "price": rng.normal(size=n_items).astype(np.float32), "quality": rng.normal(size=n_items).astype(np.float32)})
    return users, items


async def _bench(url: str, n_users: int, n_items: int, max_len: int, candidates: int, rounds: int,
                 per_round: int, cluster_url: str | None = None) -> dict[str, Any]:
    import redis
    import redis.asyncio as aioredis

    from ctrserve.feature_store.keys import Keys
    from ctrserve.feature_store.redis_store import RedisOnlineStore

    schema = bench_schema(max_len)
    users, items = bench_records(n_users, n_items, max_len)
    base_cfg = {"url": url, "timeout_ms": 2000, "cleanup_grace_s": 0, "pool_size": 4}
    async with RedisOnlineStore(schema, RedisStoreConfig(**base_cfg), "bench") as loader:
        version = await loader.bulk_load(users, items)
        sizes = await loader.value_sizes(users.ids[0])
    plain = RedisOnlineStore(schema, RedisStoreConfig(**base_cfg, item_cache_size=0), "bench")
    cached = RedisOnlineStore(schema, RedisStoreConfig(**base_cfg, item_cache_size=100_000), "bench")
    stores = [plain, cached]
    if cluster_url:  # the same data and requests on the cluster
        from ctrserve.feature_store.backends import open_store

        cluster_cfg = {**base_cfg, "url": cluster_url}
        async with open_store(schema, RedisStoreConfig(**cluster_cfg), "bench") as loader:
            await loader.bulk_load(users, items)
        stores += [open_store(schema, RedisStoreConfig(**cluster_cfg, item_cache_size=size), "bench")
                   for size in (0, 100_000)]
    for start in range(0, n_items, candidates):  # warm the caches with every item
        for store in stores[1::2]:
            await store.online_read(users.ids[0], items.ids[start:start + candidates])

    rng = np.random.default_rng(1)
    n_req = rounds * per_round
    req_users = [users.ids[u] for u in rng.integers(0, n_users, n_req)]
    req_items = [[items.ids[i] for i in rng.choice(n_items, candidates, replace=False)] for _ in range(n_req)]
    keys = Keys("ctrserve:fs", "bench").version(version)
    seq_keys = [keys.sequence("hist", u) for u in req_users]
    item_keys = [keys.items(its) for its in req_items]

    sync_client = redis.Redis.from_url(url)
    async_client = aioredis.Redis.from_url(url)
    with sync_client.pipeline(transaction=False) as warm:  # connect and check the keys exist
        warm.get(seq_keys[0]).mget(item_keys[0])
        got = warm.execute()
        assert got[0] is not None and None not in got[1], "benchmark keys missing"

    def sync_pipe(k: int) -> None:
        pipe = sync_client.pipeline(transaction=False)
        pipe.get(seq_keys[k])
        pipe.mget(item_keys[k])
        pipe.execute()

    async def async_pipe(k: int) -> None:
        pipe = async_client.pipeline(transaction=False)
        pipe.get(seq_keys[k])
        pipe.mget(item_keys[k])
        await pipe.execute()

    variants = {"sync_pipeline": sync_pipe, "async_pipeline": async_pipe,
                "store": lambda k: plain.online_read(req_users[k], req_items[k]),
                "store_cached": lambda k: cached.online_read(req_users[k], req_items[k])}
    for name, store in zip(("store_cluster", "store_cluster_cached"), stores[2:], strict=False):
        variants[name] = lambda k, store=store: store.online_read(req_users[k], req_items[k])
    hits_before = (cached.item_cache.hits, cached.item_cache.misses)
    # round 0 warms up and is discarded; every variant of a round reads the same requests
    samples = await interleave_async({name: lambda i, fn=fn: fn(i % n_req) for name, fn in variants.items()},
                                     rounds, per_round, warmup=1)
    hits = cached.item_cache.hits - hits_before[0]
    misses = cached.item_cache.misses - hits_before[1]
    mem = sum(sync_client.memory_usage(k) or 0 for k in (keys.user(users.ids[0]), seq_keys[0]))
    server_version = sync_client.info("server")["redis_version"]
    sync_client.close()
    await async_client.aclose()
    for store in stores:
        await store.close()
    return {"lat": {name: latency_stats(s) for name, s in samples.items()}, "sizes": sizes, "memory": mem,
            "hit_rate": hits / max(1, hits + misses), "n": rounds * per_round, "redis_version": server_version}


def store_figures(res: dict[str, Any], max_len: int, candidates: int) -> Figures:
    lat, fig, size = res["lat"], Figures(), f"_L{max_len}"
    fig.add("store_fetch_p50_ms", lat["store"]["p50"], f"p50 of `online_read`: user (L={max_len}) + {candidates} "
            "items, item cache off, decoded to numpy")
    fig.add("store_fetch_p99_ms", lat["store"]["p99"], "p99 of the same")
    fig.add("store_fetch_cached_p50_ms", lat["store_cached"]["p50"], "p50 with a warm item cache "
            f"(hit rate {res['hit_rate']:.0%}: only the user's keys go to Redis)")
    fig.add("store_fetch_cached_p99_ms", lat["store_cached"]["p99"], "p99 of the same")
    fig.add("store_baseline_sync_p50_ms", lat["sync_pipeline"]["p50"], "bare sync hiredis pipeline GET sequence + "
            f"MGET {candidates} items, no decoding (scale reference)")
    fig.add("store_baseline_async_p50_ms", lat["async_pipeline"]["p50"], "bare `redis.asyncio` pipeline, same keys")
    fig.add("store_fetch_vs_async_baseline", round(lat["store"]["p50"] / lat["async_pipeline"]["p50"], 2),
            "store p50 / bare async pipeline p50")
    if "store_cluster" in lat:
        fig.add("store_cluster_fetch_p50_ms", lat["store_cluster"]["p50"], "p50 of the same `online_read` on a local "
                "Redis Cluster of 3 masters + 3 replicas (item cache off)")
        fig.add("store_cluster_fetch_p99_ms", lat["store_cluster"]["p99"], "p99 of the same")
        fig.add("store_cluster_vs_single", round(lat["store_cluster"]["p50"] / lat["store"]["p50"], 2),
                "cluster p50 / single-node p50, same requests, same run")
        fig.add("store_cluster_fetch_cached_p50_ms", lat["store_cluster_cached"]["p50"], "cluster p50 with a warm "
                "item cache (only the pointer and the user's keys go to Redis)")
    fig.add("store_bytes_per_user" + size, sum(res["sizes"].values()), f"value bytes per user at L={max_len}: "
            f"profile {res['sizes']['profile']} + sequence {res['sizes']['hist']}")
    fig.add("store_redis_memory_per_user" + size, res["memory"], "Redis MEMORY USAGE of the user's two keys (bytes)")
    return fig


async def _failover(cluster: Any, max_len: int, n_users: int, n_items: int, candidates: int) -> dict[str, Any]:
    from ctrserve.feature_store.backends import open_store

    config = RedisStoreConfig(url=cluster.url, timeout_ms=100, item_cache_size=0)
    async with open_store(bench_schema(max_len), config, "bench") as store:
        return await failover_run(cluster, store, [f"user{u}" for u in range(n_users)],
                                  [f"item{i}" for i in range(n_items)], candidates)


def run(n_users: int = 1000, n_items: int = 5000, max_len: int = 600, candidates: int = 100, rounds: int = 4,
        per_round: int = 500, record: bool = True, cluster: bool = True) -> dict[str, Any]:
    """Run the benchmark; with ``record`` merge the figures into docs/benchmarks.json and .md."""
    with Launcher() as launcher:
        url = start_redis(launcher, timeout=15).url
        local = start_redis_cluster(launcher) if cluster else None
        res = asyncio.run(_bench(url, n_users, n_items, max_len, candidates, rounds, per_round,
                                 local.url if local else None))
        if local is not None:
            res["failover"] = asyncio.run(_failover(local, max_len, n_users, n_items, candidates))
    fig = store_figures(res, max_len, candidates)
    if local is not None:
        window, failover = res["failover"]["error_window_s"], res["failover"]
        fig.add("cluster_failover_error_window_s", round(window, 2) if window is not None else None, "a master "
                f"SIGKILLed during reads (cluster-node-timeout {local.node_timeout_ms} ms): kill -> first success "
                "after the last failed read of a user on it, same client object")
        fig.add("cluster_failover_failed_requests", failover["failed"], f"reads that failed (typed error within the "
                f"100 ms budget) out of {failover['requests']}, alternating users on the dead master and elsewhere; "
                f"{failover['failed_other']} of them for users elsewhere")
        fig.add("cluster_start_s", round(local.start_s, 2), "6 redis-server processes started and formed into "
                "a cluster (`redis-cli --cluster create`), replicas in sync")
    if record:
        notes = [f"{res['n']} requests per variant in {rounds} interleaved rounds (plus one warm-up round), "
                 f"{n_users} users, {n_items} items; redis-server and client share the machine's cores.",
                 "Sequence value: 8-byte header + L x (2 fields + timestamp) int32; see docs/feature_store.md.",
                 "Issue 7's scale reference (9.6 KB sequence, 100 items): p50 0.18 ms sync hiredis, 0.22 ms "
                 "redis.asyncio; the baselines above are re-measured in the same run for a fair ratio.",
                 "p99 mostly reflects other work on the shared machine (see load_avg_1m)."]
        if cluster:
            notes.append("Cluster: 6 more redis-server processes on the same cores; a read sends one pipeline "
                         "per master (pointer GET, user MGET, a GET per item). Failover: reads at 100 ms budget.")
        fig.record(SECTION, "Feature store: one request's fetch", "ctrserve bench store", notes,
                   machine_facts(redis_server=res["redis_version"]))
    return {"figures": fig.values(), "latency_ms": res["lat"], **res}


def store_cmd(
    users: Annotated[int, typer.Option(help="users loaded (each with a full sequence)")] = 1000,
    items: Annotated[int, typer.Option(help="items loaded")] = 5000,
    max_len: Annotated[int, typer.Option(help="sequence length L")] = 600,
    candidates: Annotated[int, typer.Option(help="candidate items per request")] = 100,
    rounds: Annotated[int, typer.Option(help="interleaved measuring rounds")] = 4,
    per_round: Annotated[int, typer.Option(help="requests per variant per round")] = 500,
    record: Annotated[bool, typer.Option(help="write docs/benchmarks.json and .md")] = True,
    cluster: Annotated[bool, typer.Option(help="also on a local Redis Cluster (3+3), with a failover")] = True,
) -> None:
    """p50/p99 of one request's feature fetch (user + candidates) against a private redis-server."""
    from rich.console import Console

    console = Console()
    with failing_as_exit(console):
        out = run(users, items, max_len, candidates, rounds, per_round, record, cluster)
    print_table(console, f"one request: user L={max_len} + {candidates} items ({out['n']} requests per variant)",
                ("variant", "p50 ms", "p99 ms", "mean ms"),
                ((name, *(f"{lat[k]:.3f}" for k in ("p50", "p99", "mean"))) for name, lat in out["latency_ms"].items()))
    console.print(out["figures"])
