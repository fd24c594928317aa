"""Candidate retrieval: Merlin's implicit ALS / BPR models, and a popularity floor.

Retrievers are fitted on an NVTabular-transformed ``merlin.io.Dataset`` (encoded ids, tagged USER_ID and
ITEM_ID) and answer in original ids. Items the user interacted with in the fit data are never returned.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
from merlin.io import Dataset
from merlin.models.utils.dataset import dataset_to_coo

from llm_rerank_plugin.preprocess.workflow import FIRST_KNOWN_INDEX
from llm_rerank_plugin.retrieve.base import PAD_ITEM, Candidates, IdMap, id_array

ALGORITHMS = ("als", "bpr", "popularity")


class Retriever:
    """Shared machinery: seen-item exclusion, top-K selection and id mapping over a dense score function."""

    algorithm = "base"

    def __init__(self) -> None:
        self.seen: sp.csr_matrix | None = None
        self.user_map: IdMap | None = None
        self.item_map: IdMap | None = None

    # -- subclasses implement these two on encoded indices --
    def _fit_matrix(self, dataset: Dataset, matrix: sp.csr_matrix) -> None:
        raise NotImplementedError

    def _scores(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Dense (len(users), len(items)) scores for encoded user and item indices."""
        raise NotImplementedError

    def _history_scores(self, histories: list[np.ndarray], excluded: np.ndarray) -> np.ndarray:
        """Dense (len(histories), len(item_map)) scores of users known only by their items (encoded,
        newest first); ``excluded`` marks the items out of their lists (the history and reserved codes)."""
        raise NotImplementedError

    def fit(self, dataset: Dataset, user_vocabulary: np.ndarray, item_vocabulary: np.ndarray) -> Retriever:
        """Fit on a transformed dataset; the vocabularies (encoded index -> original id) come from the
        NVTabular workflow that encoded it."""
        self.user_map = IdMap(user_vocabulary)
        self.item_map = IdMap(item_vocabulary)
        coo = dataset_to_coo(dataset)
        shape = (len(self.user_map), len(self.item_map))
        matrix = sp.csr_matrix((np.ones_like(coo.data), (coo.row, coo.col)), shape=shape)
        matrix.data[:] = 1.0  # repeated (user, item) events count once
        self.seen = matrix
        self._fit_matrix(dataset, matrix)
        return self

    def _check_fitted(self) -> None:
        if self.seen is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit() or load() first")

    @property
    def added_items(self) -> int:
        """How many items at the end of the vocabulary were added without events (``add_items``)."""
        return 0

    def recommend(
        self,
        user_ids: Any,
        k: int = 100,
        batch_size: int = 1024,
        reserved_for_added: int = 0,
        with_added: bool = True,
    ) -> Candidates:
        """Top-``k`` unseen items for each user (original ids in, original ids out), by score.

        ``reserved_for_added``: up to that many of the ``k`` places go to the best-scored items added
        without events (``add_items``: new items, whose text-predicted scores rarely beat items with a
        history), the rest to the others; each list stays sorted by score. ``with_added=False`` leaves
        those items out (the retrieval model alone, as fitted).

        Users unknown at fit time get the items with the highest score for an all-zero user (for ALS that
        means no signal, so the popularity retriever is the better fallback; the caller decides).
        """
        self._check_fitted()
        user_ids = np.asarray(user_ids)
        users = self.user_map.encode(user_ids)
        items = np.arange(FIRST_KNOWN_INDEX, len(self.item_map))

        def chunk_scores(rows: slice) -> tuple[np.ndarray, np.ndarray]:
            chunk = users[rows]
            return self._scores(chunk, items), self.seen[chunk][:, items].toarray() > 0

        return self._top_k(user_ids, chunk_scores, k, batch_size, reserved_for_added, with_added)

    def recommend_for_histories(
        self,
        user_ids: Any,
        histories: list[list[Any]],
        k: int = 100,
        batch_size: int = 1024,
        reserved_for_added: int = 0,
        with_added: bool = True,
    ) -> Candidates:
        """Top-``k`` for users the model was not fitted on, from the items they interacted with since
        (``histories``: original ids, newest first; items the model does not know are ignored), those items
        excluded. A matrix-factorisation model solves each user's factor from their items with the item
        factors fixed (ALS's own least-squares step); see ``recommend`` for ``reserved_for_added`` and
        ``with_added``."""
        self._check_fitted()
        if len(histories) != len(user_ids):
            raise ValueError(f"expected one history per user, got {len(histories)} for {len(user_ids)} users")
        encoded = [self.item_map.encode(_objects(h)) for h in histories]
        items = np.arange(FIRST_KNOWN_INDEX, len(self.item_map))

        def chunk_scores(rows: slice) -> tuple[np.ndarray, np.ndarray]:
            part = encoded[rows]
            excluded = np.zeros((len(part), len(self.item_map)), bool)
            for i, history in enumerate(part):
                excluded[i, history] = True
            excluded[:, :FIRST_KNOWN_INDEX] = True
            return self._history_scores(part, excluded)[:, items], excluded[:, items]

        return self._top_k(np.asarray(user_ids), chunk_scores, k, batch_size, reserved_for_added, with_added)

    def _top_k(
        self,
        user_ids: np.ndarray,
        chunk_scores: Callable[[slice], tuple[np.ndarray, np.ndarray]],
        k: int,
        batch_size: int,
        reserved_for_added: int,
        with_added: bool,
    ) -> Candidates:
        """Each user's top ``k`` of the known items from ``chunk_scores(rows) -> (scores, excluded)`` over
        ``FIRST_KNOWN_INDEX..``, ``batch_size`` users at a time."""
        if k <= 0:
            raise ValueError(f"k must be a positive number of candidates, got {k}")
        if reserved_for_added < 0:
            raise ValueError(f"reserved_for_added must be >= 0, got {reserved_for_added}")
        if reserved_for_added and not with_added:
            raise ValueError("reserved_for_added needs with_added: places cannot be kept for items left out")
        items = np.arange(FIRST_KNOWN_INDEX, len(self.item_map))
        k_eff = min(k, len(items))
        added = items >= len(self.item_map) - self.added_items
        reserved = min(reserved_for_added, int(added.sum()), k_eff)
        if reserved:  # a small catalogue: the others may not fill their share
            reserved = max(reserved, k_eff - int((~added).sum()))
        top_items = np.full((len(user_ids), k), PAD_ITEM, dtype=self.item_map.id_dtype)
        top_scores = np.full((len(user_ids), k), -np.inf, dtype=np.float32)
        for start in range(0, len(user_ids), batch_size):
            rows = slice(start, start + batch_size)
            scores, excluded = chunk_scores(rows)
            scores = scores.astype(np.float32)
            scores[excluded] = -np.inf
            if not with_added:
                scores[:, added] = -np.inf
            part = _top_columns(scores, k_eff, added, reserved)
            part_scores = np.take_along_axis(scores, part, axis=1)
            order = np.argsort(-part_scores, axis=1, kind="stable")
            best = np.take_along_axis(part, order, axis=1)
            best_scores = np.take_along_axis(part_scores, order, axis=1)
            decoded = self.item_map.decode(items[best])
            decoded[~np.isfinite(best_scores)] = PAD_ITEM
            top_items[rows, :k_eff] = decoded
            top_scores[rows, :k_eff] = best_scores
        return Candidates(user_ids=user_ids, item_ids=top_items, scores=top_scores)

    def score(self, user_ids: Any, item_ids: Any) -> np.ndarray:
        """Retrieval score of each (user, item) pair, original ids, shape (n,)."""
        self._check_fitted()
        users = self.user_map.encode(user_ids)
        items = self.item_map.encode(item_ids)
        out = np.empty(len(users), dtype=np.float32)
        for user in np.unique(users):
            rows = np.flatnonzero(users == user)
            out[rows] = self._scores(np.array([user]), items[rows])[0]
        return out

    def known_user(self, user_id: Any) -> bool:
        self._check_fitted()
        return user_id in self.user_map

    def history_since_fit(self, user_id: Any, history: Sequence[Any]) -> list[Any] | None:
        """For a user the model was fitted on whose ``history`` (original ids, newest first, e.g. the
        reranker's, which feedback moves) holds known items that were not among their fitted events: that
        history followed by the rest of their fitted items, what ``recommend_for_histories`` scores them
        from. None when nothing is new (their fitted scores stand) or the user is unknown."""
        self._check_fitted()
        if not len(history) or user_id not in self.user_map:
            return None
        codes = self.item_map.encode(_objects(history))
        row = self.user_map.encode([user_id])[0]
        fitted = self.seen.indices[self.seen.indptr[row] : self.seen.indptr[row + 1]]
        known = codes >= FIRST_KNOWN_INDEX
        if not (known & ~np.isin(codes, fitted)).any():
            return None
        older = np.setdiff1d(fitted, codes[known])  # fitted events not in the history: the older ones
        return [*history, *self.item_map.vocabulary[older].tolist()]

    def knows_any_item(self, item_ids: Any) -> bool:
        """Whether any of ``item_ids`` is in the vocabulary: what ``recommend_for_histories`` can use."""
        return any(item in self.item_map for item in item_ids)

    def _append_items(self, item_ids: Any) -> np.ndarray:
        """Extend the vocabulary with items no user has an event of (seen-matrix columns of zeros);
        returns the ids as an array. Known or repeated ids are refused."""
        self._check_fitted()
        ids = id_array(item_ids)
        known = [i for i in ids.tolist() if i in self.item_map]
        if known:
            raise ValueError(f"items already known to the {self.algorithm} retriever, e.g. {known[:10]}")
        if len(set(ids.tolist())) != len(ids):
            raise ValueError("the items to add repeat an id; expected each new item once")
        vocabulary = np.empty(len(self.item_map) + len(ids), dtype=object)
        vocabulary[:] = [*self.item_map.vocabulary.tolist(), *ids.tolist()]
        self.item_map = IdMap(vocabulary, self.item_map.oov_index)
        s = self.seen
        self.seen = sp.csr_matrix((s.data, s.indices, s.indptr), shape=(s.shape[0], len(vocabulary)))
        return ids

    def add_items(self, item_ids: Any, factors: np.ndarray) -> None:
        """Make items without events rankable with the given item factors (e.g. predicted from their text
        by a ``TextAdapter``). Only matrix-factorisation retrievers have factors to extend."""
        raise TypeError(f"the {self.algorithm} retriever has no item factors to add items with")

    # -- persistence --
    def save(self, path: str | Path) -> None:
        self._check_fitted()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        sp.save_npz(path / "seen.npz", self.seen)
        np.save(path / "user_vocabulary.npy", self.user_map.vocabulary, allow_pickle=True)
        np.save(path / "item_vocabulary.npy", self.item_map.vocabulary, allow_pickle=True)
        (path / "retriever.json").write_text(json.dumps({"algorithm": self.algorithm, **self._config()}))
        self._save_model(path)

    def _config(self) -> dict:
        return {}

    def _save_model(self, path: Path) -> None:
        raise NotImplementedError

    def _load_model(self, path: Path) -> None:
        raise NotImplementedError


