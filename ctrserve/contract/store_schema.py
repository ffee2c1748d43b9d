"""What the store keeps, derived from the feature map (the offline/online contract).

Per user: a profile (the map's user-side sparse and dense features) and, per behaviour
sequence, the most recent ``max_len`` events (each event: the sequence's fields — item id
first — plus a timestamp). Per item: its item-side sparse and dense features. Context-side
features come with the request and are not stored. All values are stored encoded (ids,
normalised numbers), so the gateway only assembles tensors.
"""

from __future__ import annotations

import json

import numpy as np
from pydantic import BaseModel, ConfigDict

from .feature_map import OOV_ID, FeatureMap


class SequenceSchema(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    #: encoded id fields of one event, item id first (a PAD item id marks padding)
    fields: list[str]
    #: for each field, the item feature whose value it copies when an event is appended by item id
    targets: list[str]
    max_len: int


class StoreSchema(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    dataset: str
    #: the user-side sparse feature whose vocabulary holds the raw user ids (bulk load keys)
    user_id_feature: str | None
    #: the item-side sparse feature whose vocabulary holds the raw item ids (bulk load keys)
    item_id_feature: str
    user_sparse: list[str]
    user_dense: list[str]
    item_sparse: list[str]
    item_dense: list[str]
    sequences: list[SequenceSchema]

    @classmethod
    def from_feature_map(cls, fmap: FeatureMap, item_id_feature: str | None = None) -> StoreSchema:
        def names(side: str, kind: str) -> list[str]:
            # derived features are computed from the others at assembly time, never stored
            return [f.name for f in fmap.features if f.side == side and f.kind == kind and f.derived is None]

        item_sparse = names("item", "sparse")
        # semantic IDs in place of the item id: the raw id keys the store but is no model input
        key_only = item_id_feature is None and fmap.item_key is not None
        if key_only:
            item_id_feature = fmap.item_key.name
        elif item_id_feature is None:
            # the sequence's item-id field names the item id; else the first item-side sparse feature
            first_target = fmap.sequences[0].targets[0] if fmap.sequences else None
            item_id_feature = first_target if first_target in item_sparse else (item_sparse or [None])[0]
        if not key_only and (item_id_feature is None or item_id_feature not in item_sparse):
            raise ValueError(
                f"feature map {fmap.dataset!r}: no item-side sparse feature {item_id_feature!r} to key items by; "
                f"item-side sparse features are {item_sparse}"
            )
        user_sparse = names("user", "sparse")
        return cls(
            dataset=fmap.dataset,
            user_id_feature=fmap.user_id if fmap.user_id in user_sparse else None,
            item_id_feature=item_id_feature,
            user_sparse=user_sparse,
            user_dense=names("user", "dense"),
            item_sparse=item_sparse,
            item_dense=names("item", "dense"),
            sequences=[SequenceSchema(name=s.name, fields=s.fields, targets=s.targets, max_len=s.max_len)
                       for s in fmap.sequences],
        )

    @classmethod
    def empty(cls, dataset: str) -> StoreSchema:
        """A placeholder for tools that handle keys and versions, not values (e.g. ``store gc``)."""
        return cls(dataset=dataset, user_id_feature=None, item_id_feature="", user_sparse=[], user_dense=[],
                   item_sparse=[], item_dense=[], sequences=[])

    def sequence(self, name: str | None) -> SequenceSchema:
        if not self.sequences:
            raise ValueError(f"dataset {self.dataset!r} has no behaviour sequence")
        if name is None:
            return self.sequences[0]
        for s in self.sequences:
            if s.name == name:
                return s
        raise ValueError(f"no sequence {name!r}; known: {[s.name for s in self.sequences]}")

    def user_defaults(self) -> tuple[np.ndarray, np.ndarray]:
        """Cold-start profile: OOV ids, dense 0."""
        return (np.full(len(self.user_sparse), OOV_ID, dtype=np.int32),
                np.zeros(len(self.user_dense), dtype=np.float32))

    def item_defaults(self) -> tuple[np.ndarray, np.ndarray]:
        return (np.full(len(self.item_sparse), OOV_ID, dtype=np.int32),
                np.zeros(len(self.item_dense), dtype=np.float32))

    def to_json(self) -> str:
        return json.dumps(self.model_dump(), sort_keys=True)
