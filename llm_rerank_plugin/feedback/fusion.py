"""Online feedback math: fold events into a UserState and turn that state into ranking adjustments.

Everything is closed-form numpy on (d,) vectors, so an event changes the very next ranking with no
retraining. All arrays are float32; states are immutable and every update returns a new one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

from .events import ITEM_KINDS, FeedbackEvent
from .store import UserState, UserStateStore


@dataclass(frozen=True)
class FusionParams:
    """Step sizes and bounds of the online update (see apply_item_event)."""

    step_positive: float = 0.35
    step_negative: float = 0.35
    decay: float = 0.9  # accumulators are multiplied by this before each event, so old feedback fades
    max_norm: float = 1.0  # pos/neg norms are clipped to this, so no burst can swamp the base user vector
    aspect_step: float = 0.25
    aspect_bias_bound: float = 1.0
    text_step: float = 0.5
    feedback_weight: float = 1.0  # weight of (pos - neg) in effective_user_vector

    def __post_init__(self) -> None:
        for name in ("step_positive", "step_negative", "aspect_step", "text_step", "decay"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"FusionParams.{name} must be in (0, 1], got {value!r}")
        for name in ("max_norm", "aspect_bias_bound"):
            if not getattr(self, name) > 0.0:
                raise ValueError(f"FusionParams.{name} must be > 0, got {getattr(self, name)!r}")
        if not self.feedback_weight >= 0.0:
            raise ValueError(f"FusionParams.feedback_weight must be >= 0, got {self.feedback_weight!r}")


class FeedbackResolver(Protocol):
    """What fold_events needs from the recommender to interpret logged events."""

    def item_vector(self, item_id: str) -> np.ndarray | None:
        """(d,) item embedding, or None when the item is unknown (the event is then skipped)."""

    def aspect_share(self, user_id: str, item_id: str) -> np.ndarray:
        """(J,) non-negative shares (summing to 1) of this item's score for this user, per aspect."""

    def text_directions(self, text: str) -> list[tuple[int, np.ndarray]]:
        """Encoded text request: (sign, (d,) vector) per clause, e.g. via parse_text_feedback + encoder."""


