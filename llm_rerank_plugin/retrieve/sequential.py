"""A sequential candidate source and the hybrid retriever that merges it with Merlin's ALS.

``SequentialModel`` counts, over every user's event sequence (time order), how often item ``j`` follows item
``i`` within ``window`` steps (weight ``decay ** (d - 1)`` at distance ``d``, and ``backward`` times that for
the reverse order), and divides by the successor's popularity ** ``popularity_exponent``. A user's scores are
the successor rows of their ``recent`` newest items, the n-th newest weighted ``recent_decay ** n``. Fitting
is one sparse count (under a second for ML-100k's 100,000 events).

``HybridRetriever`` answers with ``(1 - w) * z(base) + w * z(sequential)``, where ``z`` standardises each
user's scores over the catalogue (items they have seen excluded), so neither model's scale dominates. The
weight is chosen on the validation slice by ``fit`` (``retrieval.sequential.weight: null``) or set.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from llm_rerank_plugin.preprocess.workflow import FIRST_KNOWN_INDEX
from llm_rerank_plugin.rerank.sequences import (
    NO_ITEM,
    SuccessorParams,
    grow_square,
    recent_weights,
    successor_matrix,
)
from llm_rerank_plugin.retrieve.base import IdMap
from llm_rerank_plugin.retrieve.retrievers import Retriever

# Weights tried on the validation slice when retrieval.sequential.weight is null.
WEIGHT_GRID = (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
SequentialParams = SuccessorParams


class SequentialModel:
    """Item-to-successor scores and each user's newest items, on encoded indices."""

    def __init__(self, params: SuccessorParams, successors: sp.csr_matrix, recent: np.ndarray) -> None:
        self.params = params
        self.successors = successors
        self.recent = recent  # (n_users, recent) encoded items, newest first, NO_ITEM padded

    @classmethod
    def fit(cls, history: Any, user_map: IdMap, item_map: IdMap, params: SuccessorParams) -> SequentialModel:
        """``history``: a host frame with ``user_id``, ``item_id`` and ``position`` (the user's event order),
        in original ids."""
        frame = history[["user_id", "item_id", "position"]].sort_values(["user_id", "position"])
        users = user_map.encode(frame["user_id"].to_numpy())
        items = item_map.encode(frame["item_id"].to_numpy())
        successors = successor_matrix(users, items, len(item_map), params)
        recent = np.full((len(user_map), params.recent), NO_ITEM, dtype=np.int64)
        ends = np.flatnonzero(np.r_[users[1:] != users[:-1], True])
        starts = np.r_[0, ends[:-1] + 1]
        for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
            newest = items[start : end + 1][::-1][: params.recent]
            recent[users[start], : len(newest)] = newest
        return cls(params, successors, recent)

    def scores(self, users: np.ndarray) -> np.ndarray:
        """(len(users), n_items) successor scores of each user's newest items."""
        return self.scores_of_recent(self.recent[users])

    def scores_of_histories(self, histories: list[np.ndarray]) -> np.ndarray:
        """(len(histories), n_items) successor scores of encoded histories (newest first)."""
        recent = np.full((len(histories), self.params.recent), NO_ITEM, dtype=np.int64)
        for i, history in enumerate(histories):
            newest = history[history >= FIRST_KNOWN_INDEX][: self.params.recent]
            recent[i, : len(newest)] = newest
        return self.scores_of_recent(recent)

    def scores_of_recent(self, recent: np.ndarray) -> np.ndarray:
        """(len(recent), n_items) successor scores of (U, recent) encoded newest items, NO_ITEM padded."""
        weights = recent_weights(recent, self.params)
        user_rows = np.repeat(np.arange(len(recent)), recent.shape[1])
        mix = sp.csr_matrix(
            (weights.ravel(), (user_rows, np.maximum(recent, 0).ravel())),
            shape=(len(recent), self.successors.shape[0]),
        )
        return np.asarray((mix @ self.successors).todense(), dtype=np.float32)

    def save(self, path: Path) -> None:
        sp.save_npz(path / "successors.npz", self.successors)
        np.save(path / "recent.npy", self.recent)
        (path / "sequential.json").write_text(json.dumps(asdict(self.params)))

    @classmethod
    def load(cls, path: Path) -> SequentialModel:
        params = SuccessorParams(**json.loads((path / "sequential.json").read_text()))
        return cls(params, sp.load_npz(path / "successors.npz").tocsr(), np.load(path / "recent.npy"))


