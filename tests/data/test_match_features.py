"""Candidate–history match features (``contract.transforms.history_match``) and their spec."""

from __future__ import annotations

import numpy as np
import pytest

from ctrserve.contract.transforms import history_match
from ctrserve.models.data.spec import SpecError, load_spec, parse_spec

pytestmark = pytest.mark.quick

# one history (most recent first, PAD = 0 at the end) shared by four candidates
EVENTS = np.array([[5, 7, 5, 9, 0, 0]])
TARGETS = np.array([5, 9, 8, 1])  # twice in 4 events / once, 4th / never / OOV


def test_share_counts_the_history_events_with_the_candidates_value() -> None:
    assert history_match(EVENTS, TARGETS, "share").tolist() == [0.5, 0.25, 0.0, 0.0]


def test_recency_is_one_for_the_latest_event_and_zero_without_a_match() -> None:
    got = history_match(EVENTS, TARGETS, "recency")
    np.testing.assert_allclose(got, [1.0, 1 - 3 / 6, 0.0, 0.0], rtol=1e-6)


def test_oov_and_pad_never_match_and_empty_histories_give_zero() -> None:
    events = np.array([[1, 1, 0], [0, 0, 0]])
    assert history_match(events, np.array([1, 0]), "share").tolist() == [0.0, 0.0]
    assert history_match(events, np.array([1, 0]), "recency").tolist() == [0.0, 0.0]


def test_per_row_histories_and_bad_arguments() -> None:
    events = np.array([[3, 0], [4, 3]])
    assert history_match(events, np.array([3, 3]), "share").tolist() == [1.0, 0.5]
    with pytest.raises(ValueError, match="unknown op"):
        history_match(events, np.array([3, 3]), "mean")
    with pytest.raises(ValueError, match=r"\[N, L\]"):
        history_match(np.array([3, 4]), np.array([3]), "share")


def test_a_match_feature_must_name_a_sequence_field() -> None:
    raw = load_spec("synthetic").model_dump()
    raw["features"].append({"name": "m", "type": "match", "field": "cate_id", "op": "share"})
    with pytest.raises(SpecError, match="not a sequence field"):
        parse_spec(raw)