def _unit(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    n = float(np.linalg.norm(x))
    return (x / n).astype(np.float32) if n > eps else np.zeros_like(x, dtype=np.float32)


def _clip_norm(x: np.ndarray, max_norm: float) -> np.ndarray:
    n = float(np.linalg.norm(x))
    return (x * (max_norm / n)).astype(np.float32) if n > max_norm else x.astype(np.float32)


def _vec(x: np.ndarray, shape: tuple[int, ...], what: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float32)
    if arr.shape != shape or not np.isfinite(arr).all():
        raise ValueError(f"{what} must be a finite array of shape {shape}, got shape {arr.shape}")
    return arr


def empty_state(dim: int, n_aspects: int) -> UserState:
    """A state with no feedback: zero (dim,) accumulators and a zero (n_aspects,) aspect bias."""
    z = np.zeros(dim, np.float32)
    return UserState(pos=z, neg=z, aspect_bias=np.zeros(n_aspects, np.float32))


def _bookkeep(state: UserState, seq: int | None, **changes: object) -> UserState:
    last_seq = state.last_seq if seq is None else max(state.last_seq, int(seq))
    return replace(state, last_seq=last_seq, n_events=state.n_events + 1, **changes)


def apply_item_event(
    state: UserState,
    sign: int,
    item_vector: np.ndarray,
    aspect_share: np.ndarray,
    params: FusionParams,
    seq: int | None = None,
) -> UserState:
    """Fold one item event (sign +1 like, -1 dislike, 0 neutral) into a new state.

    item_vector: (d,), used by direction only. aspect_share: (J,) distribution of the item's score over
    aspects for this user; only its deviation from the mean moves the bias, so uniform shares move nothing.
    Sign 0 only counts the event and advances last_seq (to `seq` when given).
    """
    if sign not in (-1, 0, 1):
        raise ValueError(f"sign must be -1, 0 or +1, got {sign!r}")
    v = _unit(_vec(item_vector, (state.dim,), "item_vector"))
    share = _vec(aspect_share, (state.n_aspects,), "aspect_share")
    if sign == 0:
        return _bookkeep(state, seq)
    pos, neg = state.pos * params.decay, state.neg * params.decay
    if sign > 0:
        pos = pos + params.step_positive * v
    else:
        neg = neg + params.step_negative * v
    bias = state.aspect_bias + sign * params.aspect_step * (share - share.mean())
    bound = params.aspect_bias_bound
    return _bookkeep(
        state,
        seq,
        pos=_clip_norm(pos, params.max_norm),
        neg=_clip_norm(neg, params.max_norm),
        aspect_bias=np.clip(bias, -bound, bound),
    )


def apply_text_event(
    state: UserState, directions: list[tuple[int, np.ndarray]], params: FusionParams, seq: int | None = None
) -> UserState:
    """Fold one text request: each (sign, (d,) vector) adds text_step * unit(vector) to pos (+) or neg (-).

    Accumulators decay once per event (not per clause), so "less A, more B" is one step in time.
    """
    dirs = [(s, _unit(_vec(v, (state.dim,), "text direction"))) for s, v in directions if s != 0]
    if not dirs:
        return _bookkeep(state, seq)
    pos, neg = state.pos * params.decay, state.neg * params.decay
    for s, v in dirs:
        if s > 0:
            pos = pos + params.text_step * v
        else:
            neg = neg + params.text_step * v
    return _bookkeep(state, seq, pos=_clip_norm(pos, params.max_norm), neg=_clip_norm(neg, params.max_norm))


def effective_user_vector(base_u: np.ndarray, state: UserState, params: FusionParams) -> np.ndarray:
    """(d,) unit float32 user vector normalize(base_u + w * (pos - neg)), w = params.feedback_weight.

    Use for retrieval/scoring with feedback applied. If the sum is ~0 (feedback exactly cancels the
    user), base_u is returned unchanged rather than an arbitrary direction.
    """
    u = _vec(base_u, (state.dim,), "base_u")
    mixed = u + params.feedback_weight * (state.pos - state.neg)
    return _unit(mixed) if np.linalg.norm(mixed) > 1e-6 else u.copy()


def feedback_adjustment(item_vectors: np.ndarray, state: UserState) -> np.ndarray:
    """(C,) additive score term for (C, d) candidates: |pos| cos(v, pos) - |neg| cos(v, neg).

    Equivalently unit(v) . (pos - neg): items aligned with liked/requested directions rise, a disliked
    item and its near neighbours drop, unrelated (orthogonal) items are untouched. An empty accumulator
    contributes 0. Bounded by |pos| + |neg| <= 2 * max_norm.
    """
    items = np.asarray(item_vectors, dtype=np.float32)
    if items.ndim != 2 or items.shape[1] != state.dim:
        raise ValueError(f"item_vectors must have shape (C, {state.dim}), got {items.shape}")
    norms = np.linalg.norm(items, axis=1, keepdims=True)
    units = np.divide(items, norms, out=np.zeros_like(items), where=norms > 1e-12)
    return (units @ (state.pos - state.neg)).astype(np.float32)


def fold_events(
    state: UserState,
    events: Iterable[tuple[int, FeedbackEvent]],
    resolve: FeedbackResolver,
    params: FusionParams | None = None,
) -> UserState:
    """Apply logged (seq, event) pairs in seq order; this rebuilds a state from the log or catches it up.

    Events with seq <= state.last_seq are already folded and ignored, so re-folding is idempotent. Item
    events whose item_vector is None are counted in n_skipped instead of failing.
    """
    params = params or FusionParams()
    for seq, ev in sorted(events, key=lambda pair: pair[0]):
        if seq <= state.last_seq:
            continue
        if ev.kind in ITEM_KINDS:
            assert ev.item_id is not None  # guaranteed by FeedbackEvent validation
            sign = ev.polarity
            v = resolve.item_vector(ev.item_id)
            if v is None:
                state = replace(state, last_seq=seq, n_skipped=state.n_skipped + 1)
            elif sign == 0:
                state = _bookkeep(state, seq)
            else:
                share = resolve.aspect_share(ev.user_id, ev.item_id)
                state = apply_item_event(state, sign, v, share, params, seq=seq)
        else:
            assert ev.text is not None
            state = apply_text_event(state, resolve.text_directions(ev.text), params, seq=seq)
    return state


def refresh_state(
    store: UserStateStore,
    user_id: str,
    resolve: FeedbackResolver,
    dim: int,
    n_aspects: int,
    params: FusionParams | None = None,
) -> UserState:
    """Load the user's state, fold every event logged since, save (compare-and-set) and return it.

    Call before ranking a user so acknowledged feedback is in the very next ranking. Safe to run in
    several processes at once: the store never lets a state move backwards.
    """
    state = store.get_state(user_id) or empty_state(dim, n_aspects)
    if (state.dim, state.n_aspects) != (dim, n_aspects):
        raise ValueError(
            f"stored state for user {user_id!r} has dim={state.dim}, n_aspects={state.n_aspects}; "
            f"expected dim={dim}, n_aspects={n_aspects} (embedding model or aspects changed?)"
        )
    new = fold_events(state, store.events(user_id, after_seq=state.last_seq), resolve, params)
    if new.last_seq > state.last_seq:
        store.put_state(user_id, new)
    return new