def standardize(scores: np.ndarray, excluded: np.ndarray) -> np.ndarray:
    """Each row minus its mean over the items not ``excluded``, divided by their standard deviation (rows
    without spread become zeros)."""
    kept = ~excluded
    count = np.maximum(kept.sum(axis=1, keepdims=True), 1)
    mean = np.where(kept, scores, 0.0).sum(axis=1, keepdims=True) / count
    spread = np.sqrt(np.where(kept, (scores - mean) ** 2, 0.0).sum(axis=1, keepdims=True) / count)
    return np.where(spread > 0, (scores - mean) / np.where(spread > 0, spread, 1.0), 0.0).astype(np.float32)


class HybridRetriever(Retriever):
    """The base retriever (Merlin ALS / BPR) merged with a ``SequentialModel``; see the module docstring."""

    algorithm = "hybrid"

    def __init__(self, base: Retriever, sequential: SequentialModel, weight: float) -> None:
        super().__init__()
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"the sequential weight must be in [0, 1], got {weight}")
        self.base = base
        self.sequential = sequential
        self.weight = float(weight)
        self.seen, self.user_map, self.item_map = base.seen, base.user_map, base.item_map

    def _parts(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Standardised (base, sequential) scores of ``users`` over the whole catalogue and the items they
        exclude (seen or reserved): dense (users, items) arrays, so callers pass users in chunks
        (``recommend`` uses 1,024)."""
        items = np.arange(len(self.item_map))
        excluded = self.seen[users].toarray() > 0
        excluded[:, :FIRST_KNOWN_INDEX] = True
        base = standardize(self.base._scores(users, items), excluded)
        sequential = standardize(self.sequential.scores(users), excluded)
        return base, sequential, excluded

    def _mix(self, base: np.ndarray, sequential: np.ndarray, weight: float | None = None) -> np.ndarray:
        """``(1 - w) * base + w * sequential`` with the fitted weight, or ``weight`` when given."""
        w = self.weight if weight is None else weight
        return (1.0 - w) * base + w * sequential

    def _scores(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        return self._mix(*self._parts(users)[:2])[:, items]

    def _history_scores(self, histories: list[np.ndarray], excluded: np.ndarray) -> np.ndarray:
        # A user the models were not fitted on: ALS's factor folded in from their items, and the
        # successors of their newest items, standardised and mixed as for every other user.
        base = standardize(self.base._history_scores(histories, excluded), excluded)
        return self._mix(base, standardize(self.sequential.scores_of_histories(histories), excluded))

    @property
    def added_items(self) -> int:
        return self.base.added_items

    def add_items(self, item_ids: Any, factors: np.ndarray) -> None:
        """The base retriever's ``add_items``; the new items have no successor counts (no events)."""
        self.base.add_items(item_ids, factors)
        self.seen, self.item_map = self.base.seen, self.base.item_map
        self.sequential.successors = grow_square(self.sequential.successors, len(self.item_map))

    def recall_by_weight(
        self, user_ids: Any, targets: Any, k: int, weights: tuple[float, ...] = WEIGHT_GRID
    ) -> dict[float, float]:
        """Share of ``targets`` (one per user, original ids) in each weight's top ``k`` unseen items."""
        users = self.user_map.encode(np.asarray(user_ids))
        target_index = self.item_map.encode(np.asarray(targets))
        hits = {w: 0 for w in weights}
        for start in range(0, len(users), 1024):
            chunk = users[start : start + 1024]
            base, sequential, excluded = self._parts(chunk)
            target = target_index[start : start + 1024]
            for w in weights:
                fused = np.where(excluded, -np.inf, self._mix(base, sequential, w))
                target_score = fused[np.arange(len(chunk)), target]
                # A target ranks in the top k when fewer than k items score above it.
                above = (fused > target_score[:, None]).sum(axis=1)
                hits[w] += int(((above < k) & np.isfinite(target_score)).sum())
        return {w: hits[w] / max(len(users), 1) for w in weights}

    def _config(self) -> dict:
        return {"weight": self.weight}

    def _save_model(self, path: Path) -> None:
        self.base.save(path / "base")
        self.sequential.save(path)

    def _load_model(self, path: Path) -> None:  # pragma: no cover - load_hybrid builds it whole
        raise NotImplementedError("HybridRetriever is reloaded by load_retriever")


def load_hybrid(path: Path, config: dict) -> HybridRetriever:
    from llm_rerank_plugin.retrieve.retrievers import load_retriever

    return HybridRetriever(load_retriever(path / "base"), SequentialModel.load(path), config["weight"])
