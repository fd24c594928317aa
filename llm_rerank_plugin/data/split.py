"""Leave-last-out splitting by timestamp, ties broken by original row order.

Works on cuDF and pandas frames alike (only sort/groupby/boolean masks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from merlin.core.dispatch import arange

ORDER_COLUMN = "event_order"


def with_sequence_position(interactions: Any) -> Any:
    """Sort by (user, timestamp, original order) and add ``event_order`` (the original row position),
    ``position`` (0 = the user's first event) and ``from_end`` (0 = the user's last event)."""
    frame = interactions.reset_index(drop=True)
    if ORDER_COLUMN not in frame.columns:
        frame[ORDER_COLUMN] = arange(len(frame), like_df=frame)
    frame = frame.sort_values(["user_id", "timestamp", ORDER_COLUMN]).reset_index(drop=True)
    frame["position"] = frame.groupby("user_id").cumcount()
    length = frame.groupby("user_id")[ORDER_COLUMN].transform("count")
    frame["from_end"] = length - 1 - frame["position"]
    return frame


@dataclass
class Split:
    """Train / validation / test interactions, each sorted by (user, time) with ``position`` columns.

    ``valid`` and ``test`` hold at most one row per user: the second-last and last interaction.
    """

    train: Any
    valid: Any
    test: Any

    @property
    def train_and_valid(self) -> Any:
        """Everything before the test interaction: the history a test-time model may use."""
        from merlin.core.dispatch import concat

        both = concat([self.train, self.valid])
        return both.sort_values(["user_id", "position"]).reset_index(drop=True)


def leave_last_out(interactions: Any, min_interactions: int = 3) -> Split:
    """Per user: last interaction = test, second-last = validation, the rest = train.

    Users with fewer than ``min_interactions`` events keep them all in train and are not evaluated (none
    in MovieLens-100k, where every user has at least 20).
    """
    frame = with_sequence_position(interactions)
    length = frame["position"] + frame["from_end"] + 1
    evaluable = length >= min_interactions
    test_mask = evaluable & (frame["from_end"] == 0)
    valid_mask = evaluable & (frame["from_end"] == 1)
    train_mask = ~(test_mask | valid_mask)
    parts = [frame[mask].reset_index(drop=True) for mask in (train_mask, valid_mask, test_mask)]
    return Split(*parts)


def hold_out_last(interactions: Any, n: int) -> tuple[Any, Any]:
    """Split each user's sequence into (everything but the last ``n``, the last ``n``), keeping at least
    one interaction per user on the left. Used to fit a retriever that never saw the reranker's targets."""
    frame = with_sequence_position(interactions)
    held = (frame["from_end"] < n) & (frame["position"] > 0)
    return frame[~held].reset_index(drop=True), frame[held].reset_index(drop=True)
