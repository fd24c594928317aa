"""Real-time feedback glued to the reranker: an event changes the very next ranking, with no retraining.

``OnlineReranker`` wraps an :class:`LLMReranker` and a :class:`UserStateStore`:

- ``record(event)`` validates the event, appends it to the durable log (the ack) and folds it into the
  user's :class:`UserState` (fusion.py math). Positive item events also move the user's history
  (``reranker.observe``), so the recent-history feature and "because you watched" follow the feedback.
- ``rerank(user, candidates, scores)`` scores with the state applied: the user vector is steered by the
  liked/disliked directions, the aspect gate by the per-aspect bias, and every candidate gets the direct
  ``feedback_adjustment`` term. Items the user explicitly disliked are removed from the list.
- ``rebuild(user)`` recomputes the state from the append-only log; it equals the incremental state.

Real-time design: the user's *text* vector is encoded once (when the user is first seen) and then kept
fixed. Feedback moves the ranking through the fusion state and the moved history (the recent-history
vector and last-item features, computed from precomputed item vectors; the positive event's time becomes
the user's clock), so an event costs no transformer pass and the next request stays on the
~1 ms warm path. The price is that the user *text* (the titles the encoder read) lags behind the newest
likes until the user is forgotten (``forget``) and re-encoded.

The same pinned text vector is what the resolver uses to split an item's score over aspects, so folding
is a pure function of the log: that is why ``rebuild`` equals the incremental state exactly.

Ids follow the request contract (``platform/contract.py``): every user id given to this class (in a
request or an event) is normalised to the type of the reranker's users, and an event's item id to the
catalogue's type, before anything is read or written; so the store's key (``str`` of the normalised id)
and the reranker's key always agree, and ``"4"`` and ``4`` are one user of an integer-keyed reranker.
Text feedback is sanitised and cut to ``max_text_chars`` before it is logged, and parsed into at most
``MAX_TEXT_PHRASES`` phrases.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llm_rerank_plugin.platform.contract import (
    DEFAULT_MAX_TEXT_CHARS,
    InvalidIdError,
    item_id_kind,
    normalise_id,
    sanitize_text,
    user_id_kind,
)

from .events import ITEM_KINDS, FeedbackEvent, InvalidFeedbackEvent, parse_event, parse_text_feedback
from .fusion import FusionParams, effective_user_vector, empty_state, feedback_adjustment, fold_events
from .store import SQLiteUserStateStore, UserState, UserStateStore

if TYPE_CHECKING:  # the reranker imports torch/transformers; keep `import ...feedback` light
    from llm_rerank_plugin.config import FeedbackConfig, PipelineConfig
    from llm_rerank_plugin.rerank.reranker import LLMReranker, Ranking, UserContext

__all__ = [
    "OnlineReranker",
    "RerankerResolver",
    "default_store_path",
    "fusion_params",
    "hides_item",
    "open_online_reranker",
]


def fusion_params(cfg: FeedbackConfig) -> FusionParams:
    """The fusion step sizes of a ``stages.llm_rerank.feedback`` config section.

    ``cfg.weight`` is not among them: it weighs the direct score term and goes to
    ``OnlineReranker(feedback_weight=...)``.
    """
    return FusionParams(
        step_positive=cfg.step_positive,
        step_negative=cfg.step_negative,
        decay=cfg.decay,
        max_norm=cfg.max_norm,
        aspect_step=cfg.aspect_step,
        aspect_bias_bound=cfg.aspect_bias_bound,
        text_step=cfg.text_step,
    )


def default_store_path(config: PipelineConfig) -> Path:
    """``feedback.store`` from the config, else ``<output_dir>/feedback.sqlite``."""
    store = config.llm_rerank().feedback.store
    return Path(store) if store else config.output_path / "feedback.sqlite"


def open_online_reranker(
    config: PipelineConfig, reranker: LLMReranker, store: UserStateStore | None = None
) -> OnlineReranker:
    """An OnlineReranker configured from ``stages.llm_rerank.feedback`` (store defaults to the SQLite file
    of :func:`default_store_path`)."""
    section = config.llm_rerank()
    cfg = section.feedback
    if store is None:
        path = default_store_path(config)
        path.parent.mkdir(parents=True, exist_ok=True)
        store = SQLiteUserStateStore(path)
    return OnlineReranker(
        reranker, store, fusion_params(cfg), feedback_weight=cfg.weight, max_text_chars=section.max_text_chars
    )


def hides_item(event: FeedbackEvent) -> bool:
    """Whether the event is an *explicit* rejection that removes the item from the user's lists.

    ``dislike`` and low ratings (<= 2 stars) hide the item; a ``skip`` is implicit (a scroll-past is weak
    evidence), so it only steers the scores. A later positive event on the item un-hides it.
    """
    return event.kind == "dislike" or (event.kind == "rating" and event.polarity < 0)


class RerankerResolver:
    """:class:`FeedbackResolver` over an LLMReranker, for one user with a pinned text vector.

    - ``item_vector``: the item's full-text vector from the reranker's item table (None if not in it).
    - ``aspect_share``: how the scorer splits this item's score over aspects for this user, computed
      with the pinned (pre-feedback) text vector and no gate bias, so it never depends on feedback
      already folded. The winning aspect gets its exact share (``score_candidates``' explanation) and the
      remainder is spread evenly over the others: only public scorer outputs are used.
    - ``text_directions``: ``parse_text_feedback`` clauses encoded by the reranker's own encoder (the
      same space as the item vectors), of the text's first ``max_text_chars`` characters (new events are
      cut before they are logged; this bounds the work for older logs). ``phrase_cache`` memoises them.
    """

    def __init__(
        self,
        reranker: LLMReranker,
        text_vector: np.ndarray,
        item_rows: Callable[[str], int | None],
        phrase_cache: dict[str, np.ndarray] | None = None,
        max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
    ) -> None:
        self.reranker = reranker
        self.text_vector = text_vector
        self._row = item_rows
        self._phrases = {} if phrase_cache is None else phrase_cache
        self.max_text_chars = int(max_text_chars)

    def item_vector(self, item_id: str) -> np.ndarray | None:
        row = self._row(item_id)
        return None if row is None else self.reranker.items.vectors[row]

    def aspect_share(self, user_id: str, item_id: str) -> np.ndarray:
        n = self.reranker.scorer.n_aspects
        row = self._row(item_id)
        if row is None:  # fold_events only asks for known items; uniform shares move no bias anyway
            return np.full(n, 1.0 / n, np.float32)
        r = self.reranker
        _, winner, share = r.scorer.score_fast(self.text_vector, np.array([row]), r.projections())
        if n == 1:
            return np.ones(1, np.float32)
        out = np.full(n, (1.0 - float(share[0])) / (n - 1), np.float32)
        out[int(winner[0])] = float(share[0])
        return out

    def text_directions(self, text: str) -> list[tuple[int, np.ndarray]]:
        clauses = parse_text_feedback(text[: self.max_text_chars])
        missing = list(dict.fromkeys(p for _, p in clauses if p not in self._phrases))
        if missing:
            for phrase, vector in zip(missing, self.reranker.encoder.encode(missing), strict=True):
                self._phrases[phrase] = vector
        return [(sign, self._phrases[phrase]) for sign, phrase in clauses]


@dataclass
class _User:
    """What this process holds for one user with feedback (see OnlineReranker)."""

    key: Any  # the reranker's id for the user (normalised; the store's key is its str)
    base: UserContext  # pinned context from before this process applied any feedback
    context: UserContext  # live: base text vector + history rows moved by positive feedback
    state: UserState
    synced_seq: int = 0  # highest log seq whose hide/history effects are applied
    hidden: set[int] = field(default_factory=set)  # item-table rows explicitly rejected
    hidden_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    dirty: bool = False  # state newer than the store's copy (persist_state=False)


class OnlineReranker:
    """Rerank with each user's real-time feedback applied; see the module docstring for the design.

    Args:
        reranker: the (trained) reranker; positive feedback calls its ``observe``.
        store: the durable event log and state store (shared by processes).
        params: fusion step sizes (``fusion_params(config)``); default FusionParams().
        feedback_weight: weight of the direct ``feedback_adjustment`` term added to each candidate's score.
        watch_store: before each rerank, ask the store whether the user has events this instance has not
            seen (one indexed SQLite query, ~10 us against a ~0.3-1 ms request). It makes feedback recorded
            by *other* processes count on the next request. Turn off only when this instance is the only
            writer for its users; then the hot path does no I/O at all.
        persist_state: write the folded state to the store after each recorded event (a second fsync'd
            commit, ~5 ms on a disk). The log alone is enough to rebuild it, so a replay or benchmark that
            does not need the snapshot can turn this off and call ``flush()`` when done.
        max_users: users with feedback kept in memory (least recently used are dropped and reloaded from
            the store when needed; their pinned text vector is then re-encoded from the current history).
        max_text_chars: text feedback is cut to this many characters before it is logged
            (``LLMRerankConfig.max_text_chars``).

    User ids (arguments and events) are normalised to the reranker's user id type (module docstring).

    Not thread-safe (nor is LLMReranker): use one instance per worker; the store keeps workers consistent.
    """

    def __init__(
        self,
        reranker: LLMReranker,
        store: UserStateStore,
        params: FusionParams | None = None,
        feedback_weight: float = 1.0,
        *,
        watch_store: bool = True,
        persist_state: bool = True,
        max_users: int = 100_000,
        max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
    ) -> None:
        if not np.isfinite(feedback_weight) or feedback_weight < 0:
            raise ValueError(f"feedback_weight must be a finite number >= 0, got {feedback_weight!r}")
        if max_users < 1:
            raise ValueError(f"max_users must be >= 1, got {max_users!r}")
        if isinstance(max_text_chars, bool) or not isinstance(max_text_chars, int) or max_text_chars < 1:
            raise ValueError(f"max_text_chars must be an int >= 1, got {max_text_chars!r}")
        self.reranker = reranker
        self.store = store
        self.params = params or FusionParams()
        self.feedback_weight = float(feedback_weight)
        self.watch_store = watch_store
        self.persist_state = persist_state
        self.max_users = int(max_users)
        self.max_text_chars = int(max_text_chars)
        self._users: OrderedDict[str, _User] = OrderedDict()
        # Users last seen without feedback: one cheap store check per request instead of a full load.
        self._no_feedback: set[str] = set()
        self._item_rows: dict[str, int] = {}
        self._items_table: Any = None
        self._phrases: dict[str, np.ndarray] = {}

    # ------------------------------------------------------------------ public API
    def record(self, event: dict[str, Any] | FeedbackEvent) -> bool:
        """Log one event and apply it; True if new, False if its ``event_id`` was already logged.

        Raises InvalidFeedbackEvent (naming each bad field) before anything is written or changed; that
        includes ids that cannot be normalised to the reranker's id types. The logged event carries the
        normalised ids and the sanitised text, cut to ``max_text_chars``. Once this returns, the event is
        durable and the user's next ``rerank`` reflects it. A duplicate changes nothing (the log applies
        each event id once). Events on well-formed item ids outside the reranker's catalogue are logged but
        move nothing (counted in ``UserState.n_skipped``).
        """
        ev = self._canonical(parse_event(event))
        if not self.store.append(ev):
            return False
        uid, key = ev.user_id, self._user_key(ev.user_id)
        self._no_feedback.discard(uid)
        self._sync(uid, key, check_store=True)
        return True

    def _canonical(self, ev: FeedbackEvent) -> FeedbackEvent:
        """``ev`` with ids normalised to the reranker's id types and its text cut to ``max_text_chars``."""
        changes: dict[str, Any] = {}
        try:
            user = str(normalise_id(ev.user_id, user_id_kind(self.reranker), "user_id"))
            item = (
                None
                if ev.item_id is None
                else str(normalise_id(ev.item_id, item_id_kind(self.reranker), "item_id"))
            )
        except InvalidIdError as exc:
            raise InvalidFeedbackEvent(f"invalid feedback event {ev.event_id!r}: {exc}") from None
        if user != ev.user_id:
            changes["user_id"] = user
        if item != ev.item_id:
            changes["item_id"] = item
        if ev.text is not None and len(ev.text) > self.max_text_chars:
            changes["text"] = sanitize_text(ev.text, self.max_text_chars, keep_newlines=True).strip()
        return ev.model_copy(update=changes) if changes else ev

    def record_many(self, events: Iterable[dict[str, Any] | FeedbackEvent]) -> int:
        """``record`` each event in order; returns how many were new. Stops at the first invalid one."""
        return sum(self.record(ev) for ev in events)

    def rerank(
        self,
        user_id: Any,
        candidate_ids: Sequence[Any],
        retrieval_scores: Sequence[float],
        top_k: int | None = 10,
    ) -> Ranking:
        """Like ``LLMReranker.rerank``, with the user's feedback applied.

        Explicitly disliked items (``hides_item``) are removed from the candidates before scoring, so the
        result may be shorter than ``top_k`` and is empty when every candidate was rejected. A user with no
        feedback goes straight to ``reranker.rerank``.
        """
        uid, user_id = self._ident(user_id)
        user = self._sync(uid, user_id, check_store=self.watch_store)
        if user is None:
            return self.reranker.rerank(user_id, candidate_ids, retrieval_scores, top_k)
        candidate_ids = np.asarray(candidate_ids)
        retrieval = np.asarray(retrieval_scores, dtype=np.float32)
        if candidate_ids.ndim != 1 or retrieval.shape != candidate_ids.shape or len(candidate_ids) == 0:
            # Same message and checks as the plain path, so callers see one contract.
            return self.reranker.rerank(user_id, candidate_ids, retrieval, top_k)
        rows = self.reranker.items.rows(candidate_ids)
        if len(user.hidden_rows):
            keep = ~np.isin(rows, user.hidden_rows)
            candidate_ids, retrieval, rows = candidate_ids[keep], retrieval[keep], rows[keep]
        return self._rank(user, user_id, candidate_ids, retrieval, rows, top_k)

    def state(self, user_id: Any) -> UserState | None:
        """The user's current folded state (caught up with the store), or None when they have no feedback."""
        user = self._sync(*self._ident(user_id), check_store=True)
        return None if user is None else user.state

    def hidden_items(self, user_id: Any) -> list[Any]:
        """Item ids the user explicitly rejected (removed from their lists), in catalogue order."""
        user = self._sync(*self._ident(user_id), check_store=True)
        if user is None:
            return []
        ids = self.reranker.items.item_ids
        return [ids[r].item() if isinstance(ids[r], np.generic) else ids[r] for r in sorted(user.hidden)]

    def rebuild(self, user_id: Any) -> UserState:
        """Recompute the user's state from the whole append-only log, store it and return it.

        Equals the incrementally folded state: folding is a pure function of the log and of the user's
        pinned text vector (module docstring), which stays the same while the user is held by this
        instance; after ``forget`` or an LRU eviction it is re-pinned from the then-current history. Use
        after changing fusion params or to repair a state snapshot.
        """
        uid, key = self._ident(user_id)
        user = self._sync(uid, key, check_store=True)
        if user is None:
            return empty_state(self._dim, self._n_aspects)
        events = self.store.events(uid, after_seq=0)
        fresh = empty_state(self._dim, self._n_aspects)
        user.state = fold_events(fresh, events, self._resolver(user.base), self.params)
        user.hidden.clear()
        self._apply_hides(user, events, after_seq=0)
        self.store.put_state(uid, user.state)
        user.dirty = False
        return user.state

    def forget(self, user_id: Any) -> None:
        """Drop what this instance holds for the user; the next request reloads it from the store."""
        uid, key = self._ident(user_id)
        self.flush(key)
        self._users.pop(uid, None)
        self._no_feedback.discard(uid)

    def flush(self, user_id: Any | None = None) -> int:
        """Write states not yet stored (``persist_state=False``); returns how many were written."""
        if user_id is None:
            users = self._users.items()
        else:
            uid = self._ident(user_id)[0]
            users = [(uid, self._users.get(uid))]
        written = 0
        for uid, user in list(users):
            if user is not None and user.dirty:
                self.store.put_state(uid, user.state)
                user.dirty = False
                written += 1
        return written

    # ------------------------------------------------------------------ scoring
    def _rank(
        self,
        user: _User,
        user_id: Any,
        candidate_ids: np.ndarray,
        retrieval: np.ndarray,
        rows: np.ndarray,
        top_k: int | None,
    ) -> Ranking:
        from llm_rerank_plugin.rerank.reranker import Ranking

        r, state, ctx = self.reranker, user.state, user.context
        if len(rows) == 0:
            empty = np.zeros(0, np.float32)
            return Ranking(user_id, candidate_ids, empty, empty, [], empty, [])
        # The live context is passed explicitly (not reranker.context) because the reranker dropped its
        # cached context when observe() moved the history; its text vector is the pinned one.
        u = effective_user_vector(ctx.text_vector, state, self.params)
        scores, aspect_idx, share = r.score_candidates(ctx, rows, retrieval, u, state.aspect_bias)
        if self.feedback_weight:
            scores = scores + self.feedback_weight * feedback_adjustment(r.items.vectors[rows], state)
        k = len(rows) if top_k is None else min(top_k, len(rows))
        order = np.argsort(-scores, kind="stable")[:k]
        names = r.scorer.aspect_names
        return Ranking(
            user_id=user_id,
            item_ids=candidate_ids[order],
            scores=scores[order].astype(np.float32),
            retrieval_scores=retrieval[order],
            aspects=[names[i] for i in aspect_idx[order]],
            aspect_shares=share[order],
            because=r.because(ctx, rows[order]),
        )

    # ------------------------------------------------------------------ user state
    @property
    def _dim(self) -> int:
        return int(self.reranker.items.vectors.shape[1])

    @property
    def _n_aspects(self) -> int:
        return int(self.reranker.scorer.n_aspects)

    def _resolver(self, base: UserContext) -> RerankerResolver:
        return RerankerResolver(
            self.reranker, base.text_vector, self._row, self._phrases, self.max_text_chars
        )

    def _row(self, item_id: str) -> int | None:
        items = self.reranker.items
        if items is not self._items_table:  # add_items replaces the table; rows of old items stay valid
            self._item_rows = {str(i): row for i, row in items.index.items()}
            self._items_table = items
        return self._item_rows.get(str(item_id))

    def _ident(self, user_id: Any) -> tuple[str, Any]:
        """(the store's key, the reranker's key) of a user id: the contract's normalised id and its str."""
        key = normalise_id(user_id, user_id_kind(self.reranker), "user_id")
        return str(key), key

    def _user_key(self, uid: str) -> Any:
        """The reranker's key of a store key written by ``record`` (already canonical)."""
        return normalise_id(uid, user_id_kind(self.reranker), "user_id")

    def _sync(self, uid: str, key: Any, check_store: bool) -> _User | None:
        """The user's entry caught up with the log (loaded on first use); None if they have no feedback.
        ``uid`` is the store's key, ``key`` the reranker's (see ``_ident``)."""
        user = self._users.get(uid)
        if user is None:
            if uid in self._no_feedback and (not check_store or not self.store.events(uid, after_seq=0)):
                return None  # one indexed query (or none) for users without feedback
            return self._load(uid, key)
        self._users.move_to_end(uid)
        if check_store:
            new = self.store.events(uid, after_seq=user.synced_seq)
            if new:
                self._apply(uid, user, new, replay=False)
        return user

    def _load(self, uid: str, key: Any) -> _User | None:
        events = self.store.events(uid, after_seq=0)
        stored = self.store.get_state(uid)
        if not events and stored is None:
            if len(self._no_feedback) >= 10 * self.max_users:  # bound memory; forgetting only costs a query
                self._no_feedback.clear()
            self._no_feedback.add(uid)
            return None
        dim, n_aspects = self._dim, self._n_aspects
        state = stored or empty_state(dim, n_aspects)
        if (state.dim, state.n_aspects) != (dim, n_aspects):
            raise ValueError(
                f"stored feedback state for user {uid!r} has dim={state.dim}, n_aspects={state.n_aspects}; "
                f"expected dim={dim}, n_aspects={n_aspects} (was the encoder or the aspect list changed? "
                "rebuild() recomputes it from the log)"
            )
        base = self.reranker.context(key)  # pinned before replay moves the history
        user = _User(key=key, base=base, context=base, state=state)
        self._apply(uid, user, events, replay=True)
        self._no_feedback.discard(uid)
        self._users[uid] = user
        while len(self._users) > self.max_users:
            old_uid, old = self._users.popitem(last=False)
            if old.dirty:
                self.store.put_state(old_uid, old.state)
        return user

    def _apply(self, uid: str, user: _User, events: list[tuple[int, FeedbackEvent]], replay: bool) -> None:
        """Apply logged events (ascending seq): hides, history moves, then the fusion fold."""
        positives = self._apply_hides(user, events, after_seq=user.synced_seq)
        if positives:
            history = self.reranker.histories.get(user.key, [])
            # On a (re)load the log is replayed into the history; items already there (e.g. observed
            # earlier in this process, before the user was evicted) are not added twice.
            seen = set(history) if replay else set()
            for item, timestamp in positives:
                if item not in seen:
                    # The event time also becomes the user's "now" (the trending features' clock).
                    self.reranker.observe(user.key, item, timestamp=timestamp)
            user.context = self._live_context(user)
        state = fold_events(user.state, events, self._resolver(user.base), self.params)
        if state.last_seq > user.state.last_seq:
            user.state = state
            if self.persist_state:
                self.store.put_state(uid, state)  # compare-and-set: never moves a newer state back
            else:
                user.dirty = True

    def _apply_hides(self, user: _User, events: list[tuple[int, FeedbackEvent]], after_seq: int) -> list[Any]:
        """Update the hidden set from item events with seq > after_seq; returns the positively rated item
        ids among them, in log order."""
        positives = []
        for seq, ev in sorted(events, key=lambda pair: pair[0]):
            if seq <= after_seq:
                continue
            user.synced_seq = max(user.synced_seq, seq)
            if ev.kind not in ITEM_KINDS:
                continue
            row = self._row(ev.item_id)
            if row is None:
                continue
            if hides_item(ev):
                user.hidden.add(row)
            elif ev.polarity > 0:
                user.hidden.discard(row)
                item = self.reranker.items.item_ids[row]  # a numpy int, or a python str for string ids
                positives.append((item.item() if isinstance(item, np.generic) else item, ev.timestamp))
        user.hidden_rows = np.fromiter(sorted(user.hidden), np.int64, len(user.hidden))
        return positives

    def _live_context(self, user: _User) -> UserContext:
        """The pinned text with the reranker's current history (rows, recent vector) and clock: no encoder
        call."""
        r = self.reranker
        history = r.histories.get(user.key, [])[: r.user_template.max_history]
        rows = r.items.rows(history, strict=False)
        rows = rows[rows >= 0]
        now = r.last_seen.get(user.key, user.base.now)
        return replace(user.base, recent_vector=r.recent_vector(rows), history_rows=rows, now=now)
