"""The reranker core: item table, user context, features, the real-time rerank call and explanations.

Plain numpy/torch; nothing here knows Merlin or pluggy. A request is: look up (or build, for a cold user)
the user's cached context, gather precomputed item projections for the candidates, a few dot products.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from llm_rerank_plugin.rerank.encoder import ItemVectorCache, TextEncoder
from llm_rerank_plugin.rerank.scorer import ItemProjections, MultiAspectScorer
from llm_rerank_plugin.rerank.sequences import (
    NO_ITEM,
    SuccessorParams,
    grow_square,
    recent_weights,
    successor_matrix,
)
from llm_rerank_plugin.rerank.text import ItemTemplate, UserTemplate, field_texts

FEATURE_NAMES = ("retrieval", "recent_similarity", "last_similarity", "popularity", "trending", "co_watch")
RECENT_WINDOW = 5
RECENT_DECAY = 0.8
LAST_ITEMS = 3
TRENDING_WINDOW_S = 14 * 24 * 3600.0
# The co_watch feature scores candidates like the sequential retriever does (same defaults).
CO_WATCH = SuccessorParams()
# The columns of a ranking as a frame: the stage's output contract (operator and plugin alike).
RANKING_COLUMNS = (
    "user_id", "item_id", "rank", "score", "retrieval_score", "aspect", "aspect_share", "because"
)  # fmt: skip


class UnknownItemsError(KeyError):
    """Candidate or history item ids the reranker's item table does not hold."""


def recency_mean(vectors: np.ndarray) -> np.ndarray:
    """(..., R, d) vectors of a user's items, newest first -> (..., d): their mean weighted
    ``RECENT_DECAY ** n`` for the n-th newest, unit length."""
    weights = RECENT_DECAY ** np.arange(vectors.shape[-2], dtype=np.float32)
    mean = (vectors * weights[:, None]).sum(axis=-2)
    return (mean / np.maximum(np.linalg.norm(mean, axis=-1, keepdims=True), 1e-6)).astype(np.float32)


def zscore(values: np.ndarray, axis: int = -1) -> np.ndarray:
    """Standardise along ``axis`` (0 where the values are constant); non-finite entries become the minimum."""
    values = np.asarray(values, dtype=np.float32)
    finite = np.isfinite(values)
    if not finite.all():
        floor = np.where(finite, values, np.inf).min(axis=axis, keepdims=True)
        values = np.where(finite, values, np.where(np.isfinite(floor), floor, 0.0))
    mean = values.mean(axis=axis, keepdims=True)
    std = values.std(axis=axis, keepdims=True)
    return ((values - mean) / np.where(std > 1e-6, std, 1.0)).astype(np.float32)


