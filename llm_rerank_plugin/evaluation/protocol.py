"""The evaluation protocol, shared by every stage: split, preprocess, retrieve, in two phases.

- ``valid`` phase: history = train split; target = each user's second-last interaction. Used for model
  selection (early stopping, fusion weights) only.
- ``test`` phase: history = train + validation (everything before the test event); target = each user's
  last interaction. Retrieval is refitted on that history; the NVTabular workflow stays the one fitted on
  the training split (ids first seen in validation fall into its out-of-vocabulary bucket).
Full ranking over the catalogue, items in the history excluded, every user counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llm_rerank_plugin.config import PipelineConfig
from llm_rerank_plugin.data import InteractionData, Split, leave_last_out, load_dataset
from llm_rerank_plugin.preprocess.workflow import FeatureSpec, Preprocessor, join_features
from llm_rerank_plugin.retrieve.base import Candidates
from llm_rerank_plugin.retrieve.retrievers import Retriever, make_retriever

PROTOCOL = {
    "split": "leave-last-out per user by timestamp, ties broken by original row order: last = test, "
    "second-last = validation, rest = train",
    "ranking": "full ranking over the whole catalogue, no sampled negatives; items in the user's history "
    "excluded; rerank stages reorder the retrieval top-K",
    "users": "every user with >= 3 interactions counted (all 943 in ML-100k); a target missing from the "
    "ranked list scores 0",
    "test_history": "train + validation; retrieval refitted on it; preprocessing fitted on train only",
    "model_selection": "validation phase only (history = train)",
    "metrics": "NDCG@10, Recall@10/20/50/100 (= hit rate, one target per user), MRR@10",
}


@dataclass
class Phase:
    """One evaluation phase: the history models may use and the held-out targets (one per user)."""

    name: str
    history: Any
    targets: Any
    retriever: Retriever
    popularity: Retriever
    candidates: Candidates

    @property
    def users(self) -> np.ndarray:
        return self.candidates.user_ids

    @property
    def target_items(self) -> np.ndarray:
        return self.targets["item_id"].to_numpy()


class Protocol:
    """Loads the data and builds both phases, given a pipeline config."""

    def __init__(self, config: PipelineConfig, data: InteractionData | None = None) -> None:
        self.config = config
        self.data = data or load_dataset(
            config.data.name,
            path=config.data.path,
            cache_dir=config.data.cache_dir,
            allow_network=config.data.allow_network,
        )
        self.split: Split = leave_last_out(self.data.interactions)
        p = config.preprocess
        self.spec = FeatureSpec(p.user_features, p.item_features, p.text_columns)
        self.artifacts = config.output_path / "artifacts"
        self.preprocessor = Preprocessor.fit(self.join(self.split.train), self.artifacts)
        self.preprocessor.save(self.artifacts / "workflow")
        self._phases: dict[str, Phase] = {}

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

    def phase(self, name: str) -> Phase:
        if name not in self._phases:
            if name == "valid":
                history, targets = self.split.train, self.split.valid
            elif name == "test":
                history, targets = self.split.train_and_valid, self.split.test
            else:
                raise ValueError(f"unknown phase {name!r}; expected 'valid' or 'test'")
            retriever = self.fit_retriever(history)
            popularity = self.fit_retriever(history, "popularity")
            users = targets["user_id"].to_numpy()
            candidates = retriever.recommend(users, k=self.config.retrieval.k)
            retriever.save(self.artifacts / f"retriever-{name}")
            self._phases[name] = Phase(name, history, targets, retriever, popularity, candidates)
        return self._phases[name]


def output_dir(config: PipelineConfig) -> Path:
    path = config.output_path
    path.mkdir(parents=True, exist_ok=True)
    return path
