"""What follows what in users' event sequences: the successor counts that the sequential retriever and the
reranker's ``co_watch`` feature share (plain numpy/scipy)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

NO_ITEM = -1


@dataclass(frozen=True)
class SuccessorParams:
    """``window``: items after (and before) an item that count as following it; an item ``d`` steps later
    weighs ``decay ** (d - 1)``, one ``d`` steps earlier ``backward`` times that; successor counts are divided
    by the successor's popularity ** ``popularity_exponent``. A user's scores sum the successor rows of their
    ``recent`` newest items, the n-th newest (0 = newest) weighted ``recent_decay ** n``."""

    window: int = 10
    decay: float = 0.8
    backward: float = 0.5
    recent: int = 5
    recent_decay: float = 0.7
    popularity_exponent: float = 0.3


def successor_matrix(
    users: np.ndarray, items: np.ndarray, n_items: int, params: SuccessorParams
) -> sp.csr_matrix:
    """(n_items, n_items) weighted successor counts. ``users`` and ``items`` are one row per event, grouped by
    user and in time order within each user; ``items`` are row indices, ``NO_ITEM`` for items to skip."""
    rows, cols, weights = [], [], []
    for d in range(1, params.window + 1):
        same = (users[:-d] == users[d:]) & (items[:-d] != NO_ITEM) & (items[d:] != NO_ITEM)
        if not same.any():
            break
        before, after = items[:-d][same], items[d:][same]
        w = params.decay ** (d - 1)
        rows += [before, after]
        cols += [after, before]
        weights += [np.full(len(before), w), np.full(len(before), w * params.backward)]
    if not rows:
        return sp.csr_matrix((n_items, n_items), dtype=np.float32)
    counts = sp.csr_matrix(
        (np.concatenate(weights), (np.concatenate(rows), np.concatenate(cols))),
        shape=(n_items, n_items),
        dtype=np.float64,
    )
    popularity = np.asarray(counts.sum(axis=0)).ravel() + 1.0
    return (counts @ sp.diags(popularity**-params.popularity_exponent)).astype(np.float32).tocsr()


def grow_square(matrix: sp.csr_matrix, n: int) -> sp.csr_matrix:
    """``matrix`` (m, m) as (n, n), n >= m: the new items' rows and columns empty (they have no events)."""
    indptr = np.r_[matrix.indptr, np.full(n - matrix.shape[0], matrix.indptr[-1])]
    return sp.csr_matrix((matrix.data, matrix.indices, indptr), shape=(n, n))


def recent_weights(recent: np.ndarray, params: SuccessorParams) -> np.ndarray:
    """Weights of newest-first item rows (``NO_ITEM`` padded, last axis = recency): ``recent_decay ** n``."""
    weights = params.recent_decay ** np.arange(recent.shape[-1], dtype=np.float64)
    return np.where(recent != NO_ITEM, weights, 0.0)
