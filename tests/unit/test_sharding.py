"""Sharding strategies, each on its property, against a plain shuffle of the same rows."""

from __future__ import annotations

import numpy as np
import pytest

from swarm.sharding import order_rows, row_lengths

pytestmark = pytest.mark.timeout(30)

ROWS, SHARD = 1200, 40


def shards(order: np.ndarray) -> list[np.ndarray]:
    return [order[i:i + SHARD] for i in range(0, len(order), SHARD)]


def worst_class_deviation(order, labels) -> float:
    """The largest |count in a shard - the class's share of the shard| over shards and classes."""
    share = {c: np.mean(labels == c) for c in np.unique(labels)}
    return max(abs(np.sum(labels[s] == c) - share[c] * len(s)) for s in shards(order) for c in share)


def test_stratified_shards_carry_the_whole_label_mix():
    rng = np.random.default_rng(0)
    labels = rng.choice(5, size=ROWS, p=[0.5, 0.2, 0.15, 0.1, 0.05])
    idx = np.arange(ROWS)
    stratified = order_rows("stratified", idx, targets=labels, classification=True, lengths=None,
                            rng=np.random.default_rng(1))
    shuffled = order_rows("random", idx, targets=labels, classification=True, lengths=None,
                          rng=np.random.default_rng(1))
    assert sorted(stratified) == list(idx)  # every row once
    assert worst_class_deviation(stratified, labels) <= 1.0  # within a row per class, in every shard
    assert worst_class_deviation(shuffled, labels) >= 4.0  # a shuffle's shards wander much further
    # deterministic in the seed (the dataset id depends on it)
    again = order_rows("stratified", idx, targets=labels, classification=True, lengths=None,
                       rng=np.random.default_rng(1))
    assert np.array_equal(stratified, again)


def test_stratified_regression_spreads_the_target_deciles():
    targets = np.random.default_rng(2).exponential(size=ROWS)
    order = order_rows("stratified", np.arange(ROWS), targets=targets, classification=False, lengths=None,
                       rng=np.random.default_rng(3))
    means = [targets[s].mean() for s in shards(order)]
    shuffled = order_rows("random", np.arange(ROWS), targets=targets, classification=False, lengths=None,
                          rng=np.random.default_rng(3))
    assert np.std(means) < 0.5 * np.std([targets[s].mean() for s in shards(shuffled)])


def test_by_length_groups_sequences_of_similar_length():
    rng = np.random.default_rng(4)
    seq_len, token = 12, 3
    true_lengths = rng.integers(1, seq_len + 1, size=ROWS)
    features = rng.normal(size=(ROWS, seq_len, token)).astype(np.float32)
    for row, n in enumerate(true_lengths):
        features[row, n:] = 0  # padding after the sequence
    flat = features.reshape(ROWS, -1)  # a csv row: the model's input_shape says how to read it
    lengths = row_lengths(flat, [seq_len, token])
    assert np.array_equal(lengths, true_lengths)
    assert np.array_equal(row_lengths(np.array([[0, 0, 0], [1, 0, 0], [0, 0, 2]], np.float32), None), [0, 1, 3])
    order = order_rows("by_length", np.arange(ROWS), targets=np.zeros(ROWS), classification=True, lengths=lengths,
                       rng=np.random.default_rng(5))
    spans = [np.ptp(lengths[s]) for s in shards(order)]
    assert max(spans) <= 1  # 30 shards, 12 lengths: each shard of one or two neighbouring lengths
    shuffled = order_rows("random", np.arange(ROWS), targets=np.zeros(ROWS), classification=True, lengths=lengths,
                          rng=np.random.default_rng(5))
    assert min(np.ptp(lengths[s]) for s in shards(shuffled)) >= 8


def test_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="unknown sharding strategy 'alphabetical'"):
        order_rows("alphabetical", np.arange(3), targets=np.zeros(3), classification=True, lengths=None,
                   rng=np.random.default_rng(0))