@dataclass
class ItemTable:
    """The catalogue as the reranker sees it: texts, encoded vectors and a popularity prior.

    ``vectors``: (N, d) full-text vectors; ``field_vectors``: (N, J, d) one per aspect (the "overall"
    aspect uses the full text); ``popularity``: (N,) log(1 + interactions in the history).
    """

    item_ids: np.ndarray
    titles: list[str]
    texts: list[str]
    vectors: np.ndarray
    field_vectors: np.ndarray
    popularity: np.ndarray
    index: dict[Any, int] = field(init=False)

    def __post_init__(self) -> None:
        self.index = {item: i for i, item in enumerate(self.item_ids.tolist())}

    def rows(self, item_ids: Sequence[Any], strict: bool = True) -> np.ndarray:
        """Row of each item id; unknown ids raise (strict) or map to -1."""
        rows = np.fromiter((self.index.get(i, -1) for i in np.asarray(item_ids).tolist()), np.int64)
        if strict and (rows < 0).any():
            missing = np.asarray(item_ids)[rows < 0][:10].tolist()
            raise UnknownItemsError(
                f"{int((rows < 0).sum())} item ids are not in the reranker's catalogue, e.g. {missing}; "
                "add them with LLMReranker.add_items (their text is encoded once)"
            )
        return rows

    @classmethod
    def build(
        cls,
        items: pd.DataFrame,
        encoder: TextEncoder,
        item_template: str,
        aspects: Mapping[str, str | None],
        cache_dir: str | Path | None = None,
        interactions: pd.DataFrame | None = None,
        title_template: str | None = None,
    ) -> ItemTable:
        """Encode every item's text (and one text per aspect field), reusing the on-disk vector cache.

        ``title_template`` renders an item's short name (history texts, explanations); default: the
        ``title`` column where there is one, else the whole item text."""
        item_ids = items["item_id"].to_numpy()
        keys, by_kind = item_cache_texts(items, item_template, aspects)
        texts = by_kind["item"]
        encode = _vector_source(encoder, cache_dir)
        vectors = encode(keys, texts, "item")
        fields = [
            vectors if not tpl else encode(keys, by_kind[f"aspect-{name}"], f"aspect-{name}")
            for name, tpl in aspects.items()
        ]
        if title_template is None and "title" in items.columns:
            title_template = "{title}"  # rendered, so a title is cleaned like every other text
        titles = texts if title_template is None else ItemTemplate(title_template).render_frame(items)
        table = cls(
            item_ids, titles, texts, vectors, np.stack(fields, axis=1), np.zeros(len(item_ids), np.float32)
        )
        if interactions is not None:
            table.set_popularity(interactions)
        return table

    def set_popularity(self, interactions: pd.DataFrame) -> None:
        """Popularity prior and per-item event times from the interactions a model may see (its history)."""
        rows = self.rows(interactions["item_id"].to_numpy(), strict=False)
        times = interactions["timestamp"].to_numpy(dtype=np.float64)
        keep = rows >= 0
        rows, times = rows[keep], times[keep]
        order = np.lexsort((times, rows))
        self.event_rows, self.event_times = rows[order], times[order]
        self._pack_events()
        counts = np.bincount(rows, minlength=len(self.item_ids))
        self.popularity = np.log1p(counts).astype(np.float32)
        self.co_watch = co_watch_matrix(interactions, self)

    # Everything ``set_popularity`` derives from a history, for snapshot and restore.
    HISTORY_STATS = ("popularity", "event_rows", "event_times", "_event_keys", "_t0", "_span", "co_watch")

    def history_stats(self) -> dict[str, Any]:
        """The history-derived statistics as they are now (see ``restore_history_stats``)."""
        return {name: getattr(self, name) for name in self.HISTORY_STATS if hasattr(self, name)}

    def restore_history_stats(self, stats: dict[str, Any]) -> None:
        """Put back statistics taken with ``history_stats``; ones absent then are removed."""
        for name in self.HISTORY_STATS:
            if name in stats:
                setattr(self, name, stats[name])
            elif hasattr(self, name) and name != "popularity":
                delattr(self, name)

    def co_watch_counts(self, history_rows: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """How strongly each candidate followed the user's newest items (``history_rows``, newest first) in
        users' sequences: ``recent_weights . successors[history, candidate]`` (see ``rerank.sequences``)."""
        matrix = getattr(self, "co_watch", None)
        newest = np.asarray(history_rows)[: CO_WATCH.recent]
        if matrix is None or len(newest) == 0:
            return np.zeros(len(rows), np.float32)
        # Summing the few CSR rows by hand: slicing the matrix would build a new one on every request.
        scores = np.zeros(matrix.shape[1], np.float32)
        indptr, indices, data = matrix.indptr, matrix.indices, matrix.data
        for weight, row in zip(recent_weights(newest, CO_WATCH).tolist(), newest.tolist(), strict=True):
            start, end = indptr[row], indptr[row + 1]
            scores[indices[start:end]] += weight * data[start:end]  # a CSR row holds each column once
        return scores[rows]

    def trending(self, rows: np.ndarray, now: float | None, window: float = TRENDING_WINDOW_S) -> np.ndarray:
        """log(1 + events of each item in the ``window`` seconds up to ``now``), from the history only."""
        if now is None or not hasattr(self, "event_rows") or len(self.event_rows) == 0:
            return np.zeros(len(rows), np.float32)
        # One searchsorted over (row, time) packed into a single float key: row * span + time offset.
        t0 = self._t0
        span = self._span

        def key(t: float) -> np.ndarray:
            return rows * span + min(max(t - t0, 0.0), span - 1.0)

        lo = np.searchsorted(self._event_keys, key(now - window), "left")
        hi = np.searchsorted(self._event_keys, key(now), "right")
        return np.log1p(hi - lo).astype(np.float32)

    def _pack_events(self) -> None:
        self._t0 = float(self.event_times.min()) if len(self.event_times) else 0.0
        self._span = float(self.event_times.max() - self._t0 + 1.0) * 2 if len(self.event_times) else 1.0
        self._event_keys = self.event_rows * self._span + (self.event_times - self._t0)


def item_cache_texts(
    items: pd.DataFrame, item_template: str, aspects: Mapping[str, str | None]
) -> tuple[list[str], dict[str, list[str]]]:
    """The vector-cache keys (``str(item_id)``) and, per cache kind, each item's text: ``item`` (the whole
    item text) and ``aspect-<name>`` for every aspect with its own template. What ``ItemTable.build``
    encodes, and what ``llm-rerank encode`` fills the cache with."""
    keys = [str(i) for i in items["item_id"].tolist()]
    by_kind = {"item": ItemTemplate(item_template).render_frame(items)}
    templated = {name: tpl for name, tpl in aspects.items() if tpl}
    if templated:
        by_kind.update({f"aspect-{name}": t for name, t in field_texts(items, templated).items()})
    return keys, by_kind


def co_watch_matrix(interactions: pd.DataFrame, table: ItemTable) -> sp.csr_matrix:
    """(N, N) weighted successor counts (``rerank.sequences.successor_matrix`` with ``CO_WATCH``) of users'
    sequences ordered by time (then original row order), on item-table rows."""
    keys = ["user_id", "timestamp", *(["event_order"] if "event_order" in interactions.columns else [])]
    ordered = interactions.sort_values(keys, kind="stable")
    users = ordered["user_id"].to_numpy()
    rows = table.rows(ordered["item_id"].to_numpy(), strict=False)
    return successor_matrix(users, np.where(rows >= 0, rows, NO_ITEM), len(table.item_ids), CO_WATCH)


def _vector_source(encoder: TextEncoder, cache_dir: str | Path | None):
    caches: dict[str, ItemVectorCache] = {}

    def encode(keys: list[str], texts: list[str], kind: str) -> np.ndarray:
        if cache_dir is None:
            return encoder.encode(texts)
        if kind not in caches:
            caches[kind] = ItemVectorCache(Path(cache_dir) / kind, encoder)
        return caches[kind].get(keys, texts)

    return encode


@dataclass
class UserContext:
    """What a request needs about a user, cached between requests.

    ``text_vector``: (d,) the encoded user text; ``recent_vector``: (d,) recency-weighted mean of the last
    items' vectors; ``history_rows``: item-table rows of the recent history, newest first; ``now``: the time
    the request is about (the user's latest event offline, the clock when serving), for trending counts.
    """

    text: str
    text_vector: np.ndarray
    recent_vector: np.ndarray
    history_rows: np.ndarray
    now: float | None = None


@dataclass
class Ranking:
    """A reranked candidate list (best first) with explanations; arrays of length top_k."""

    user_id: Any
    item_ids: np.ndarray
    scores: np.ndarray
    retrieval_scores: np.ndarray
    aspects: list[str]
    aspect_shares: np.ndarray
    because: list[str | None]

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "user_id": self.user_id,
                "item_id": self.item_ids,
                "rank": np.arange(1, len(self.item_ids) + 1, dtype=np.int32),
                "score": self.scores.astype(np.float32),
                "retrieval_score": self.retrieval_scores.astype(np.float32),
                "aspect": self.aspects,
                "aspect_share": self.aspect_shares.astype(np.float32),
                "because": self.because,
            }
        )


