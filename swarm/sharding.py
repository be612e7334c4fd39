"""How the training rows are ordered before they are cut into shards (``data.sharding``).

Pure numpy, deterministic in the generator: the same data and seed give the same shards, so the
dataset id stays checkable by anyone.

- ``random``: a plain shuffle. Shards are samples of the whole, with the usual spread.
- ``stratified``: every class (classification) or target decile (regression) is spread evenly
  along the order, so every shard's label mix is the whole's to within a row per class. With
  non-identical peers a round's shards then carry every class to every peer, not whatever a
  shuffle happened to give it.
- ``by_length``: rows sorted by their sequence length, so a shard holds sequences of similar
  length (for the transformer: less padding per batch, and batch cost that a peer can predict).
  A row's length is its number of tokens up to the last one that is not all zeros (padding);
  tokens are the rows of ``model.input_shape`` (seq_len, token_features), or single features.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

STRATEGIES = ("random", "stratified", "by_length")
REGRESSION_STRATA = 10


def order_rows(strategy: str, idx: np.ndarray, *, targets: np.ndarray, classification: bool,
               lengths: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    """``idx`` (row indices) in the order the strategy cuts shards from."""
    idx = rng.permutation(idx)  # every strategy breaks its ties at random
    if strategy == "random":
        return idx
    if strategy == "stratified":
        return idx[np.argsort(_spread_keys(_strata(targets[idx], classification)), kind="stable")]
    if strategy == "by_length":
        if lengths is None:
            raise ValueError("by_length needs the rows' lengths")
        return idx[np.argsort(lengths[idx], kind="stable")]
    raise ValueError(f"unknown sharding strategy {strategy!r} (expected one of {', '.join(STRATEGIES)})")


def _strata(targets: np.ndarray, classification: bool) -> np.ndarray:
    if classification:
        return targets
    edges = np.quantile(targets, np.linspace(0, 1, REGRESSION_STRATA + 1)[1:-1])
    return np.searchsorted(edges, targets, side="right")


def _spread_keys(strata: np.ndarray) -> np.ndarray:
    """Row i, the j-th of the n rows of its stratum, gets key (j + 0.5) / n: sorting by it deals
    each stratum's rows at even intervals along the whole order."""
    keys = np.empty(len(strata), dtype=np.float64)
    for value in np.unique(strata):
        members = np.flatnonzero(strata == value)
        keys[members] = (np.arange(len(members)) + 0.5) / len(members)
    return keys


def row_lengths(features: np.ndarray, token_shape: Sequence[int] | None) -> np.ndarray:
    """Tokens per row up to the last token that is not all zeros (trailing padding not counted)."""
    n = len(features)
    if token_shape is not None and len(token_shape) == 2:
        tokens = features.reshape(n, token_shape[0], -1)
    else:
        tokens = features.reshape(n, -1, 1)
    nonzero = np.any(tokens != 0, axis=2)  # (rows, tokens)
    last = tokens.shape[1] - np.argmax(nonzero[:, ::-1], axis=1)
    return np.where(nonzero.any(axis=1), last, 0)
