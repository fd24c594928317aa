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

    def join(self, interactions: Any) -> Any:
        return join_features(interactions, self.data, self.spec)

    def fit_retriever(self, history: Any, algorithm: str | None = None) -> Retriever:
        """A retriever of the configured kind (or ``algorithm``) fitted on ``history``."""
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
        return retriever.fit(
            dataset, self.preprocessor.vocabulary("user_id"), self.preprocessor.vocabulary("item_id")
        )
