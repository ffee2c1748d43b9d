"""``ctrserve data prepare``: raw splits -> vocabularies, normalised numbers, density stats,
columnar splits (``.npz``) and the feature map (``feature_map.json``, ``vocab.json``)."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError
from tqdm.auto import tqdm

from ctrserve.contract.feature_map import Derived, FeatureInfo, FeatureMap, SequenceInfo
from ctrserve.contract.prepared import FEATURE_MAP_FILE, SPLITS, USER_KEY, VOCAB_FILE
from ctrserve.contract.transforms import apply_dense, bucket_edges, bucketise, history_match
from ctrserve.contract.vocab import Vocabulary
from ctrserve.validation import describe

from .datasets import VOCAB_KEY, RawSplits, load_raw
from .density import dense_stats, sequence_stats, sparse_stats
from .semantic_ids import add_semantic_ids, hold_out_fit_users
from .spec import DatasetSpec, DenseSpec, MatchSpec, SequenceSpec, SparseSpec, SpecError, load_spec


@dataclass
class Prepared:
    out_dir: Path
    feature_map: FeatureMap


def dataset_identity(dataset: str | Path, overrides: dict[str, Any] | None = None) -> str:
    """The name of ``dataset`` as prepared with loader ``overrides``: the spec's file stem, then
    ``-<key><value>`` per override in key order (``amazon_sports-categoryBeauty-pathamazon_beauty``).
    It names the prepared folder, the run folder and the results records, so runs on differently
    prepared data never share a name. Without overrides it is the plain dataset name."""
    flat: dict[str, Any] = {}
    for key, value in (overrides or {}).items():  # a nested override (a.b=1) reads as key "a.b"
        flat.update({f"{key}.{sub}": v for sub, v in value.items()} if isinstance(value, dict) else {key: value})
    tag = "".join(f"-{k}{v}" for k, v in sorted(flat.items()))
    return f"{Path(dataset).stem}{tag}".replace("/", "_")  # a path value must not nest folders


def apply_overrides(spec: DatasetSpec, overrides: dict[str, Any] | None) -> DatasetSpec:
    """``max_len`` resizes every sequence; ``semantic_ids.<option>`` sets an option of the spec's
    semantic-ID block (e.g. ``semantic_ids.mode=replace``); any other key is a loader source option."""
    if not overrides:
        return spec
    overrides = dict(overrides)
    data = spec.model_dump()
    if "max_len" in overrides:
        max_len = int(overrides.pop("max_len"))
        for f in data["features"]:
            if f["type"] == "sequence":
                f["max_len"] = max_len
    sid = dict(overrides.pop("semantic_ids", None) or {})  # from --set semantic_ids.mode=... (nested)
    sid.update({k.split(".", 1)[1]: overrides.pop(k) for k in list(overrides) if k.startswith("semantic_ids.")})
    if sid:
        if data.get("semantic_ids") is None:
            raise SpecError(f"{spec.name}: the spec has no semantic_ids block to set {sorted(sid)} in")
        data["semantic_ids"] = {**data["semantic_ids"], **sid}
    data["source"] = {**data["source"], **overrides}
    try:
        return DatasetSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(f"{spec.name}: invalid override: {describe(exc)}") from None


def _check_raw(spec: DatasetSpec, raw: RawSplits) -> None:
    for split in SPLITS:
        if split not in raw:
            raise SpecError(f"loader {spec.loader!r} returned no {split!r} split")
        cols = raw[split]
        need = [spec.label, spec.user_id]
        for f in spec.features:
            if isinstance(f, MatchSpec):
                continue  # computed from the encoded columns
            need += [fld.name for fld in f.fields] if isinstance(f, SequenceSpec) else [f.name]
        missing = [c for c in need if c not in cols]
        if missing:
            raise SpecError(f"loader {spec.loader!r}: split {split!r} lacks columns {missing}")
        n = len(cols[spec.label])
        for c in need:
            if len(cols[c]) != n:
                raise SpecError(f"split {split!r}: column {c!r} has {len(cols[c])} rows, label has {n}")
        for f in spec.sequences:
            for fld in f.fields:
                shape = np.shape(cols[fld.name])
                if len(shape) != 2 or shape[1] != f.max_len:
                    raise SpecError(f"sequence field {fld.name!r} has shape {shape}, expected (N, {f.max_len})")


def _dense_transform(spec: DenseSpec, train: np.ndarray) -> dict[str, float | str]:
    x = np.asarray(train, dtype=np.float64)
    x = x[~np.isnan(x)]
    if spec.transform == "log":
        x = np.log1p(np.maximum(x, 0))
    params: dict[str, float | str] = {"kind": spec.transform}
    if spec.transform in ("standard", "log"):
        params.update(mean=float(x.mean()) if x.size else 0.0, std=float(x.std()) or 1.0 if x.size else 1.0)
    elif spec.transform == "minmax":
        lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 1.0)
        params.update(min=lo, max=hi if hi > lo else lo + 1.0)
    return params


def prepare(
    dataset: str | Path,
    data_dir: Path,
    out_dir: Path,
    overrides: dict[str, Any] | None = None,
) -> Prepared:
    spec = apply_overrides(load_spec(dataset), overrides)
    raw = load_raw(spec.loader, data_dir, spec, **spec.source)
    _check_raw(spec, raw)
    sid, sid_report, fit_rows = spec.semantic_ids, None, None
    if sid is not None and sid.fit_users < 1:
        fit_rows, raw = hold_out_fit_users(spec, raw, sid)
    if sid is not None and sid.mode != "off":
        spec, raw, sid_report = add_semantic_ids(spec, raw, fit_rows)
        _check_raw(spec, raw)
    vocabs, dense_params = _fit(spec, raw["train"], raw.get(VOCAB_KEY, {}))
    out: dict[str, dict[str, np.ndarray]] = {split: {} for split in SPLITS}
    infos: list[FeatureInfo] = []
    seq_infos: list[SequenceInfo] = []
    for f in tqdm(spec.features, desc=f"{spec.name}: encode", leave=False):
        if isinstance(f, SequenceSpec):
            seq_infos.append(_encode_sequence(f, raw, vocabs, out, infos))
        elif not isinstance(f, MatchSpec):
            infos.append(_encode_feature(f, raw, vocabs, dense_params, out))
    infos += [_encode_match(f, spec, out) for f in spec.features if isinstance(f, MatchSpec)]
    for split in SPLITS:
        out[split][spec.label] = np.asarray(raw[split][spec.label], dtype=np.float32)
        out[split][USER_KEY] = np.unique(np.asarray(raw[split][spec.user_id]).astype(str), return_inverse=True)[1]
    item_key = None
    if sid is not None and sid.mode == "replace":
        item_key = _encode_key(sid.item, raw, vocabs, out)
    fmap = FeatureMap(
        dataset=spec.name, label=spec.label, user_id=spec.user_id, features=infos, sequences=seq_infos,
        num_rows={split: len(out[split][spec.label]) for split in SPLITS}, item_key=item_key,
        semantic_ids=asdict(sid_report) if sid_report else None,
    )
    _write(Path(out_dir), spec, out, fmap, vocabs)
    return Prepared(out_dir=Path(out_dir), feature_map=fmap)


def _fit(spec: DatasetSpec, train: dict[str, np.ndarray], fit_on: dict[str, np.ndarray]
         ) -> tuple[dict[str, Vocabulary], dict[str, dict[str, float | str]]]:
    """Vocabularies (an owner table is fitted on its own column plus every column sharing it, or on
    the loader's ``fit_on`` ids for it) and the dense transforms, on the training split."""
    vocabs: dict[str, Vocabulary] = {}
    dense_params: dict[str, dict[str, float | str]] = {}
    sharers: dict[str, list[str]] = {}
    for f in spec.features:
        if isinstance(f, SparseSpec) and f.share:
            sharers.setdefault(f.share, []).append(f.name)
        if isinstance(f, SequenceSpec):
            for fld in f.fields:
                sharers.setdefault(fld.share, []).append(fld.name)
    for f in tqdm(spec.features, desc=f"{spec.name}: vocabularies", leave=False):
        if isinstance(f, SparseSpec) and not f.share:
            cols = [train[f.name]] + [train[c] for c in sharers.get(f.name, [])]
            cols = [fit_on[f.name]] if f.name in fit_on else cols
            vocabs[f.name] = Vocabulary.fit(cols, min_count=f.min_count)
        elif isinstance(f, DenseSpec) and f.buckets:
            x = np.asarray(train[f.name], dtype=np.float64)
            edges = np.unique(np.nanquantile(x, np.linspace(0, 1, f.buckets + 1)[1:-1]))
            dense_params[f.name] = {"kind": "buckets", "edges": json.dumps(edges.tolist())}
        elif isinstance(f, DenseSpec):
            dense_params[f.name] = _dense_transform(f, train[f.name])
    return vocabs, dense_params


def _encode_feature(f: SparseSpec | DenseSpec, raw: RawSplits, vocabs: dict[str, Vocabulary],
                    dense_params: dict[str, dict[str, float | str]], out: dict[str, dict[str, np.ndarray]]
                    ) -> FeatureInfo:
    """Encode one sparse or dense column of every split into ``out``; its feature-map entry."""
    train = raw["train"]
    if isinstance(f, SparseSpec):
        owner = f.share or f.name
        voc = vocabs[owner]
        for split in SPLITS:
            out[split][f.name] = voc.encode(raw[split][f.name])
        card = int(np.unique(np.asarray(train[f.name])).size)
        return FeatureInfo(name=f.name, kind="sparse", side=f.side, dtype="int64", embedding=owner,
                           vocab_size=len(voc), stats=sparse_stats(out["train"][f.name], card))
    if f.buckets:
        edges = bucket_edges(dense_params[f.name])
        for split in SPLITS:
            out[split][f.name] = bucketise(raw[split][f.name], edges)
        return FeatureInfo(name=f.name, kind="sparse", side=f.side, dtype="int64", embedding=f.name,
                           vocab_size=len(edges) + 3, transform=dense_params[f.name],
                           stats=sparse_stats(out["train"][f.name], len(edges) + 1))
    for split in SPLITS:
        out[split][f.name] = apply_dense(raw[split][f.name], dense_params[f.name])
    return FeatureInfo(name=f.name, kind="dense", side=f.side, dtype="float32",
                       transform=dense_params[f.name], stats=dense_stats(train[f.name]))


def _encode_match(f: MatchSpec, spec: DatasetSpec, out: dict[str, dict[str, np.ndarray]]) -> FeatureInfo:
    """A candidate–history match column from the encoded history field and candidate feature, with
    the same function the gateway applies online."""
    target = next(fld.share for seq in spec.sequences for fld in seq.fields if fld.name == f.field)
    for split in SPLITS:
        out[split][f.name] = history_match(out[split][f.field], out[split][target], f.op)
    return FeatureInfo(name=f.name, kind="dense", side="item", dtype="float32", transform={"kind": "none"},
                       derived=Derived(op=f.op, field=f.field, target=target),
                       stats=dense_stats(out["train"][f.name]))


def _encode_key(name: str, raw: RawSplits, vocabs: dict[str, Vocabulary],
                out: dict[str, dict[str, np.ndarray]]) -> FeatureInfo:
    """The raw item id as the store's item key only (no model reads it): its vocabulary spans every
    split, so items first seen after training are still keyed and served their semantic IDs."""
    vocabs[name] = Vocabulary.fit([raw[split][name] for split in SPLITS])
    for split in SPLITS:
        out[split][name] = vocabs[name].encode(raw[split][name])
    return FeatureInfo(name=name, kind="sparse", side="item", dtype="int64", vocab_size=len(vocabs[name]))


def _encode_sequence(f: SequenceSpec, raw: RawSplits, vocabs: dict[str, Vocabulary],
                     out: dict[str, dict[str, np.ndarray]], infos: list[FeatureInfo]) -> SequenceInfo:
    """Encode a behaviour sequence's fields into ``out``, their entries into ``infos``."""
    stats = None
    for i, fld in enumerate(f.fields):
        voc = vocabs[fld.share]
        for split in SPLITS:
            out[split][fld.name] = voc.encode(raw[split][fld.name])
        card = int(np.unique(np.asarray(raw["train"][fld.name])).size)
        fstats = sequence_stats(out["train"][fld.name], card)
        if i == 0:
            stats = fstats
        infos.append(FeatureInfo(
            name=fld.name, kind="sequence", side="user", dtype="int64", embedding=fld.share,
            vocab_size=len(voc), sequence=f.name, max_len=f.max_len, stats=fstats,
        ))
    return SequenceInfo(name=f.name, max_len=f.max_len, fields=[fld.name for fld in f.fields],
                        targets=[fld.share for fld in f.fields], stats=stats)


def _write(out_dir: Path, spec: DatasetSpec, out: dict[str, dict[str, np.ndarray]], fmap: FeatureMap,
           vocabs: dict[str, Vocabulary]) -> None:
    # written beside the destination and renamed into place: a reader never sees a half-written
    # copy, and two processes preparing the same dataset at once (two training jobs started
    # together on a fresh machine) both finish instead of one failing on the other's directory
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.writing-", dir=out_dir.parent))
    try:
        for split in tqdm(SPLITS, desc=f"{spec.name}: write", leave=False):
            np.savez(tmp / f"{split}.npz", **out[split])
        fmap.save(tmp / FEATURE_MAP_FILE)
        (tmp / VOCAB_FILE).write_text(json.dumps({k: v.to_json() for k, v in vocabs.items()}))
        (tmp / "spec.json").write_text(spec.model_dump_json(indent=2))
        _publish(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already once published


def _publish(tmp: Path, out_dir: Path) -> None:
    """Rename the finished copy ``tmp`` to ``out_dir``, replacing an older copy. Losing a race to
    another process that published the same preparation in between is fine: its copy stays."""
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        with contextlib.suppress(FileNotFoundError):  # another process moved it aside first
            out_dir.rename(old / "copy")
    try:
        tmp.rename(out_dir)
    except OSError:
        if not (out_dir / "feature_map.json").exists():
            raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
