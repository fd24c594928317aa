"""The ``llm_rerank`` stage object the platform builds through the plugin manager.

A thin adapter: requests in platform shape (a user and candidates) go to the reranker core, with the
user's real-time feedback applied; feedback events go to the durable store. Every request passes the
request contract first (``platform/contract.py``: ids normalised to the reranker's types or refused by
name, duplicate candidates merged with the best score kept, unknown items dropped with a warning, ``+inf``
scores refused, ``top_k`` checked); every refusal is a ``contract.RequestError``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from llm_rerank_plugin.config import LLMRerankConfig
from llm_rerank_plugin.feedback.events import FeedbackEvent
from llm_rerank_plugin.feedback.online import OnlineReranker, fusion_params
from llm_rerank_plugin.feedback.store import SQLiteUserStateStore
from llm_rerank_plugin.platform.contract import (
    FeedbackRoutingError,
    MalformedRequestError,
    check_top_k,
    prepare_candidates,
)
from llm_rerank_plugin.rerank.reranker import LLMReranker, Ranking

STAGE_NAME = "llm_rerank"

# The stage's name for a request of the wrong shape (kept for callers that catch it by this name).
StageRequestError = MalformedRequestError


class LLMRerankStage:
    """``rank(request) -> Ranking`` and ``feedback(event) -> bool`` for one pipeline.

    ``request``: ``{"user_id": ..., "candidates": frame with item_id and score columns}`` or
    ``{"user_id": ..., "item_ids": [...], "scores": [...]}``; optional ``top_k`` (an int >= 1; absent or
    None = the configured one). The ranking has ``min(top_k, distinct known candidates)`` items, fewer
    when the user's feedback hid some (``OnlineReranker.rerank``).

    ``name`` identifies the stage for feedback routing (``platform/plugin.py``); an event may name it
    (or the store file) under the key ``"stage"``.
    """

    def __init__(
        self,
        config: LLMRerankConfig,
        reranker: LLMReranker,
        store_path: str | Path,
        cross_encoder: Any = None,
        name: str | None = None,
    ) -> None:
        if config.scorer == "cross" and cross_encoder is None:
            raise ValueError(
                "scorer: cross needs a fine-tuned cross-encoder in the stage context ('cross_encoder'); "
                "`llm-rerank evaluate` with the rerank-cross stage writes one to <output_dir>/artifacts"
            )
        self.config = config
        self.reranker = reranker
        self.cross_encoder = cross_encoder if config.scorer == "cross" else None
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"a stage name must be a non-empty str, got {name!r}")
        self.name = name
        self.store_path = Path(store_path).absolute()
        self.store_path.parent.mkdir(parents=True, exist_ok=True)
        self.online = OnlineReranker(
            reranker,
            SQLiteUserStateStore(self.store_path),
            fusion_params(config.feedback),
            feedback_weight=config.feedback.weight,
            max_text_chars=config.max_text_chars,
        )

    def answers_to(self, target: Any) -> bool:
        """Whether a feedback event's ``"stage"`` key names this stage: its name or its store file."""
        if not isinstance(target, str | Path) or not str(target):
            return False
        if self.name is not None and target == self.name:
            return True
        return Path(target).absolute() == self.store_path

    @staticmethod
    def parse_request(request: dict[str, Any]) -> tuple[Any, Any, Any]:
        """(user id, item ids, scores) of a request, as sent: the shape is checked here, the values by
        ``contract.prepare_candidates``."""
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
            # Not np.asarray: a mixed list such as [3, "4"] would silently become strings.
            item_ids, scores = request["item_ids"], request["scores"]
        else:
            raise StageRequestError(
                "a ranking request needs 'candidates' (a frame with item_id, score) or 'item_ids' and "
                "'scores'; "
                f"got keys {sorted(request)}"
            )
        if not hasattr(item_ids, "__len__"):
            raise StageRequestError(
                f"request item_ids must be a list or array; got {type(item_ids).__name__}"
            )
        if len(item_ids) == 0:
            raise StageRequestError(f"user {request['user_id']!r} has no candidates; expected at least one")
        return request["user_id"], item_ids, scores

    def rank(self, request: dict[str, Any]) -> Ranking:
        """The reranked candidates of ``request`` (class doc); a ``contract.RequestError`` names what is
        wrong with a request it refuses."""
        user_id, item_ids, scores = self.parse_request(request)
        top_k = request.get("top_k")
        top_k = self.config.top_k if top_k is None else check_top_k(top_k, "request top_k")
        cands = prepare_candidates(self.reranker, user_id, item_ids, scores)
        if self.cross_encoder is None:
            return self.online.rerank(cands.user_id, cands.item_ids, cands.scores, top_k=top_k)
        ranking = self.online.rerank(cands.user_id, cands.item_ids, cands.scores, top_k=None)
        return self._cascade(cands.user_id, ranking, top_k)

    def _cascade(self, user_id: Any, ranking: Ranking, top_k: int | None) -> Ranking:
        """The cross-encoder reorders the bilinear top ``cross.top_m``; the rest keep their order. Scores
        of the reordered block are cross-encoder logits shifted above the rest."""
        if len(ranking.item_ids) == 0:  # every candidate hidden by the user's feedback
            return ranking
        m = min(self.config.cross.top_m, len(ranking.item_ids))
        rows = self.reranker.items.rows(ranking.item_ids[:m])
        user_text = self.reranker.context(user_id).text
        logits = self.cross_encoder.predict([(user_text, self.reranker.items.texts[r]) for r in rows])
        order = np.r_[np.argsort(-logits, kind="stable"), np.arange(m, len(ranking.item_ids))]
        tail = ranking.scores[m:]
        scores = np.r_[logits[order[:m]] - logits.min() + (tail.max() + 1.0 if len(tail) else 0.0), tail]
        k = len(order) if top_k is None else min(top_k, len(order))
        return Ranking(
            user_id=user_id,
            item_ids=ranking.item_ids[order][:k],
            scores=scores[:k].astype(np.float32),
            retrieval_scores=ranking.retrieval_scores[order][:k],
            aspects=[ranking.aspects[i] for i in order[:k]],
            aspect_shares=ranking.aspect_shares[order][:k],
            because=[ranking.because[i] for i in order[:k]],
        )

    def feedback(self, event: dict[str, Any] | FeedbackEvent) -> bool:
        """Durably record one event; True if new. The user's next ``rank`` reflects it.

        A ``"stage"`` key, when present, must name this stage (``answers_to``) and is removed before the
        event is validated (``FeedbackRoutingError`` otherwise)."""
        if isinstance(event, dict) and "stage" in event:
            event = dict(event)
            target = event.pop("stage")
            if not self.answers_to(target):
                raise FeedbackRoutingError(
                    f"feedback event for stage {target!r} sent to stage {self.name!r} (store "
                    f"{self.store_path}); expected this stage's name or store path"
                )
        return self.online.record(event)