def _top_columns(scores: np.ndarray, k: int, added: np.ndarray, reserved: int) -> np.ndarray:
    """Column indices of each row's top ``k`` (unordered): with ``reserved`` > 0, the top ``reserved`` of
    the ``added`` columns and the top ``k - reserved`` of the others."""
    if reserved == 0:
        return np.argpartition(-scores, k - 1, axis=1)[:, :k]
    columns = []
    for mask, n in ((added, reserved), (~added, k - reserved)):
        if n == 0:
            continue
        index = np.flatnonzero(mask)
        part = np.argpartition(-scores[:, index], min(n, len(index)) - 1, axis=1)[:, :n]
        columns.append(index[part])
    return np.concatenate(columns, axis=1)


def _objects(values: Any) -> np.ndarray:
    """Ids as an object array: numpy would turn ``[105, "x"]`` into strings and miss the integer ids."""
    out = np.empty(len(values), dtype=object)
    out[:] = list(values)
    return out


def load_retriever(path: str | Path) -> Retriever:
    """Reload any retriever saved with ``save``."""
    path = Path(path)
    config = json.loads((path / "retriever.json").read_text())
    algorithm = config.pop("algorithm")
    if algorithm == "hybrid":
        from llm_rerank_plugin.retrieve.sequential import load_hybrid

        return load_hybrid(path, config)
    retriever = make_retriever(algorithm, **config)
    retriever.seen = sp.load_npz(path / "seen.npz").tocsr()
    retriever.user_map = IdMap(np.load(path / "user_vocabulary.npy", allow_pickle=True))
    retriever.item_map = IdMap(np.load(path / "item_vocabulary.npy", allow_pickle=True))
    retriever._load_model(path)
    return retriever


