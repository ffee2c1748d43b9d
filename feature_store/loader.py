"""Bulk load from a prepared dataset (``work/processed/<name>``, written by ``ctrserve data prepare``).

Each user's profile and LATEST history come from their most recent row in the last split that
has them (test > valid > train; within a split, the last row); each item's features from its
last row. Keys are raw ids, recovered through ``vocab.json``: raw = vocab[table][id - 2].
Rows whose user or item id is PAD/OOV (e.g. users below ``min_count``) cannot be keyed by a raw
id and are skipped; the report counts them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctrserve.contract.feature_map import OOV_ID, PAD_ID, FeatureMap
from ctrserve.contract.prepared import SPLITS  # oldest first: later splits override earlier ones
from ctrserve.contract.store_schema import StoreSchema

from .base import ItemRecords, Progress, UserRecords
from .config import RedisStoreConfig


@dataclass
class PreparedRecords:
    schema: StoreSchema
    users: UserRecords
    items: ItemRecords
    #: rows skipped because their user / item id is PAD or OOV (no raw id to key them by)
    skipped_user_rows: int
    skipped_item_rows: int
    vocab_sha256: str


def _latest_rows(columns: list[np.ndarray]) -> dict[int, tuple[int, int]]:
    """Encoded id -> (split index, row) of its last occurrence, later splits winning."""
    latest: dict[int, tuple[int, int]] = {}
    for k, ids in enumerate(columns):
        rev = ids[::-1]
        uniq, first = np.unique(rev, return_index=True)
        last = len(ids) - 1 - first
        latest.update(zip(uniq.tolist(), ((k, int(r)) for r in last.tolist()), strict=True))
    return latest


def _gather(splits: list[dict[str, np.ndarray]], where: list[tuple[int, int]], column: str) -> np.ndarray:
    """Rows ``where`` of ``column`` across splits, in order."""
    if not where:
        return np.zeros((0, *splits[0][column].shape[1:]), splits[0][column].dtype)
    split_idx = np.asarray([w[0] for w in where])
    rows = np.asarray([w[1] for w in where])
    out = np.empty((len(where), *splits[0][column].shape[1:]), splits[0][column].dtype)
    for k, split in enumerate(splits):
        m = split_idx == k
        out[m] = split[column][rows[m]]
    return out


def _raw_ids(vocab: list[str], encoded: list[int]) -> list[str]:
    return [vocab[i - 2] for i in encoded]


def read_prepared(prepared_dir: Path) -> PreparedRecords:
    prepared_dir = Path(prepared_dir)
    for name in ("feature_map.json", "vocab.json", *(f"{s}.npz" for s in SPLITS)):
        if not (prepared_dir / name).exists():
            raise FileNotFoundError(f"{prepared_dir / name} not found: run `ctrserve data prepare` first")
    fmap = FeatureMap.load(prepared_dir / "feature_map.json")
    schema = StoreSchema.from_feature_map(fmap)
    if schema.user_id_feature is None:
        raise ValueError(f"{fmap.dataset}: the user id column {fmap.user_id!r} is not a user-side sparse feature, "
                         "so users cannot be keyed by raw id")
    vocab_bytes = (prepared_dir / "vocab.json").read_bytes()
    vocab = json.loads(vocab_bytes)
    splits = []
    for split in SPLITS:
        with np.load(prepared_dir / f"{split}.npz", allow_pickle=False) as z:
            splits.append({k: z[k] for k in z.files})

    def keyed(feature: str) -> tuple[list[str], list[tuple[int, int]], int]:
        table = fmap.feature(feature).embedding or feature
        latest = _latest_rows([s[feature] for s in splits])
        skipped_ids = [i for i in latest if i in (PAD_ID, OOV_ID)]
        skipped_rows = sum(int(np.isin(s[feature], skipped_ids).sum()) for s in splits) if skipped_ids else 0
        kept = sorted(i for i in latest if i not in (PAD_ID, OOV_ID))
        return _raw_ids(vocab[table], kept), [latest[i] for i in kept], skipped_rows

    user_ids, user_rows, skipped_users = keyed(schema.user_id_feature)
    users = UserRecords(
        ids=user_ids,
        profile={f: _gather(splits, user_rows, f) for f in schema.user_sparse + schema.user_dense},
        sequences={f: _gather(splits, user_rows, f) for s in schema.sequences for f in s.fields},
    )
    item_ids, item_rows, skipped_items = keyed(schema.item_id_feature)
    items = ItemRecords(ids=item_ids,
                        features={f: _gather(splits, item_rows, f) for f in schema.item_sparse + schema.item_dense})
    return PreparedRecords(schema, users, items, skipped_users, skipped_items, hashlib.sha256(vocab_bytes).hexdigest())


async def load_prepared(prepared_dir: Path, config: RedisStoreConfig | None = None, namespace: str | None = None,
                        progress: Progress | None = None) -> tuple[int, PreparedRecords]:
    """Bulk-load a prepared dataset as a new version (namespace: the prepared directory's name)."""
    from .backends import open_store

    prepared_dir = Path(prepared_dir)
    rec = read_prepared(prepared_dir)
    async with open_store(rec.schema, config or RedisStoreConfig(), namespace or prepared_dir.name) as store:
        version = await store.bulk_load(rec.users, rec.items, progress=progress, source=str(prepared_dir),
                                        vocab_sha256=rec.vocab_sha256, skipped_user_rows=rec.skipped_user_rows,
                                        skipped_item_rows=rec.skipped_item_rows)
    return version, rec