class LLMReranker:
    """Rerank retrieval candidates with text understanding.

    ``rerank(user_id, candidate_ids, retrieval_scores)`` -> ``Ranking``. The user's history and profile come
    from ``set_users`` (or the call); item vectors and the scorer's item projections are precomputed.
    ``new_item_slots`` (default 0) keeps up to that many of each top_k for the best candidates without any
    event in the history (``stages.llm_rerank.new_item_slots``).
    """

    def __init__(
        self,
        encoder: TextEncoder,
        scorer: MultiAspectScorer,
        items: ItemTable,
        user_template: UserTemplate,
        recent_window: int = RECENT_WINDOW,
        cache_size: int = 100_000,
    ) -> None:
        self.encoder = encoder
        self.scorer = scorer.eval()
        self.items = items
        self.user_template = user_template
        self.recent_window = recent_window
        self.histories: dict[Any, list[Any]] = {}
        self.profiles: dict[Any, dict[str, Any]] = {}
        self.last_seen: dict[Any, float] = {}
        self._contexts: OrderedDict[Any, UserContext] = OrderedDict()
        self._cache_size = cache_size
        self._projections: ItemProjections | None = None
        # Places of each top_k kept for candidates without any event in the history (new items): their log
        # features (popularity, trending, co-watch) are all zero, so on score alone they rarely show.
        self.new_item_slots = 0

    # ---------------------------------------------------------------- users
    def set_users(
        self, histories: Mapping[Any, Sequence[Any]], profiles: Mapping[Any, Mapping] | None = None
    ) -> None:
        """Histories: user -> item ids newest first (only events before the one being predicted)."""
        self.histories.update({u: list(h) for u, h in histories.items()})
        if profiles:
            self.profiles.update({u: dict(p) for u, p in profiles.items()})
        for user in histories:
            self._contexts.pop(user, None)

    def observe(self, user_id: Any, item_id: Any, timestamp: float | None = None) -> None:
        """The user just interacted with ``item_id``: it becomes their newest history item."""
        history = self.histories.setdefault(user_id, [])
        history.insert(0, item_id)
        if timestamp is not None:
            self.last_seen[user_id] = float(timestamp)
        del history[self.user_template.max_history * 4 :]
        self._contexts.pop(user_id, None)

    def user_text(self, user_id: Any, history: Sequence[Any] | None = None) -> str:
        history = self.histories.get(user_id, []) if history is None else history
        rows = self.items.rows(history[: self.user_template.max_history], strict=False)
        titles = [self.items.titles[r] for r in rows if r >= 0]
        return self.user_template.render(self.profiles.get(user_id), titles)

    def contexts(
        self,
        user_ids: Sequence[Any],
        histories: Sequence[Sequence[Any]] | None = None,
        now: Sequence[float | None] | None = None,
    ) -> list[UserContext]:
        """User contexts for many users at once (batched encoding); not cached."""
        histories = [self.histories.get(u, []) for u in user_ids] if histories is None else histories
        now = [self.last_seen.get(u) for u in user_ids] if now is None else now
        texts = [self.user_text(u, h) for u, h in zip(user_ids, histories, strict=True)]
        dim = self.items.vectors.shape[1]
        vectors = self.encoder.encode(texts) if texts else np.zeros((0, dim), np.float32)
        out = []
        for text, vector, history, t in zip(texts, vectors, histories, now, strict=True):
            rows = self.items.rows(history[: self.user_template.max_history], strict=False)
            rows = rows[rows >= 0]
            out.append(UserContext(text, vector, self.recent_vector(rows), rows, t))
        return out

    def context(self, user_id: Any) -> UserContext:
        """Cached context; a cold user pays for encoding their text once."""
        cached = self._contexts.get(user_id)
        if cached is not None:
            self._contexts.move_to_end(user_id)
            return cached
        context = self.contexts([user_id])[0]
        self._contexts[user_id] = context
        if len(self._contexts) > self._cache_size:
            self._contexts.popitem(last=False)
        return context

    def prime(self, user_ids: Sequence[Any]) -> None:
        """Build the contexts of the users not cached yet in one batched encoding (bulk recommend)."""
        missing = list(dict.fromkeys(u for u in user_ids if u not in self._contexts))
        for user, context in zip(missing, self.contexts(missing), strict=True):
            self._contexts[user] = context
        while len(self._contexts) > self._cache_size:
            self._contexts.popitem(last=False)

    def is_cached(self, user_id: Any) -> bool:
        return user_id in self._contexts

    def forget(self, user_id: Any) -> None:
        self._contexts.pop(user_id, None)

    def recent_vector(self, rows: np.ndarray) -> np.ndarray:
        """(d,) the recency-weighted mean of the newest ``recent_window`` of ``rows`` (item-table rows, newest
        first), unit length; zeros without history."""
        recent = rows[: self.recent_window]
        if len(recent) == 0:
            return np.zeros(self.items.vectors.shape[1], np.float32)
        return recency_mean(self.items.vectors[recent])

    # ---------------------------------------------------------------- scoring
    def features(self, context: UserContext, rows: np.ndarray, retrieval_scores: np.ndarray) -> np.ndarray:
        """(C, F) per-candidate features (``FEATURE_NAMES``), each z-normalised within the list: retrieval
        score, cosine with the recent-history vector, best cosine with the last few items (both per aspect
        text, then averaged over the aspects), popularity, events in the two weeks before ``context.now``,
        and how often each candidate followed the user's last items in other users' sequences."""
        recent, last = self._history_similarity(context.history_rows, rows)
        trending = self.items.trending(rows, context.now)
        co_watch = self.items.co_watch_counts(context.history_rows, rows)
        columns = [retrieval_scores, recent, last, self.items.popularity[rows], trending, co_watch]
        return np.stack([zscore(c) for c in columns], axis=-1).astype(np.float32)

    def _history_similarity(
        self, history_rows: np.ndarray, rows: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per aspect text (the whole text, title, genres...: ``field_vectors``), each candidate's cosine with
        the recency-weighted mean of the newest items and its best cosine with the last ``LAST_ITEMS``; each
        z-scored within the list, then averaged over the aspects (a user may follow a genre or an era rather
        than the whole description)."""
        recent_rows = history_rows[: self.recent_window]
        if len(recent_rows) == 0:
            return np.zeros(len(rows), np.float32), np.zeros(len(rows), np.float32)
        # One gather and two batched products over the aspects: this runs on every warm request.
        candidates = self.items.field_vectors[rows].transpose(1, 0, 2)  # (J, C, d)
        history = self.items.field_vectors[recent_rows].transpose(1, 0, 2)  # (J, R, d)
        means = recency_mean(history)  # (J, d)
        recent = (candidates @ means[:, :, None])[..., 0]  # (J, C)
        last = (candidates @ history[:, :LAST_ITEMS].transpose(0, 2, 1)).max(axis=2)  # (J, C)
        return zscore(recent, axis=1).mean(axis=0), zscore(last, axis=1).mean(axis=0)

    def projections(self) -> ItemProjections:
        if self._projections is None:
            self._projections = self.scorer.precompute_items(self.items.field_vectors, self.items.vectors)
        return self._projections

    def refresh(self) -> None:
        """Recompute item projections (after training or adding items)."""
        self._projections = None

    def add_items(self, items: pd.DataFrame, item_template: str, aspects: Mapping[str, str | None]) -> int:
        """Encode and append items not yet in the table (incremental: known ids are skipped)."""
        new = items[~items["item_id"].isin(list(self.items.index))]
        if len(new) == 0:
            return 0
        extra = ItemTable.build(new, self.encoder, item_template, aspects)
        t = self.items
        self.items = ItemTable(
            np.concatenate([t.item_ids, extra.item_ids]),
            t.titles + extra.titles,
            t.texts + extra.texts,
            np.concatenate([t.vectors, extra.vectors]),
            np.concatenate([t.field_vectors, extra.field_vectors]),
            np.concatenate([t.popularity, extra.popularity]),
        )
        # New items have no events yet: the history-derived statistics keep their rows, padded with zeros.
        if hasattr(t, "event_rows"):
            self.items.event_rows, self.items.event_times = t.event_rows, t.event_times
            self.items._pack_events()
        if getattr(t, "co_watch", None) is not None:
            self.items.co_watch = grow_square(t.co_watch, len(self.items.item_ids))
        self.refresh()
        return len(new)

    def score_candidates(
        self,
        context: UserContext,
        rows: np.ndarray,
        retrieval_scores: np.ndarray,
        user_vector: np.ndarray | None = None,
        gate_bias: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(scores, winning aspect index, its share) for item-table rows, via the precomputed fast path."""
        features = self.features(context, rows, retrieval_scores)
        u = context.text_vector if user_vector is None else user_vector
        return self.scorer.score_fast(u, rows, self.projections(), features, gate_bias)

    def because(self, context: UserContext, rows: np.ndarray) -> list[str | None]:
        """For each item row: the title of the most similar item in the user's recent history."""
        if len(context.history_rows) == 0:
            return [None] * len(rows)
        sims = self.items.vectors[rows] @ self.items.vectors[context.history_rows].T
        best = context.history_rows[sims.argmax(axis=1)]
        return [self.items.titles[b] for b in best]

    def rerank(
        self,
        user_id: Any,
        candidate_ids: Sequence[Any],
        retrieval_scores: Sequence[float],
        top_k: int | None = 10,
        *,
        user_vector: np.ndarray | None = None,
        gate_bias: np.ndarray | None = None,
        score_offset: np.ndarray | None = None,
    ) -> Ranking:
        """Reorder one user's candidates; returns the best ``top_k`` (None = all) with explanations.

        ``candidate_ids`` (C,) original item ids, ``retrieval_scores`` (C,) finite floats, NaN where a
        candidate has none (ranked as the list's lowest by that feature). ``user_vector``, ``gate_bias`` (J,)
        and ``score_offset`` (C,) let online feedback steer the scorer.
        """
        candidate_ids = np.asarray(candidate_ids)
        retrieval = np.asarray(retrieval_scores, dtype=np.float32)
        if candidate_ids.ndim != 1 or retrieval.shape != candidate_ids.shape:
            raise ValueError(
                f"candidate_ids and retrieval_scores must be 1-D of equal length; got {candidate_ids.shape} "
                f"and {retrieval.shape}"
            )
        if len(candidate_ids) == 0:
            raise ValueError(f"user {user_id!r} has an empty candidate list; expected at least one candidate")
        infinite = np.isinf(retrieval)
        if infinite.any():
            # Refused here as on the platform surfaces (request contract): the fusion z-scores the retrieval
            # column, where +inf would quietly become the list's lowest. NaN stays "no retrieval score".
            bad_ids = candidate_ids[infinite][:5].tolist()
            raise ValueError(
                f"retrieval_scores must be finite float32 numbers (or NaN for no score); got "
                f"{retrieval[infinite][:5].tolist()} for items {bad_ids} of user {user_id!r}"
            )
        rows = self.items.rows(candidate_ids)
        context = self.context(user_id)
        scores, aspect_idx, share = self.score_candidates(context, rows, retrieval, user_vector, gate_bias)
        if score_offset is not None:
            scores = scores + score_offset
        k = len(rows) if top_k is None else min(top_k, len(rows))
        order = np.argsort(-scores, kind="stable")
        order = _keep_places(order, self.items.popularity[rows] == 0, k, self.new_item_slots)
        names = self.scorer.aspect_names
        return Ranking(
            user_id=user_id,
            item_ids=candidate_ids[order],
            scores=scores[order],
            retrieval_scores=retrieval[order],
            aspects=[names[i] for i in aspect_idx[order]],
            aspect_shares=share[order],
            because=self.because(context, rows[order]),
        )

    def __getstate__(self) -> dict[str, Any]:
        # Item projections hold a weak reference to the scorer (staleness check); rebuilt on first use.
        state = dict(self.__dict__)
        state["_projections"] = None
        return state

    # ---------------------------------------------------------------- persistence
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.scorer.save(path / "scorer.pt")
        t = self.items
        extra = {"event_rows": t.event_rows, "event_times": t.event_times} if hasattr(t, "event_rows") else {}
        if getattr(t, "co_watch", None) is not None:
            sp.save_npz(path / "co_watch.npz", t.co_watch)
        string_ids = t.item_ids.dtype.kind in "OUS"
        np.savez(
            path / "items.npz",
            # String ids are stored as a fixed-width unicode array: loading never needs pickle.
            item_ids=t.item_ids.astype(str) if string_ids else t.item_ids,
            vectors=t.vectors,
            field_vectors=t.field_vectors,
            popularity=t.popularity,
            **extra,
        )
        meta = {
            "item_id_kind": "str" if string_ids else "int",
            "titles": t.titles,
            "texts": t.texts,
            "encoder": {
                "model": self.encoder.model_path,
                "max_length": self.encoder.max_length,
                "model_id": self.encoder.model_id,
                "backend": getattr(self.encoder, "backend", "torch"),
            },
            "user_template": _template_config(self.user_template),
            "recent_window": self.recent_window,
            "feature_names": list(FEATURE_NAMES),
            "histories": [[_py(u), [_py(i) for i in h]] for u, h in self.histories.items()],
            "last_seen": [[_py(u), t] for u, t in self.last_seen.items()],
            "profiles": [[_py(u), {k: _py(v) for k, v in p.items()}] for u, p in self.profiles.items()],
        }
        (path / "reranker.json").write_text(json.dumps(meta))
        return path

    @classmethod
    def load(cls, path: str | Path, device: str = "auto", encoder: TextEncoder | None = None) -> LLMReranker:
        path = Path(path)
        meta = json.loads((path / "reranker.json").read_text())
        arrays = np.load(path / "items.npz", allow_pickle=False)
        item_ids = arrays["item_ids"]
        if meta.get("item_id_kind") == "str":
            item_ids = np.asarray(item_ids.tolist(), dtype=object)
        items = ItemTable(
            item_ids,
            meta["titles"],
            meta["texts"],
            arrays["vectors"],
            arrays["field_vectors"],
            arrays["popularity"],
        )
        if "event_rows" in arrays:
            items.event_rows, items.event_times = arrays["event_rows"], arrays["event_times"]
            items._pack_events()
        if (path / "co_watch.npz").exists():
            items.co_watch = sp.load_npz(path / "co_watch.npz").tocsr()
        scorer = MultiAspectScorer.load(path / "scorer.pt")
        # A scorer fitted on another feature list would weigh the wrong columns; bundles saved before the
        # names were recorded are checked by the scorer's width alone.
        saved = meta.get("feature_names")
        if (saved is not None and tuple(saved) != FEATURE_NAMES) or scorer.n_features != len(FEATURE_NAMES):
            raise ValueError(
                f"the reranker at {path} was trained on {scorer.n_features} features "
                f"({saved or 'names not recorded'}); this version computes {len(FEATURE_NAMES)}: "
                f"{list(FEATURE_NAMES)}. Fit it again with this version (`llm-rerank fit`)"
            )
        enc = meta["encoder"]
        encoder = encoder or TextEncoder(
            enc["model"],
            device=device,
            max_length=enc["max_length"],
            show_progress=False,
            backend=enc.get("backend", "torch"),
        )
        reranker = cls(
            encoder,
            scorer,
            items,
            UserTemplate(**meta["user_template"]),
            meta["recent_window"],
        )
        reranker.set_users({u: h for u, h in meta["histories"]}, {u: p for u, p in meta["profiles"]})
        reranker.last_seen = {u: t for u, t in meta.get("last_seen", [])}
        return reranker


def _keep_places(order: np.ndarray, new: np.ndarray, k: int, slots: int) -> np.ndarray:
    """The first ``k`` of ``order`` (best first), where up to ``slots`` of the last places go to the best
    ``new`` candidates below the cut when fewer than that made it on score; the order stays best first."""
    top = order[:k]
    missing = min(slots, int(new.sum())) - int(new[top].sum())
    if missing <= 0:
        return top
    lifted = order[k:][new[order[k:]]][:missing]
    kept = top[~new[top]][: k - len(lifted) - int(new[top].sum())]
    chosen = np.concatenate([kept, top[new[top]], lifted])
    return order[np.isin(order, chosen)]


def _template_config(template: UserTemplate) -> dict[str, Any]:
    return {
        "profile": template._tpl.template,
        "history_prefix": template.history_prefix,
        "max_history": template.max_history,
        "separator": template.separator,
        "history_suffix": template.history_suffix,
    }


def _py(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value
