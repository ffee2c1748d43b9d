"""Semantic IDs: hierarchical item codes learnt from behaviour and content, as a data step.

MGDIN (paper §2, "Problem formulation") replaces raw item ids by dense semantic IDs before any
grouping. Here they are made once, in ``data prepare``, so every model sees the same inputs:

1. **Behaviour vectors** from the training split only: a user × item incidence matrix (items in
   the user's training histories and positive targets), its item–item co-occurrence turned into
   positive PMI, factorised by truncated SVD (the item2vec / co-occurrence factorisation
   equivalence). Items with no co-occurrence in training are *cold*. With ``fit_users`` < 1 only
   a share of the training users builds them, and their rows leave the training split.
2. **Content vectors** from the item's attributes (the other item-side sparse features, e.g. brand
   and category), one-hot, reduced by SVD. Attributes are item metadata, read from every split.
3. **Residual k-means**: warm items' vectors (behaviour ⊕ weighted content) are clustered level by
   level on the residual of the previous levels, so items sharing a code prefix are similar.
4. **Cold items** get the codes of the warm item nearest in content (cosine), or an explicit
   unknown code when they have no attributes (``cold: neighbour``), or always (``cold: unknown``).

The codes become ordinary item-side sparse features ``sid_1 .. sid_L`` (and history fields sharing
them), so export, the feature store and the gateway serve them unchanged. Deterministic for a seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import sparse
from sklearn.cluster import KMeans
from sklearn.decomposition import TruncatedSVD

from ctrserve.contract.prepared import SPLITS

from .datasets import RawSplits
from .spec import DatasetSpec, SemanticIdSpec, SequenceField, SequenceSpec, SparseSpec

#: the raw code of an item that has neither behaviour nor attributes to place it
UNKNOWN_CODE = "unk"


@dataclass
class SemanticIdReport:
    """What the quantiser did: sizes, errors and how items were placed (``semantic_ids.json``)."""

    levels: int
    codebook: int
    warm_items: int
    cold_items: int
    cold_by_neighbour: int
    cold_unknown: int
    #: share of warm items' squared norm left after each level (1.0 = nothing explained)
    residual_share: list[float] = field(default_factory=list)
    #: share of warm items whose full code tuple another warm item also has
    collision_rate: float = 0.0
    distinct_codes: list[int] = field(default_factory=list)


def _keys(values: np.ndarray) -> np.ndarray:
    """Raw ids as sortable keys: integer ids stay integers (missing: negative), others strings."""
    arr = np.asarray(values)
    return arr if arr.dtype.kind in "iu" else arr.astype(str)


def _present(keys: np.ndarray) -> np.ndarray:
    return keys >= 0 if keys.dtype.kind in "iu" else (keys != "") & (keys != "-1")


def _raw_items(values: np.ndarray) -> np.ndarray:
    flat = _keys(values).reshape(-1)
    return np.unique(flat[_present(flat)])


def _item_field_names(spec: DatasetSpec, item: str) -> list[str]:
    """The item column and every history field that holds the same item ids."""
    names = [item]
    for seq in spec.sequences:
        names += [f.name for f in seq.fields if f.share == item]
    return names


def behaviour_vectors(spec: DatasetSpec, train: dict[str, np.ndarray], items: np.ndarray,
                      sid: SemanticIdSpec) -> np.ndarray:
    """``[len(items), dim]`` L2-normalised PPMI-SVD vectors from the training split; zero rows for
    items that co-occur with nothing there. ``items``: the sorted raw ids of every split."""
    positive = np.asarray(train[spec.label]) > 0
    rows, cols = [], []
    for name in _item_field_names(spec, sid.item):
        col = _keys(train[name])
        keep = positive if col.ndim == 1 else np.ones(len(col), dtype=bool)
        col = col[keep].reshape(int(keep.sum()), -1)
        ok = _present(col)
        rows.append(np.broadcast_to(np.flatnonzero(keep)[:, None], col.shape)[ok])
        cols.append(np.searchsorted(items, col[ok]))
    # rows index training rows; one row per user is what co-occurrence needs
    users = np.unique(_keys(train[spec.user_id]), return_inverse=True)[1]
    user_idx = users[np.concatenate(rows)]
    user_codes = np.arange(int(users.max(initial=-1)) + 1)
    x = sparse.coo_matrix((np.ones(len(user_idx)), (user_idx, np.concatenate(cols))),
                          shape=(len(user_codes), len(items))).tocsr()
    x.data[:] = 1.0  # incidence: an item counts once per user
    co = (x.T @ x).tocsr()
    co.setdiag(0)
    co.eliminate_zeros()
    total, marg = co.sum(), np.asarray(co.sum(axis=1)).ravel()
    co = co.tocoo()
    pmi = np.log(co.data * total / (marg[co.row] * marg[co.col]))
    keep = pmi > 0
    ppmi = sparse.csr_matrix((pmi[keep], (co.row[keep], co.col[keep])), shape=co.shape)
    dim = min(sid.dim, len(items) - 1)
    vec = TruncatedSVD(dim, n_iter=7, random_state=sid.seed).fit_transform(ppmi)
    return _normalise(vec)


def content_vectors(splits: list[dict[str, np.ndarray]], items: np.ndarray, sid: SemanticIdSpec) -> np.ndarray:
    """``[len(items), ≤ content_dim]`` L2-normalised SVD of the items' one-hot attributes (last
    value seen in any of ``splits``); zero rows for items without attributes; ``[n, 0]`` without any."""
    if not sid.attributes:
        return np.zeros((len(items), 0))
    blocks = []
    for attr in sid.attributes:
        values = np.full(len(items), "", dtype=object)
        for split in splits:
            ids = _keys(split[sid.item])
            vals = np.asarray(split[attr]).astype(str)
            ok = _present(ids) & (vals != "") & (vals != "-1")
            values[np.searchsorted(items, ids[ok])] = vals[ok]  # the last value seen wins
        present = values != ""
        codes, inv = np.unique(values[present].astype(str), return_inverse=True)
        blocks.append(sparse.csr_matrix((np.ones(int(present.sum())), (np.flatnonzero(present), inv)),
                                        shape=(len(items), len(codes))))
    onehot = sparse.hstack(blocks).tocsr()
    dim = min(sid.content_dim, onehot.shape[1] - 1)
    if dim < 1:
        return _normalise(onehot.toarray())
    return _normalise(TruncatedSVD(dim, n_iter=7, random_state=sid.seed).fit_transform(onehot))


def _normalise(vec: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(vec, axis=1, keepdims=True)
    return np.divide(vec, norm, out=np.zeros_like(vec, dtype=np.float64), where=norm > 0)


def residual_kmeans(vectors: np.ndarray, levels: int, codebook: int, seed: int
                    ) -> tuple[np.ndarray, list[float]]:
    """``[n, levels]`` codes and, per level, the share of squared norm left in the residual."""
    residual = vectors.astype(np.float64).copy()
    base = float((residual**2).sum()) or 1.0
    codes, left = np.zeros((len(vectors), levels), dtype=np.int64), []
    for level in range(levels):
        k = min(codebook, len(np.unique(residual.round(12), axis=0)))
        km = KMeans(n_clusters=k, n_init=3, random_state=seed + level).fit(residual)
        codes[:, level] = km.labels_
        residual -= km.cluster_centers_[km.labels_]
        left.append(round(float((residual**2).sum()) / base, 4))
    return codes, left


def hold_out_fit_users(spec: DatasetSpec, raw: RawSplits, sid: SemanticIdSpec
                       ) -> tuple[dict[str, np.ndarray], RawSplits]:
    """``fit_users`` < 1: a seeded share of the training users, whose training rows build the codes
    and leave the training split. Why: a training row's target co-occurs with its own history in
    codes fitted on every training user, which no valid or test row's target does. Returns the fit
    rows and the splits without them; ``raw`` itself is left as it was."""
    train = {name: np.asarray(col) for name, col in raw["train"].items()}
    users, inverse = np.unique(_keys(train[spec.user_id]), return_inverse=True)
    fit_row = (np.random.default_rng(sid.seed).random(len(users)) < sid.fit_users)[inverse]
    if fit_row.all() or not fit_row.any():
        raise ValueError(f"semantic_ids.fit_users={sid.fit_users} leaves no training rows on one side "
                         f"of the {len(users)} training users")
    kept = {name: col[~fit_row] for name, col in train.items()}
    return {name: col[fit_row] for name, col in train.items()}, {**raw, "train": kept}


def assign_codes(spec: DatasetSpec, raw: RawSplits, sid: SemanticIdSpec,
                 fit_rows: dict[str, np.ndarray] | None = None
                 ) -> tuple[dict[str, list[str]], SemanticIdReport]:
    """Raw item id -> its ``levels`` code strings, for every item in any split; behaviour from
    ``fit_rows`` (:func:`hold_out_fit_users`), else from the training split."""
    splits = [raw[s] for s in SPLITS] + ([fit_rows] if fit_rows is not None else [])
    items = np.unique(np.concatenate([_raw_items(split[n]) for split in splits
                                      for n in _item_field_names(spec, sid.item)]))
    behaviour = behaviour_vectors(spec, raw["train"] if fit_rows is None else fit_rows, items, sid)
    content = content_vectors(splits, items, sid)  # the fit rows' items have attributes too
    warm = np.linalg.norm(behaviour, axis=1) > 0
    vectors = np.hstack([behaviour, sid.content_weight * content])[warm]
    codes, left = residual_kmeans(vectors, sid.levels, sid.codebook, sid.seed)
    table: dict[str, list[str]] = {}
    for item, code in zip(items[warm].tolist(), codes.tolist(), strict=True):
        table[item] = [str(c) for c in code]
    cold = np.flatnonzero(~warm)
    by_neighbour = 0
    has_content = np.linalg.norm(content, axis=1) > 0
    warm_idx = np.flatnonzero(warm & has_content)
    for i in cold.tolist():
        if sid.cold == "neighbour" and has_content[i] and len(warm_idx):
            nearest = warm_idx[int(np.argmax(content[warm_idx] @ content[i]))]
            table[items[i]] = table[items[nearest]]
            by_neighbour += 1
        else:
            table[items[i]] = [UNKNOWN_CODE] * sid.levels
    tuples = [tuple(c) for c in codes.tolist()]
    counts: dict[tuple[int, ...], int] = {}
    for t in tuples:
        counts[t] = counts.get(t, 0) + 1
    report = SemanticIdReport(
        levels=sid.levels, codebook=sid.codebook, warm_items=int(warm.sum()), cold_items=len(cold),
        cold_by_neighbour=by_neighbour, cold_unknown=len(cold) - by_neighbour, residual_share=left,
        collision_rate=round(sum(1 for t in tuples if counts[t] > 1) / max(len(tuples), 1), 4),
        distinct_codes=[len(np.unique(codes[:, level])) for level in range(sid.levels)],
    )
    return table, report


def _map(values: np.ndarray, table: dict[str, list[str]], levels: int) -> list[np.ndarray]:
    """Each level's code strings for an array of raw item ids (``""`` where the id is missing)."""
    uniq, inverse = np.unique(_keys(values), return_inverse=True)
    codes = [table.get(v, [""] * levels) for v in uniq.tolist()]
    shape = np.shape(values)
    return [np.asarray([c[level] for c in codes], dtype=str)[inverse].reshape(shape) for level in range(levels)]


