"""The feature map: what ``data prepare`` learned about a dataset, and the contract between the
offline path (models, export) and the online path (feature store, gateway).

It lists every model input tensor with its kind, side, dtype, vocabulary size and embedding
table, the sequences with their fields, and each feature's information-density statistics.
Stored as ``feature_map.json`` beside the prepared splits; read without torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

PAD_ID = 0
OOV_ID = 1


class DensityStats(BaseModel):
    """Information content of one feature on the training split."""

    model_config = ConfigDict(extra="forbid")
    cardinality: int  # distinct raw values seen in train
    entropy_bits: float  # Shannon entropy of the encoded value distribution
    coverage: float  # fraction of rows where the feature has a value (non-empty sequence)
    oov_rate: float  # fraction of train values mapped to OOV (min_count)
    #: log2(1 + rows with a value / 2**entropy): how many training rows back each effective value
    density: float


class Derived(BaseModel):
    """A feature computed from other inputs, offline and online alike
    (``ctrserve.contract.transforms.history_match``): never stored, never sent by a client."""

    model_config = ConfigDict(extra="forbid")
    op: Literal["share", "recency"]
    #: the behaviour-sequence field compared with the candidate
    field: str
    #: the candidate's sparse feature that field shares its vocabulary with
    target: str


class FeatureInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    #: ``sequence`` marks one field tensor ``[B, max_len]`` of a behaviour sequence
    kind: Literal["sparse", "dense", "sequence"]
    side: Literal["user", "item", "context"]
    dtype: Literal["int64", "float32"]
    #: embedding table this input looks up (itself, or the feature it shares); None for dense
    embedding: str | None = None
    #: rows of that embedding table, PAD and OOV included
    vocab_size: int | None = None
    sequence: str | None = None
    max_len: int | None = None
    stats: DensityStats | None = None
    #: dense normalisation parameters, applied the same way online
    transform: dict[str, float | str] | None = None
    #: set for a candidate–history match feature (dense, item side), computed from two other inputs
    derived: Derived | None = None


class SequenceInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    max_len: int
    #: input tensor names, item id field first (its PAD entries mark padding)
    fields: list[str]
    #: for each field, the sparse candidate feature it shares an embedding with
    targets: list[str]
    stats: DensityStats | None = None


class FeatureMap(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dataset: str
    label: str
    user_id: str
    features: list[FeatureInfo]
    sequences: list[SequenceInfo] = []
    num_rows: dict[str, int] = {}
    #: the raw item id when it keys the store's items but is no model input (semantic IDs replace it)
    item_key: FeatureInfo | None = None
    #: how the semantic IDs were made (levels, codebook, residual share per level, cold items)
    semantic_ids: dict[str, int | float | list[int] | list[float]] | None = None

    # -- lookups -------------------------------------------------------------------------
    def feature(self, name: str) -> FeatureInfo:
        """A model input by name, or the item key."""
        for f in [*self.features, *([self.item_key] if self.item_key else [])]:
            if f.name == name:
                return f
        raise KeyError(f"feature {name!r} not in the feature map of {self.dataset!r}")

    @property
    def sparse(self) -> list[FeatureInfo]:
        return [f for f in self.features if f.kind == "sparse"]

    @property
    def dense(self) -> list[FeatureInfo]:
        return [f for f in self.features if f.kind == "dense"]

    @property
    def sequence_fields(self) -> list[FeatureInfo]:
        return [f for f in self.features if f.kind == "sequence"]

    @property
    def input_names(self) -> list[str]:
        return [f.name for f in self.features]

    def embedding_tables(self) -> dict[str, int]:
        """Embedding table name -> number of rows, each table once."""
        tables: dict[str, int] = {}
        for f in self.features:
            if f.embedding is not None:
                tables.setdefault(f.embedding, int(f.vocab_size or 0))
        return tables

    def token_names(self) -> list[str]:
        """The field tokens a flat model sees: each sparse and dense feature, then one pooled
        token per sequence field, in spec order."""
        return [f.name for f in self.features]

    def density_order(self) -> list[str]:
        """Token names densest first (ties keep spec order); sequences count once per field."""
        def density(f: FeatureInfo) -> float:
            if f.kind == "sequence":
                seq = next(s for s in self.sequences if s.name == f.sequence)
                stats = seq.stats or f.stats
            else:
                stats = f.stats
            return stats.density if stats else 0.0

        order = sorted(range(len(self.features)), key=lambda i: (-density(self.features[i]), i))
        return [self.features[i].name for i in order]

    # -- io ------------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        path.write_text(self.model_dump_json(indent=2))

    @classmethod
    def load(cls, path: Path) -> FeatureMap:
        return cls.model_validate(json.loads(Path(path).read_text()))