class PopularityRetriever(Retriever):
    """Most-interacted items first: the floor every personalised model must beat."""

    algorithm = "popularity"

    def _fit_matrix(self, dataset: Dataset, matrix: sp.csr_matrix) -> None:
        self.counts = np.asarray(matrix.sum(axis=0)).ravel().astype(np.float32)

    def _scores(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        return np.broadcast_to(np.log1p(self.counts[items]), (len(users), len(items))).copy()

    def _history_scores(self, histories: list[np.ndarray], excluded: np.ndarray) -> np.ndarray:
        return self._scores(np.zeros(len(histories), np.int64), np.arange(len(self.item_map)))

    def _save_model(self, path: Path) -> None:
        np.save(path / "counts.npy", self.counts)

    def _load_model(self, path: Path) -> None:
        self.counts = np.load(path / "counts.npy")


class ImplicitRetriever(Retriever):
    """``merlin.models.implicit`` ALS or BPR (matrix factorisation on implicit feedback)."""

    def __init__(
        self,
        algorithm: str = "als",
        factors: int = 64,
        iterations: int = 15,
        regularization: float = 0.05,
        alpha: float = 1.0,
        learning_rate: float = 0.01,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if algorithm not in ("als", "bpr"):
            raise ValueError(f"implicit retriever algorithm must be 'als' or 'bpr', got {algorithm!r}")
        self.algorithm = algorithm
        self.params = dict(
            factors=factors,
            iterations=iterations,
            regularization=regularization,
            alpha=alpha,
            learning_rate=learning_rate,
            seed=seed,
        )
        self.model: Any = None
        # Factors of items added after the fit (no events; see add_items), saved beside Merlin's model.
        self.added_item_factors: np.ndarray | None = None
        self._gram: np.ndarray | None = None  # of the trained item factors, for fold_in

    def _config(self) -> dict:
        return dict(self.params)

    def _build(self) -> Any:
        from merlin.models.implicit import AlternatingLeastSquares, BayesianPersonalizedRanking

        p = self.params
        if self.algorithm == "als":
            return AlternatingLeastSquares(
                factors=p["factors"],
                iterations=p["iterations"],
                regularization=p["regularization"],
                alpha=p["alpha"],
                random_state=p["seed"],
                num_threads=1,
            )
        return BayesianPersonalizedRanking(
            factors=p["factors"],
            iterations=p["iterations"],
            regularization=p["regularization"],
            learning_rate=p["learning_rate"],
            random_state=p["seed"],
            num_threads=1,
        )

    def _fit_matrix(self, dataset: Dataset, matrix: sp.csr_matrix) -> None:
        with warnings.catch_warnings():  # implicit's OpenBLAS threadpool advisory
            warnings.simplefilter("ignore")
            self.model = self._build()
        # What Merlin's ImplicitModelAdaptor.fit does, with the matrix shaped by the whole vocabulary (its
        # own sizes it by the largest id present, leaving later ids without factor rows) and no progress
        # bar per iteration.
        self.model.schema = dataset.schema
        self.model.implicit_model.fit(matrix, show_progress=False)
        self.model.train_data = matrix
        self._cache_factors()

    def _cache_factors(self) -> None:
        implicit_model = self.model.implicit_model
        if hasattr(implicit_model, "to_cpu"):
            implicit_model = implicit_model.to_cpu()
        self.user_factors = np.asarray(implicit_model.user_factors, dtype=np.float32)
        self.item_factors = np.asarray(implicit_model.item_factors, dtype=np.float32)

    def _scores(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        return self.user_factors[users] @ self.item_factors[items].T

    def _history_scores(self, histories: list[np.ndarray], excluded: np.ndarray) -> np.ndarray:
        return self.fold_in(histories) @ self.item_factors.T

    def fold_in(self, histories: list[np.ndarray]) -> np.ndarray:
        """(len(histories), factors) user factors solved from encoded item histories with the item factors
        held fixed: ALS's user step (confidence ``alpha`` per item, penalty ``regularization``; the Gram
        matrix of the factors it trained, not of items added later). No known item gives a zero factor."""
        factors = self.item_factors.astype(np.float64)
        if self._gram is None:
            trained = factors[FIRST_KNOWN_INDEX : len(factors) - self.added_items]
            self._gram = trained.T @ trained + self.params["regularization"] * np.eye(trained.shape[1])
        alpha = self.params["alpha"]
        out = np.zeros((len(histories), factors.shape[1]), np.float32)
        for i, history in enumerate(histories):
            known = np.unique(history[history >= FIRST_KNOWN_INDEX])
            if len(known):
                rows = factors[known]
                out[i] = np.linalg.solve(self._gram + (alpha - 1.0) * rows.T @ rows, alpha * rows.sum(axis=0))
        return out

    @property
    def added_items(self) -> int:
        return 0 if self.added_item_factors is None else len(self.added_item_factors)

    def add_items(self, item_ids: Any, factors: np.ndarray) -> None:
        """Append items the model never saw, each with the given factor row (``(len(item_ids), factors)``):
        every user can then be recommended them; none has seen them."""
        factors = np.asarray(factors, dtype=np.float32)
        width = self.item_factors.shape[1]
        if factors.ndim != 2 or factors.shape[1] != width or len(factors) != len(list(item_ids)):
            raise ValueError(
                f"expected one factor row of width {width} per added item ({len(list(item_ids))}), got "
                f"shape {factors.shape}"
            )
        self._append_items(item_ids)
        self.item_factors = np.vstack([self.item_factors, factors])
        before = self.added_item_factors if self.added_item_factors is not None else factors[:0]
        self.added_item_factors = np.vstack([before, factors])

    def _save_model(self, path: Path) -> None:
        # Merlin refuses an existing folder; a re-run into the same output folder replaces the model.
        shutil.rmtree(path / "merlin_model", ignore_errors=True)
        self.model.save(path / "merlin_model")
        if self.added_item_factors is not None:
            np.save(path / "added_item_factors.npy", self.added_item_factors)

    def _load_model(self, path: Path) -> None:
        from merlin.models.implicit import AlternatingLeastSquares, BayesianPersonalizedRanking

        # The base ImplicitModelAdaptor.load cannot rebuild itself (its constructor needs a model); the
        # subclasses can.
        adaptor = AlternatingLeastSquares if self.algorithm == "als" else BayesianPersonalizedRanking
        self.model = adaptor.load(path / "merlin_model")
        self._cache_factors()
        if (path / "added_item_factors.npy").is_file():
            self.added_item_factors = np.load(path / "added_item_factors.npy")
            self.item_factors = np.vstack([self.item_factors, self.added_item_factors])
        if len(self.item_factors) != len(self.item_map):
            raise ValueError(
                f"the retriever at {path} has {len(self.item_factors)} item factor rows for a vocabulary of "
                f"{len(self.item_map)} items; the folder is incomplete or mixed from two fits"
            )


def make_retriever(algorithm: str, **params: Any) -> Retriever:
    """Build an unfitted retriever by name: ``als`` (default), ``bpr`` or ``popularity``."""
    if algorithm == "popularity":
        return PopularityRetriever()
    if algorithm in ("als", "bpr"):
        return ImplicitRetriever(algorithm, **params)
    raise ValueError(f"unknown retrieval algorithm {algorithm!r}; expected one of {list(ALGORITHMS)}")