def add_semantic_ids(spec: DatasetSpec, raw: RawSplits, fit_rows: dict[str, np.ndarray] | None = None
                     ) -> tuple[DatasetSpec, RawSplits, SemanticIdReport]:
    """The spec and raw splits with ``sid_1..sid_L`` item features (and history fields sharing them);
    in ``replace`` mode the raw item id leaves the model inputs and stays only as the item key."""
    sid = spec.semantic_ids
    if sid is None or sid.mode == "off":
        raise ValueError(f"{spec.name}: semantic IDs are off in this spec")
    table, report = assign_codes(spec, raw, sid, fit_rows)
    names = [f"sid_{level + 1}" for level in range(sid.levels)]
    features: list = []
    for f in spec.features:
        if isinstance(f, SparseSpec) and f.name == sid.item:
            features += [SparseSpec(name=n, side="item") for n in names]
            if sid.mode == "add":
                features.append(f)
        elif isinstance(f, SequenceSpec):
            fields = [fld for fld in f.fields if not (sid.mode == "replace" and fld.share == sid.item)]
            hist = [fld.name for fld in f.fields if fld.share == sid.item]
            sid_fields = [SequenceField(name=f"{h}_sid_{level + 1}", share=names[level])
                          for h in hist for level in range(sid.levels)]
            features.append(f.model_copy(update={"fields": sid_fields + fields}))
        else:
            features.append(f)
    for split in (raw[s] for s in SPLITS):
        columns = {sid.item: names}
        for seq in spec.sequences:
            for fld in seq.fields:
                if fld.share == sid.item:
                    columns[fld.name] = [f"{fld.name}_sid_{level + 1}" for level in range(sid.levels)]
        for column, outs in columns.items():
            for out, codes in zip(outs, _map(split[column], table, sid.levels), strict=True):
                split[out] = codes
    new = spec.model_copy(update={"features": features, "semantic_ids": None})
    return type(spec).model_validate(new.model_dump()), raw, report
