"""Declarative dataset spec (YAML): which columns exist, their type, side and preprocessing.

A spec names every model input. Types:
- ``sparse``: a categorical id, embedded through a vocabulary (PAD=0, OOV=1).
- ``dense``: a numeric value, normalised (``standard``/``log``/``minmax``) or bucketised
  into a sparse id (``buckets: N``).
- ``sequence``: a user behaviour list of at most ``max_len`` events; each event carries
  ``fields`` (an item id first, then attributes), each field sharing the vocabulary and
  embedding of a sparse item-side feature (``share``).
``side`` says where a value comes from at serving time: the user's profile (``user``), the
candidate item (``item``) or the request (``context``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ctrserve.validation import describe

Side = Literal["user", "item", "context"]


class SpecError(ValueError):
    """A dataset spec that cannot be used, with a message naming the problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SparseSpec(_Strict):
    name: str
    type: Literal["sparse"] = "sparse"
    side: Side
    min_count: int = Field(1, ge=1)
    #: share the vocabulary and embedding table of another sparse feature
    share: str | None = None


class DenseSpec(_Strict):
    name: str
    type: Literal["dense"] = "dense"
    side: Side
    transform: Literal["standard", "log", "minmax", "none"] = "standard"
    #: quantile buckets turn the value into a sparse id (0 = off)
    buckets: int = Field(0, ge=0)


class SequenceField(_Strict):
    name: str
    share: str


class SequenceSpec(_Strict):
    name: str
    type: Literal["sequence"] = "sequence"
    side: Literal["user"] = "user"
    max_len: int = Field(..., ge=1)
    fields: list[SequenceField] = Field(..., min_length=1)


class MatchSpec(_Strict):
    """A candidate–history match feature: how the candidate's value of the sparse feature that
    ``field`` shares relates to that history field (``share`` of the events with it, or the
    ``recency`` of the latest one). Computed from the encoded inputs offline and in the gateway."""

    name: str
    type: Literal["match"] = "match"
    field: str
    op: Literal["share", "recency"]


FeatureSpec = SparseSpec | DenseSpec | SequenceSpec | MatchSpec


class SemanticIdSpec(_Strict):
    """Hierarchical item codes made by ``data prepare`` (models/data/semantic_ids.py)."""

    #: the item-side sparse feature holding the raw item ids
    item: str
    #: ``off``: item ids only; ``add``: codes beside the item id; ``replace``: codes instead of it
    #: (the paper's setting; the raw id stays the store's item key, not a model input)
    mode: Literal["off", "add", "replace"] = "off"
    levels: int = Field(3, ge=1, le=8)
    codebook: int = Field(32, ge=2)
    #: size of the behaviour (PPMI-SVD) vectors
    dim: int = Field(32, ge=2)
    #: item-side sparse features whose values place items by content (and place cold items)
    attributes: list[str] = Field(default_factory=list)
    content_dim: int = Field(16, ge=1)
    #: weight of the content part beside the behaviour part (both unit length)
    content_weight: float = Field(0.5, ge=0.0)
    #: cold items (no co-occurrence in training): nearest warm item by content, or one unknown code
    cold: Literal["neighbour", "unknown"] = "neighbour"
    #: share of the training users whose behaviour builds the codes; below 1 their training rows
    #: also leave the training split (in every mode, ``off`` included, so it is the control), so the
    #: codes are out-of-sample for every training row as they are for valid and test rows
    fit_users: float = Field(1.0, gt=0.0, le=1.0)
    seed: int = 2026


class DatasetSpec(_Strict):
    name: str
    #: the loader registered in models.data.datasets that yields the raw splits
    loader: str
    #: loader-specific options, e.g. a path relative to the data folder
    source: dict[str, Any] = Field(default_factory=dict)
    label: str = "label"
    #: the raw column used to group rows for GAUC (need not be a model input)
    user_id: str
    features: list[FeatureSpec] = Field(..., min_length=1)
    semantic_ids: SemanticIdSpec | None = None

    @model_validator(mode="after")
    def _check_names(self) -> DatasetSpec:
        names = [f.name for f in self.features]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate feature names: {sorted(dup)}")
        sparse = {f.name: f for f in self.features if isinstance(f, SparseSpec)}
        for f in self.features:
            shares = []
            if isinstance(f, SparseSpec) and f.share:
                shares.append(f.share)
            if isinstance(f, SequenceSpec):
                shares += [fld.share for fld in f.fields]
            for s in shares:
                if s not in sparse:
                    raise ValueError(f"feature {f.name!r} shares {s!r}, which is not a sparse feature")
                if sparse[s].share:
                    raise ValueError(f"feature {f.name!r} shares {s!r}, which itself shares another")
        if self.label in names:
            raise ValueError(f"label {self.label!r} must not also be a feature")
        fields = {fld.name: fld.share for f in self.sequences for fld in f.fields}
        for f in self.features:
            if isinstance(f, MatchSpec) and f.field not in fields:
                raise ValueError(f"match feature {f.name!r}: {f.field!r} is not a sequence field ({sorted(fields)})")
        sid = self.semantic_ids
        if sid is not None:
            bad = [n for n in [sid.item, *sid.attributes] if n not in sparse or sparse[n].side != "item"]
            if bad:
                raise ValueError(f"semantic_ids: {bad} are not item-side sparse features")
        return self

    @property
    def sequences(self) -> list[SequenceSpec]:
        return [f for f in self.features if isinstance(f, SequenceSpec)]


SPEC_DIR = Path(__file__).resolve().parent / "specs"


def load_spec(name_or_path: str | Path) -> DatasetSpec:
    """Load a spec by dataset name (``specs/<name>.yaml``) or path; raise SpecError with the reason."""
    path = Path(name_or_path)
    if not path.suffix:
        path = SPEC_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in SPEC_DIR.glob("*.yaml"))
        raise SpecError(f"no dataset spec {str(name_or_path)!r}; known datasets: {', '.join(known)}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {exc}") from exc
    return parse_spec(raw, source=str(path))


def parse_spec(raw: Any, source: str = "<spec>") -> DatasetSpec:
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: a dataset spec is a mapping, got {type(raw).__name__}")
    try:
        return DatasetSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(f"{source}: invalid dataset spec: {describe(exc)}") from None
