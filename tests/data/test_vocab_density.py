"""Vocabulary/OOV handling and information-density statistics on hand-made tables."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ctrserve.contract.feature_map import OOV_ID, PAD_ID
from ctrserve.contract.vocab import Vocabulary
from ctrserve.models.data.density import dense_stats, entropy_bits, sequence_stats, sparse_stats

pytestmark = pytest.mark.quick


def test_vocab_reserves_pad_and_oov_and_orders_by_frequency() -> None:
    voc = Vocabulary.fit([np.array(["b", "a", "b", "c", "b", "a"])])
    assert len(voc) == 5  # PAD, OOV, b, a, c
    assert voc.encode(np.array(["b", "a", "c"])).tolist() == [2, 3, 4]
    assert voc.encode(np.array(["zzz"])).tolist() == [OOV_ID]
    assert voc.encode(np.array([""])).tolist() == [PAD_ID]


def test_vocab_min_count_sends_rare_values_to_oov() -> None:
    voc = Vocabulary.fit([np.array([1, 1, 2, 3, 3, 3])], min_count=2)
    assert voc.encode(np.array([3, 1, 2])).tolist() == [2, 3, OOV_ID]


def test_vocab_treats_negative_ints_as_missing_and_shares_columns() -> None:
    voc = Vocabulary.fit([np.array([7, 8]), np.array([[8, -1], [9, -1]])])
    ids = voc.encode(np.array([[8, 9, -1]]))
    assert ids.tolist() == [[2, voc.lookup(9), PAD_ID]]
    assert voc.lookup(-1) == PAD_ID and voc.lookup(12345) == OOV_ID and voc.lookup(None) == PAD_ID


def test_entropy_of_known_distributions() -> None:
    assert entropy_bits(np.array([5, 5, 5, 5])) == 0.0
    assert entropy_bits(np.array([1, 2, 3, 4])) == pytest.approx(2.0)
    # p = (1/2, 1/4, 1/4): H = 1.5 bits
    assert entropy_bits(np.array([1, 1, 2, 3])) == pytest.approx(1.5)


def test_sparse_stats_on_hand_table() -> None:
    # 8 rows: ids 2,2,2,2,3,3 (known), OOV once, PAD (missing) once
    ids = np.array([2, 2, 2, 2, 3, 3, OOV_ID, PAD_ID])
    s = sparse_stats(ids, cardinality=4)
    p = np.array([4, 2, 1]) / 7
    h = float(-(p * np.log2(p)).sum())
    assert s.cardinality == 4
    assert s.entropy_bits == pytest.approx(h)
    assert s.coverage == pytest.approx(7 / 8)
    assert s.oov_rate == pytest.approx(1 / 7)
    assert s.density == pytest.approx(math.log2(1 + 7 / 2**h))


def test_dense_feature_is_densest() -> None:
    dense = dense_stats(np.array([1.0, 2.0, np.nan, 4.0]))
    assert dense.coverage == pytest.approx(0.75) and dense.entropy_bits == 0.0
    assert dense.density == pytest.approx(math.log2(1 + 3))
    sparse = sparse_stats(np.array([2, 3, 4]), cardinality=3)
    assert dense.density > sparse.density


def test_sequence_stats_count_events_and_nonempty_rows() -> None:
    seqs = np.array([[2, 3, 0], [0, 0, 0], [2, OOV_ID, 0]])
    s = sequence_stats(seqs, cardinality=3)
    assert s.coverage == pytest.approx(2 / 3)
    assert s.oov_rate == pytest.approx(1 / 4)
    assert s.entropy_bits == pytest.approx(entropy_bits(np.array([2, 3, 2, OOV_ID])))
