"""What a candidate retriever returns, and the id mapping retrievers share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from merlin.core.dispatch import make_df

# Padding in candidate lists. Item id arrays are int64 for integer catalogues and object (python str)
# for string ones; both are padded with this value, so test with ``!= PAD_ITEM``, never ``>= 0``.
PAD_ITEM = -1


def id_array(values: Any) -> np.ndarray:
    """Ids as given: int64 when every id is an integer, else an object array of the values."""
    values = list(values) if not isinstance(values, np.ndarray) else values
    array = np.asarray(values)
    if array.dtype.kind in "iu":
        return array.astype(np.int64)
    if array.dtype.kind == "O" and all(isinstance(v, int | np.integer) for v in array.tolist()):
        return array.astype(np.int64)
    out = np.empty(len(array), dtype=object)
    out[:] = array.tolist()
    return out


@dataclass
class Candidates:
    """Top-K candidates per user, in original ids.

    ``user_ids``: (U,) ; ``item_ids``: (U, K) int64 (object for string ids), padded with ``PAD_ITEM``
    where fewer than K were found;
    ``scores``: (U, K) float32, descending along each row (-inf at padding).
    """

    user_ids: np.ndarray
    item_ids: np.ndarray
    scores: np.ndarray

    def __post_init__(self) -> None:
        if self.item_ids.shape != self.scores.shape or self.item_ids.shape[0] != len(self.user_ids):
            raise ValueError(
                f"candidates need item_ids and scores of shape (U, K) with U = len(user_ids); got "
                f"{self.item_ids.shape}, {self.scores.shape}, U={len(self.user_ids)}"
            )

    @property
    def k(self) -> int:
        return int(self.item_ids.shape[1])

    def to_frame(self, like: Any = None) -> Any:
        """Long format: one row per (user, candidate) with ``user_id``, ``item_id``, ``score``, ``rank``
        (1-based); padding dropped. cuDF when ``like`` is a cuDF object or Merlin runs on a GPU."""
        valid = self.item_ids != PAD_ITEM
        ranks = np.broadcast_to(np.arange(1, self.k + 1), self.item_ids.shape)
        users = np.broadcast_to(self.user_ids[:, None], self.item_ids.shape)
        return make_df(
            {
                "user_id": users[valid],
                "item_id": self.item_ids[valid],
                "score": self.scores[valid].astype("float32"),
                "rank": ranks[valid].astype("int32"),
            },
            device=None if like is None else _device_of(like),
        )


def _device_of(frame: Any) -> str | None:
    from merlin.core.dispatch import is_cpu_object

    return "cpu" if is_cpu_object(frame) else None


class IdMap:
    """Original id <-> encoded index, from an NVTabular vocabulary (index -> original value)."""

    def __init__(self, vocabulary: np.ndarray, oov_index: int = 2) -> None:
        self.vocabulary = vocabulary
        self.oov_index = oov_index
        self._index = {value: i for i, value in enumerate(vocabulary) if value is not None}

    def encode(self, ids: Any) -> np.ndarray:
        """Encoded indices; ids unknown at fit time map to the OOV index."""
        return np.fromiter((self._index.get(i, self.oov_index) for i in np.asarray(ids).tolist()), np.int64)

    def decode(self, indices: np.ndarray) -> np.ndarray:
        out = np.full(indices.shape, PAD_ITEM, dtype=self.id_dtype)
        known = (indices >= 0) & (indices < len(self.vocabulary))
        values = self.vocabulary[indices[known]]
        decoded = np.empty(len(values), dtype=self.id_dtype)
        decoded[:] = [PAD_ITEM if v is None else v for v in values]
        out[known] = decoded
        return out

    @property
    def id_dtype(self) -> type:
        """int64 when the known ids are integers, else object (string ids)."""
        if not hasattr(self, "_id_dtype"):
            known = [v for v in self.vocabulary.tolist() if v is not None]
            integral = all(isinstance(v, int | np.integer) for v in known)
            self._id_dtype = np.int64 if integral else object
        return self._id_dtype

    def __contains__(self, value: Any) -> bool:
        return value in self._index

    def __len__(self) -> int:
        return len(self.vocabulary)
