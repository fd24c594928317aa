"""The ``llm_rerank`` stage object the platform builds through the plugin manager.

A thin adapter: requests in platform shape (a user and candidates) go to the reranker core, with the
user's real-time feedback applied; feedback events go to the durable store.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from llm_rerank_plugin.config import LLMRerankConfig
from llm_rerank_plugin.feedback.events import FeedbackEvent
from llm_rerank_plugin.feedback.online import OnlineReranker, fusion_params
from llm_rerank_plugin.feedback.store import SQLiteUserStateStore
from llm_rerank_plugin.rerank.reranker import LLMReranker, Ranking

STAGE_NAME = "llm_rerank"


class StageRequestError(ValueError):
    """A ranking request the stage cannot serve (the message says what was expected)."""


class LLMRerankStage:
    """``rank(request) -> Ranking`` and ``feedback(event) -> bool`` for one pipeline.

    ``request``: ``{"user_id": ..., "candidates": frame with item_id and score columns}`` or
    ``{"user_id": ..., "item_ids": [...], "scores": [...]}``; optional ``top_k``.
    """

    def __init__(self, config: LLMRerankConfig, reranker: LLMReranker, store_path: str | Path) -> None:
        self.config = config
        self.reranker = reranker
        Path(store_path).parent.mkdir(parents=True, exist_ok=True)
        self.online = OnlineReranker(
            reranker,
            SQLiteUserStateStore(store_path),
            fusion_params(config.feedback),
            feedback_weight=config.feedback.weight,
        )

    @staticmethod
    def parse_request(request: dict[str, Any]) -> tuple[Any, np.ndarray, np.ndarray]:
        if not isinstance(request, dict) or "user_id" not in request:
            raise StageRequestError(f"a ranking request must be a dict with 'user_id'; got {request!r:.200}")
        if "candidates" in request:
            frame = request["candidates"]
            missing = [c for c in ("item_id", "score") if c not in getattr(frame, "columns", [])]
            if missing:
                present = list(getattr(frame, "columns", []))
                raise StageRequestError(
                    f"request candidates lack columns {missing}; expected item_id and score, got {present}"
                )
            item_ids, scores = frame["item_id"].to_numpy(), frame["score"].to_numpy()
        elif "item_ids" in request and "scores" in request:
            item_ids, scores = (
                np.asarray(request["item_ids"]),
                np.asarray(request["scores"], dtype=np.float32),
            )
        else:
            raise StageRequestError(
                "a ranking request needs 'candidates' (a frame with item_id, score) or 'item_ids' and "
                "'scores'; "
                f"got keys {sorted(request)}"
            )
        if len(item_ids) == 0:
            raise StageRequestError(f"user {request['user_id']!r} has no candidates; expected at least one")
        return request["user_id"], item_ids, scores

    def rank(self, request: dict[str, Any]) -> Ranking:
        user_id, item_ids, scores = self.parse_request(request)
        return self.online.rerank(user_id, item_ids, scores, top_k=request.get("top_k", self.config.top_k))

    def feedback(self, event: dict[str, Any] | FeedbackEvent) -> bool:
        """Durably record one event; True if new. The user's next ``rank`` reflects it."""
        return self.online.record(event)
