"""Feature map + stored values + request overrides -> the model's named input tensors.

Everything comes from the export manifest: input names, dtypes, wire shapes and sides (user side
batch 1, candidate side batch B), and the feature map that says where each input's value lives —
the user's profile or history (``user``), the candidate item (``item``), or the request
(``context``). Request-supplied values are raw (as in the dataset) and are encoded here exactly
as ``data prepare`` encoded them: vocabulary lookup (PAD=0 for missing, OOV=1 for unknown),
quantile buckets, or the dense normalisation. Nothing about a particular model is hard-coded.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ctrserve.contract.feature_map import OOV_ID, PAD_ID, FeatureInfo, FeatureMap
from ctrserve.contract.manifest import Manifest, TensorSpec
from ctrserve.contract.transforms import apply_dense, bucket_edges, bucketise, history_match
from ctrserve.contract.vocab import Vocabulary
from ctrserve.feature_store.base import RequestFeatures

from .request import ScoreRequest

Raw = Any  # a JSON scalar, or a list of scalars for a sequence field
_DTYPES = {"int64": np.int64, "float32": np.float32}


class AssemblyError(ValueError):
    """A request whose features cannot be turned into model inputs (HTTP 422)."""


def _is_number(x: Raw) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


@dataclass(frozen=True)
class _Input:
    spec: TensorSpec
    info: FeatureInfo
    dtype: type
    encode: Callable[[Raw], int | float]
    default: int | float  # cold start: OOV ids (like the feature store), neutral dense 0


class Assembler:
    """Builds the input dict for one exported model; immutable and shared by requests."""

    def __init__(self, manifest: Manifest, vocab: Mapping[str, Sequence[str]] | None):
        self.model = manifest.name
        self.version = manifest.version
        fmap: FeatureMap = manifest.feature_map
        self.fmap = fmap
        self._vocabs = {table: Vocabulary(list(values)) for table, values in (vocab or {}).items()}
        self.inputs: list[_Input] = []
        for spec in manifest.inputs:
            try:
                info = fmap.feature(spec.name)
            except KeyError as exc:
                raise ValueError(f"manifest {manifest.name} v{manifest.version}: {exc.args[0]}") from None
            if spec.dtype != info.dtype:
                raise ValueError(f"manifest input {spec.name!r} is {spec.dtype} but the feature map says {info.dtype}")
            default = 0.0 if info.kind == "dense" else (PAD_ID if info.kind == "sequence" else OOV_ID)
            self.inputs.append(_Input(spec, info, _DTYPES[spec.dtype], self._encoder(info), default))
        if not any(i.spec.side == "candidate" for i in self.inputs):
            raise ValueError(f"manifest {manifest.name} v{manifest.version} has no candidate-side input")
        by_side = {i.spec.name: i for i in self.inputs}
        #: candidate–history match features, computed from two other inputs after those are built
        self.derived = [i for i in self.inputs if i.info.derived is not None]
        for inp in self.derived:
            need = {inp.info.derived.field, inp.info.derived.target} - set(by_side)
            if need:
                raise ValueError(f"manifest input {inp.spec.name!r} is computed from {sorted(need)}, "
                                 "which are not inputs of the model")
        settable = {n: i for n, i in by_side.items() if i.info.derived is None}
        #: names a request's ``context`` may set: user profile, history fields, context features
        self.context_keys = frozenset(n for n, i in settable.items() if i.info.side in ("user", "context"))
        #: names one candidate's ``features`` may set: item and context features
        self.candidate_keys = frozenset(n for n, i in settable.items() if i.info.side in ("item", "context"))
        self._sequences = {s.name: [f for f in s.fields if f in by_side] for s in fmap.sequences}
        # raw ids are encoded directly for cold-start users/items (the vocabulary knows them)
        user_sparse = [f.name for f in fmap.features if f.side == "user" and f.kind == "sparse"]
        self.user_id_feature = fmap.user_id if fmap.user_id in user_sparse and fmap.user_id in by_side else None
        item_sparse = [f.name for f in fmap.features if f.side == "item" and f.kind == "sparse"]
        first = fmap.sequences[0].targets[0] if fmap.sequences else None
        item_id = first if first in item_sparse else (item_sparse or [None])[0]
        # semantic IDs in place of the item id: no input holds raw item ids, so none is encoded
        # from them (a raw id looked up in a code vocabulary would be a silent wrong answer)
        self.item_id_feature = item_id if item_id in by_side and fmap.item_key is None else None

    @classmethod
    def from_dir(cls, version_dir: Path) -> Assembler:
        """Load ``manifest.json`` and its vocabulary file from an exported version directory."""
        manifest = Manifest.load(version_dir)
        vocab = None
        if manifest.vocab_file:
            vocab = json.loads((Path(version_dir) / manifest.vocab_file).read_text())
        return cls(manifest, vocab)

    # -- encoders ----------------------------------------------------------------------------
    def _encoder(self, info: FeatureInfo) -> Callable[[Raw], int | float]:
        name = info.name
        if info.kind == "dense":
            params = dict(info.transform or {"kind": "none"})

            def dense(x: Raw) -> float:
                if x is not None and not _is_number(x):
                    raise AssemblyError(f"feature {name!r} is numeric: expected a number or null, got {x!r}")
                return float(apply_dense(np.array([np.nan if x is None else float(x)]), params)[0])

            return dense
        transform = info.transform or {}
        if transform.get("kind") == "buckets":
            edges = bucket_edges(transform)

            def bucketised(x: Raw) -> int:
                if x is not None and not _is_number(x):
                    raise AssemblyError(f"feature {name!r} is numeric: expected a number or null, got {x!r}")
                return int(bucketise(np.array([np.nan if x is None else float(x)]), edges)[0])

            return bucketised
        table = info.embedding or name

        def sparse(x: Raw) -> int:
            if isinstance(x, list | dict):
                raise AssemblyError(f"feature {name!r} is categorical: expected one value, got {type(x).__name__}")
            if x is None:
                return PAD_ID
            voc = self._vocabs.get(table)
            if voc is None:
                raise AssemblyError(f"feature {name!r}: the model was exported without vocabulary {table!r}, so raw "
                                    "values cannot be encoded")
            return voc.lookup(x)

        return sparse

    def _encode_sequence(self, inp: _Input, raw: Raw, length: int) -> np.ndarray:
        if raw is None:
            raw = []
        if not isinstance(raw, list):
            raise AssemblyError(f"feature {inp.spec.name!r} is a behaviour sequence: expected a list (most recent "
                                f"first), got {type(raw).__name__}")
        if any(isinstance(v, list | dict) for v in raw):
            raise AssemblyError(f"feature {inp.spec.name!r}: sequence events must be single values")
        out = np.full(length, PAD_ID, dtype=inp.dtype)
        kept = raw[:length]  # most recent first: truncation keeps the newest events
        if kept:
            out[: len(kept)] = [inp.encode(v) for v in kept]
        return out

    # -- checks ---------------------------------------------------------------------------
    def check_request(self, request: ScoreRequest) -> None:
        """Reject override names this model does not have (before any I/O)."""
        self.check_keys(request.context, request.candidate_features)

    def check_keys(self, context: Mapping[str, Raw] | None, candidates: Sequence[Mapping[str, Raw] | None]) -> None:
        if context:
            unknown = sorted(set(context) - self.context_keys)
            if unknown:
                raise AssemblyError(f"context sets unknown features {unknown} for model {self.model} "
                                    f"v{self.version}; allowed: {sorted(self.context_keys)}")
            for seq, fields in self._sequences.items():
                given = [f for f in fields if f in context]
                if given and len(given) != len(fields):
                    raise AssemblyError(f"context overrides sequence {seq!r} partially ({given}); give all of its "
                                        f"fields {fields}")
        for i, feats in enumerate(candidates):
            if feats:
                unknown = sorted(set(feats) - self.candidate_keys)
                if unknown:
                    raise AssemblyError(f"candidates[{i}].features sets unknown features {unknown} for model "
                                        f"{self.model} v{self.version}; allowed: {sorted(self.candidate_keys)}")

    # -- assembly -------------------------------------------------------------------------
    def cold_start(self, user_id: str, item_ids: Sequence[str]) -> RequestFeatures:
        """Features for a request the store could not answer (degraded mode): defaults, except that
        the user and item id features are encoded from the raw ids in the request."""
        user: dict[str, np.ndarray] = {}
        items: dict[str, np.ndarray] = {}
        seqs: dict[str, np.ndarray] = {}
        b = len(item_ids)
        for inp in self.inputs:
            info, name = inp.info, inp.spec.name
            if info.kind == "sequence":
                seqs[name] = np.zeros(int(info.max_len or inp.spec.shape[-1]), dtype=inp.dtype)
            elif info.side == "user":
                user[name] = np.asarray(inp.default, dtype=inp.dtype)
            elif info.side == "item":
                items[name] = np.full(b, inp.default, dtype=inp.dtype)
        return RequestFeatures(user=user, sequence=seqs, timestamps={}, sequence_length={}, items=items,
                               user_missing=True, profile_missing=True, missing_items=np.arange(b), version=0)

    def assemble_request(self, request: ScoreRequest, stored: RequestFeatures) -> dict[str, np.ndarray]:
        """The model inputs of one scoring request, from its fields and the stored features."""
        return self.assemble(request.user_id, request.item_ids, stored, request.context, request.candidate_features)

    def assemble(
        self,
        user_id: str,
        item_ids: Sequence[str],
        stored: RequestFeatures,
        context: Mapping[str, Raw] | None = None,
        candidate_features: Sequence[Mapping[str, Raw] | None] | None = None,
    ) -> dict[str, np.ndarray]:
        """Named arrays in manifest order: user side ``[1, ...]``, candidate side ``[B, ...]``."""
        context = context or {}
        b = len(item_ids)
        cand_feats = list(candidate_features or [None] * b)
        if len(cand_feats) != b:
            raise AssemblyError(f"{len(cand_feats)} candidate feature sets for {b} candidates")
        missing_items = np.asarray(stored.missing_items, dtype=np.int64).reshape(-1)
        overrides = [(i, feats) for i, feats in enumerate(cand_feats) if feats]  # usually none: one pass
        out: dict[str, np.ndarray] = {}
        for inp in self.inputs:
            spec, info, name = inp.spec, inp.info, inp.spec.name
            if info.derived is not None:
                continue
            if spec.side == "user":
                if info.kind == "sequence":
                    length = int(spec.shape[-1]) if spec.shape[-1] > 0 else int(info.max_len or 0)
                    if name in context:
                        arr = self._encode_sequence(inp, context[name], length)
                    else:
                        arr = _fit_length(stored.sequence.get(name), length, inp.dtype)
                    out[name] = arr.reshape(1, length)
                    continue
                if name in context:
                    value = inp.encode(context[name])
                elif name == self.user_id_feature and stored.user_missing:
                    value = inp.encode(user_id)
                else:
                    value = _scalar(stored.user.get(name), inp.default)
                out[name] = np.full((1, *spec.shape[1:]), value, dtype=inp.dtype)
                continue
            # candidate side: item features from the store, context features from the request
            if info.side == "item":
                stored_col = stored.items.get(name)
                col = (np.full(b, inp.default, dtype=inp.dtype) if stored_col is None
                       else np.array(stored_col, dtype=inp.dtype).reshape(-1))
                if col.shape[0] != b:
                    raise ValueError(f"store returned {col.shape[0]} values of {name!r} for {b} candidates")
                if name == self.item_id_feature and missing_items.size:
                    col[missing_items] = [inp.encode(item_ids[i]) for i in missing_items]
            elif info.side == "context":
                col = np.full(b, inp.encode(context.get(name)), dtype=inp.dtype)
            else:  # a user feature the export put on the candidate side: same for every candidate
                col = np.full(b, inp.encode(context[name]) if name in context
                              else _scalar(stored.user.get(name), inp.default), dtype=inp.dtype)
            for i, feats in overrides:
                if name in feats:
                    col[i] = inp.encode(feats[name])
            out[name] = col
        for inp in self.derived:
            d = inp.info.derived
            match = history_match(out[d.field].reshape(-1, out[d.field].shape[-1]), out[d.target], d.op)
            out[inp.spec.name] = match.reshape(b, *inp.spec.shape[1:]).astype(inp.dtype)
        if self.derived:  # back to manifest order, as the backends expect
            return {i.spec.name: out[i.spec.name] for i in self.inputs}
        return out

    def warmup_inputs(self, candidates: int) -> dict[str, np.ndarray]:
        """Zeros (PAD ids, neutral dense values) in every input's wire shape."""
        out = {}
        for inp in self.inputs:
            shape = [candidates if d == -1 else d for d in inp.spec.shape]
            if inp.info.kind == "sequence" and shape[-1] <= 0:
                shape[-1] = int(inp.info.max_len or 1)
            out[inp.spec.name] = np.zeros(shape, dtype=inp.dtype)
        return out


def _scalar(value: np.ndarray | None, default: int | float) -> int | float:
    if value is None:
        return default
    arr = np.asarray(value).reshape(-1)
    return arr[0].item() if arr.size else default


def _fit_length(arr: np.ndarray | None, length: int, dtype: type) -> np.ndarray:
    """A stored ``[L]`` history at the model's length: truncate (keeps the newest) or PAD-extend."""
    out = np.zeros(length, dtype=dtype)
    if arr is not None:
        a = np.asarray(arr).reshape(-1)[:length]
        out[: a.size] = a
    return out
