"""Real-time feedback: validated events, a durable per-user log/state store, and the online update math."""

from .events import FeedbackEvent, InvalidFeedbackEvent, parse_event, parse_text_feedback
from .fusion import (
    FeedbackResolver,
    FusionParams,
    apply_item_event,
    apply_text_event,
    effective_user_vector,
    empty_state,
    feedback_adjustment,
    fold_events,
    refresh_state,
)
from .store import SQLiteUserStateStore, UserState, UserStateStore

__all__ = [
    "FeedbackEvent",
    "FeedbackResolver",
    "FusionParams",
    "InvalidFeedbackEvent",
    "SQLiteUserStateStore",
    "UserState",
    "UserStateStore",
    "apply_item_event",
    "apply_text_event",
    "effective_user_vector",
    "empty_state",
    "feedback_adjustment",
    "fold_events",
    "parse_event",
    "parse_text_feedback",
    "refresh_state",
]
