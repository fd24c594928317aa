"""The id-based half of the chain, fitted on one history: NVTabular preprocessing and Merlin retrieval.

Whatever fits it (``fit`` on all logs, ``evaluate`` on the training part of its split) gets the same
objects; nothing here knows about evaluation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llm_rerank_plugin.config import PipelineConfig
from llm_rerank_plugin.data import InteractionData
from llm_rerank_plugin.preprocess.workflow import FeatureSpec, Preprocessor, join_features
from llm_rerank_plugin.retrieve.retrievers import Retriever, make_retriever
from llm_rerank_plugin.retrieve.sequential import HybridRetriever, SequentialModel, SequentialParams


class Chain:
    """Preprocessing fitted on ``history`` (all the events this fit may see) and retrievers on demand."""

    def __init__(self, config: PipelineConfig, data: InteractionData, history: Any, work_dir: Path) -> None:
        self.config = config
        self.data = data
        self.history = history
        p = config.preprocess
        self.spec = FeatureSpec(p.user_features, p.item_features, p.text_columns)
        self.work_dir = Path(work_dir)
        self.preprocessor = Preprocessor.fit(self.join(history), self.work_dir, self.spec)
        self.sequential_weight: float | None = None

    def join(self, interactions: Any) -> Any:
        return join_features(interactions, self.data, self.spec)

    def fit_retriever(
        self, history: Any, algorithm: str | None = None, merged: bool = True, weight: float | None = None
    ) -> Retriever:
        """A retriever of the configured kind (or ``algorithm``) fitted on ``history``; merged with the
        sequential model when ``retrieval.sequential.enabled`` (unless ``merged`` is false or the kind is
        popularity). ``history`` is a host frame with ``position`` (the user's event order)."""
        r = self.config.retrieval
        algorithm = algorithm or r.model
        params = (
            {}
            if algorithm == "popularity"
            else dict(
                factors=r.factors,
                iterations=r.iterations,
                regularization=r.regularization,
                alpha=r.alpha,
                learning_rate=r.learning_rate,
                seed=self.config.seed,
            )
        )
        dataset = self.preprocessor.transform_dataset(self.join(history))
        retriever = make_retriever(algorithm, **params)
        vocabulary = self.preprocessor.vocabulary
        retriever.fit(dataset, vocabulary("user_id"), vocabulary("item_id"))
        s = r.sequential
        if not (merged and s.enabled and algorithm != "popularity"):
            return retriever
        params = SequentialParams(**s.model_dump(exclude={"enabled", "weight"}))
        sequential = SequentialModel.fit(history, retriever.user_map, retriever.item_map, params)
        weight = next((w for w in (weight, s.weight, self.sequential_weight) if w is not None), None)
        if weight is None:
            raise RuntimeError(
                "retrieval.sequential.weight is null and no weight was chosen on validation yet: call "
                "fit_validation_retriever first (fit does)"
            )
        return HybridRetriever(retriever, sequential, weight)

    def fit_validation_retriever(self, history: Any, users: Any, targets: Any) -> tuple[Retriever, dict]:
        """The retriever fitted on ``history`` that ranks the validation ``targets`` (one per user, the
        events after it). With the sequential model merged and ``retrieval.sequential.weight: null``, the
        share with the best Recall@k of those targets is chosen here and used by every later
        ``fit_retriever``. Returns the retriever and what was measured."""
        fixed = self.config.retrieval.sequential.weight
        retriever = self.fit_retriever(history, weight=fixed if fixed is not None else 0.0)
        if not isinstance(retriever, HybridRetriever):
            return retriever, {}
        k = self.config.retrieval.k
        recall = retriever.recall_by_weight(users, targets, k)
        # Ties go to the smaller weight: the base model alone unless the sequence adds.
        chosen = fixed if fixed is not None else max(recall, key=lambda w: (recall[w], -w))
        self.sequential_weight = retriever.weight = float(chosen)
        return retriever, {
            "sequential_weight": self.sequential_weight,
            "chosen_on_validation": fixed is None,
            f"valid_recall@{k}_by_weight": recall,
        }
