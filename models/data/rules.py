"""No-model rules on a prepared sequence dataset: how far the history alone ranks candidates.

For every behaviour-sequence field and the candidate feature it shares an embedding with (e.g.
``hist_cate_id`` / ``cate_id``), two scores per row: how many history events match the
candidate (``count``) and which share of the history they are (``share``). A model that uses the
history should beat these; one that does not is mistuned (``ctrserve data rules``). Candidates
with an out-of-vocabulary id never match (two unknown ids are not the same item).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ctrserve.contract.feature_map import OOV_ID, PAD_ID, FeatureMap
from ctrserve.contract.prepared import USER_KEY, load_split

from ..train.metrics import auc, auc_se_by_users, gauc, paired_auc_gap_by_users


def rule_scores(fmap: FeatureMap, data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every rule's score per row of one split: ``{"share(hist_cate_id == cate_id)": [...], ...}``.
    Candidates with an out-of-vocabulary id never match (two unknown ids are not the same item)."""
    if not fmap.sequences:
        raise ValueError(f"{fmap.dataset} has no behaviour sequence: no history rules to score")
    scores: dict[str, np.ndarray] = {}
    for seq in fmap.sequences:
        length = (data[seq.fields[0]] != PAD_ID).sum(axis=1)
        for field, target in zip(seq.fields, seq.targets, strict=True):
            known = data[target] > OOV_ID
            count = ((data[field] == data[target][:, None]).sum(axis=1)) * known
            scores[f"count({field} == {target})"] = count
            scores[f"share({field} == {target})"] = count / np.maximum(length, 1)
    return scores


def history_rules(prepared: Path, splits: tuple[str, ...] = ("valid", "test"), se_rounds: int = 0
                  ) -> list[dict[str, object]]:
    """``[{split, rule, auc, gauc, pos_matched, neg_matched}]`` for each (sequence field, candidate
    feature) pair; ``*_matched``: the share of positive / negative rows with at least one match.
    ``se_rounds > 0`` adds ``auc_se``, the AUC's standard error by bootstrap over users (as the
    models' test AUC has), so a model's gap to a rule can be told from noise."""
    fmap = FeatureMap.load(Path(prepared) / "feature_map.json")
    rows: list[dict[str, object]] = []
    for split in splits:
        data = load_split(prepared, split)
        y, users = data[fmap.label], data[USER_KEY]
        pos = y == 1
        for rule, score in rule_scores(fmap, data).items():
            matched = score > 0
            se = {"auc_se": auc_se_by_users(y, score, users, se_rounds)} if se_rounds else {}
            rows.append({"split": split, "rule": rule, "auc": auc(y, score), "gauc": gauc(y, score, users),
                         "pos_matched": _share(matched[pos]), "neg_matched": _share(matched[~pos]), **se})
    return rows


def gap_to_best_rule(prepared: Path, probs: np.ndarray, split: str = "test", rounds: int = 1000
                     ) -> dict[str, object]:
    """A model's ``probs`` on ``split`` against the rule best on **valid** (chosen there, so the
    test split picks nothing): the paired AUC gap by bootstrap over users (``train.metrics``)."""
    fmap = FeatureMap.load(Path(prepared) / "feature_map.json")
    valid = load_split(prepared, "valid")
    on_valid = {rule: auc(valid[fmap.label], s) for rule, s in rule_scores(fmap, valid).items()}
    best = max(on_valid, key=on_valid.__getitem__)
    data = load_split(prepared, split)
    if len(probs) != len(data[fmap.label]):
        raise ValueError(f"{len(probs)} predictions for {len(data[fmap.label])} {split} rows")
    rule = rule_scores(fmap, data)[best]
    y, users = data[fmap.label], data[USER_KEY]
    return {"rule": best, "split": split, "model_auc": auc(y, probs), "rule_auc": auc(y, rule),
            **paired_auc_gap_by_users(y, probs, rule, users, rounds)}


def candidate_oov(prepared: Path, splits: tuple[str, ...] = ("train", "valid", "test")) -> list[dict[str, object]]:
    """``[{split, feature, positives, negatives}]``: the share of rows whose candidate id (each
    candidate feature a sequence field shares) is out of vocabulary, by label. A gap between the
    labels that train does not have is a shift no model can learn (docs/datasets.md, Taobao)."""
    fmap = FeatureMap.load(Path(prepared) / "feature_map.json")
    targets = list(dict.fromkeys(t for seq in fmap.sequences for t in seq.targets))
    rows: list[dict[str, object]] = []
    for split in splits:
        data = load_split(prepared, split)
        pos = data[fmap.label] == 1
        for t in targets:
            oov = data[t] == OOV_ID
            rows.append({"split": split, "feature": t, "positives": _share(oov[pos]), "negatives": _share(oov[~pos])})
    return rows


def _share(flags: np.ndarray) -> float:
    """The share of true entries; 0 for none (a split without positives or negatives)."""
    return float(flags.mean()) if flags.size else 0.0
