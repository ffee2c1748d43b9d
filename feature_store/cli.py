"""``ctrserve store ...``: bulk load, online updates and inspection of the Redis feature store.

``--dataset`` names the namespace: the prepared directory's name under ``work/processed``.
The Redis URL comes from ``--redis-url`` or ``CTRSERVE_REDIS_URL`` (other settings: env
``CTRSERVE_REDIS_*``, see feature_store/config.py). Heavy imports happen inside the commands.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Annotated, Any

import typer
from rich.console import Console

console = Console()
store_app = typer.Typer(help="Redis feature store: bulk load, online updates, inspection.", no_args_is_help=True)

DatasetOpt = Annotated[str, typer.Option("--dataset", help="namespace = prepared dataset name (work/processed/NAME)")]
UrlOpt = Annotated[str | None, typer.Option("--redis-url", help="redis:// or rediss:// URL (default: env, localhost)")]


def _config(redis_url: str | None, **overrides: Any):
    from .config import RedisStoreConfig

    return RedisStoreConfig(**({"url": redis_url} if redis_url else {}), **overrides)


def _run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a store coroutine; typed store errors and bad input become a one-line message."""
    from .errors import FeatureStoreError

    try:
        return asyncio.run(coro)
    except FeatureStoreError as exc:
        console.print(f"[red]store error ({type(exc).__name__}):[/] {exc}")
        raise typer.Exit(1) from None
    except (ValueError, FileNotFoundError, KeyError) as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None


async def _open(dataset: str, redis_url: str | None):
    from .backends import store_class

    config = _config(redis_url)
    return await store_class(config).from_active(dataset, config)


@store_app.command("load")
def load_cmd(
    dataset: DatasetOpt,
    redis_url: UrlOpt = None,
    batch_size: Annotated[int | None, typer.Option(help="users/items per pipeline")] = None,
) -> None:
    """Bulk-load a prepared dataset as a new version and flip `active` to it when complete."""
    from tqdm.auto import tqdm

    from ctrserve.paths import settings

    from .loader import load_prepared, read_prepared

    prepared = settings().processed_dir / dataset
    cfg = _config(redis_url, **({"bulk_batch_size": batch_size} if batch_size else {}))

    async def run() -> None:
        rec = read_prepared(prepared)  # read first so the bar knows the total
        with tqdm(total=len(rec.users) + len(rec.items), desc=f"load {dataset}", unit="rec") as bar:
            version, rec = await load_prepared(prepared, cfg, dataset, progress=bar.update)
        console.print(f"[green]active[/] {cfg.key_prefix}:{dataset} version {version}: {len(rec.users)} users, "
                      f"{len(rec.items)} items; skipped rows without a raw id: users {rec.skipped_user_rows}, "
                      f"items {rec.skipped_item_rows}")

    _run(run())


@store_app.command("append-event")
def append_event_cmd(
    dataset: DatasetOpt,
    user_id: Annotated[str, typer.Option(help="raw user id")],
    item_id: Annotated[str, typer.Option(help="raw item id; the event's fields copy its stored features")],
    ts: Annotated[int | None, typer.Option(help="unix seconds (default: now)")] = None,
    sequence: Annotated[str | None, typer.Option(help="sequence name (default: the first)")] = None,
    redis_url: UrlOpt = None,
) -> None:
    """Prepend a behaviour event to a user's sequence (trimmed to max_len atomically)."""
    async def run() -> None:
        store = await _open(dataset, redis_url)
        async with store:
            if (await store.online_read(user_id, [item_id])).missing_items.size:
                console.print(f"[yellow]warning:[/] item {item_id!r} is not in the store: the event gets OOV ids")
            n = await store.append_event(user_id, item_id, ts=ts, sequence=sequence)
        console.print(f"user {user_id!r}: {n} events")

    _run(run())


@store_app.command("put-item")
def put_item_cmd(
    dataset: DatasetOpt,
    item_id: Annotated[str, typer.Option(help="raw item id")],
    set_: Annotated[list[str], typer.Option("--set", help="encoded value of every item feature, e.g. cate_id=7")],
    redis_url: UrlOpt = None,
) -> None:
    """Create or replace an item (encoded values: vocabulary ids, normalised numbers)."""
    values: dict[str, float] = {}
    for item in set_:
        name, sep, value = item.partition("=")
        try:
            values[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            console.print(f"[red]error:[/] --set {item!r} is not NAME=NUMBER")
            raise typer.Exit(2)

    async def run() -> None:
        store = await _open(dataset, redis_url)
        async with store:
            await store.put_item(item_id, values)
        console.print(f"item {item_id!r} stored")

    _run(run())


@store_app.command("get-user")
def get_user_cmd(
    dataset: DatasetOpt,
    user_id: Annotated[str, typer.Option(help="raw user id")],
    events: Annotated[int, typer.Option(help="events to show per sequence")] = 10,
    redis_url: UrlOpt = None,
) -> None:
    """Show a user's profile and most recent events as the gateway would receive them."""
    async def run() -> None:
        store = await _open(dataset, redis_url)
        async with store:
            got = await store.online_read(user_id, [])
            sizes = await store.value_sizes(user_id)
        state = "MISSING (cold-start defaults)" if got.user_missing else "found"
        console.print(f"user {user_id!r} in version {got.version}: {state}; stored bytes {sizes}")
        console.print({k: v.item() for k, v in got.user.items()})
        for s in store.schema.sequences:
            n = got.sequence_length[s.name]
            console.print(f"sequence {s.name!r}: {n} of max {s.max_len} events (most recent first)")
            for f in s.fields:
                console.print(f"  {f}: {got.sequence[f][:min(n, events)].tolist()}")
            console.print(f"  ts: {got.timestamps[s.name][:min(n, events)].tolist()}")

    _run(run())


@store_app.command("info")
def info_cmd(dataset: DatasetOpt, redis_url: UrlOpt = None) -> None:
    """Show the active version's meta (schema, counts, source)."""
    async def run() -> None:
        store = await _open(dataset, redis_url)
        async with store:
            await store.online_read("", [])
            console.print(store.meta)

    _run(run())


@store_app.command("gc")
def gc_cmd(dataset: DatasetOpt, redis_url: UrlOpt = None) -> None:
    """Delete versions that are neither active nor being loaded (e.g. left by a crashed load)."""
    async def run() -> None:
        from ctrserve.contract.store_schema import StoreSchema

        from .backends import open_store

        async with open_store(StoreSchema.empty(dataset), _config(redis_url), dataset) as store:
            removed = await store.remove_stale_versions()
        console.print(f"removed {removed} keys")

    _run(run())
