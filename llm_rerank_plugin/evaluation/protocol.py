"""The evaluation protocol: split by time, ``fit`` the whole chain on the training part, recommend, score.

- Split: leave-last-out per user (last event = test, the rest = what the chain may learn from).
- Fit: ``llm_rerank_plugin.pipeline.fit`` on train + validation, exactly as ``llm-rerank fit`` trains on all
  logs: its own validation slice (each user's latest event, here the split's validation item) for model
  selection, its own held-out targets for the reranker; the bundle goes to ``<output_dir>/evaluation/model``.
- Recommend: the bundle ranks the test users; full ranking over the catalogue, history excluded, every user
  counted.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np

from llm_rerank_plugin.config import PipelineConfig
from llm_rerank_plugin.data import InteractionData, Split, leave_last_out, load_data
from llm_rerank_plugin.pipeline import Bundle, fit
from llm_rerank_plugin.pipeline.train import host_frame

PROTOCOL = {
    "split": "leave-last-out per user by timestamp, ties broken by original row order: last = test, "
    "second-last = validation, rest = train",
    "fit": "the whole chain (NVTabular workflow, retrieval, reranker) is fitted on train + validation by the "
    "same code as `llm-rerank fit`; model selection (early stopping, fusion weights) uses the validation "
    "events only",
    "ranking": "full ranking over the whole catalogue, no sampled negatives; items in the user's history "
    "excluded; rerank stages reorder the retrieval top-K",
    "users": "every user with >= 3 interactions counted (all 943 in ML-100k); a target missing from the "
    "ranked list scores 0",
    "metrics": "NDCG@10, Recall@10/20/50/100 (= hit rate, one target per user), MRR@10",
}


class Protocol:
    """The split of the configured data and the bundle fitted on its training part (built once)."""

    def __init__(
        self, config: PipelineConfig, data: InteractionData | None = None, stages: list[str] | None = None
    ) -> None:
        self.config = config
        self.stages = list(stages or config.evaluation.stages)
        self.data = data or load_data(config.data)
        self.split: Split = leave_last_out(host_frame(self.data.interactions))
        self.folder = config.output_path / "evaluation"

    @cached_property
    def bundle(self) -> Bundle:
        variants = ["notext"] if "rerank-notext" in self.stages else []
        return fit(
            self.config,
            data=self.data,
            history=self.split.train_and_valid,
            path=self.folder / "model",
            force=True,
            variants=variants,
        )

    @property
    def users(self) -> np.ndarray:
        return self.split.test["user_id"].to_numpy()

    @property
    def target_items(self) -> np.ndarray:
        return self.split.test["item_id"].to_numpy()


def output_dir(config: PipelineConfig) -> Path:
    path = config.output_path
    path.mkdir(parents=True, exist_ok=True)
    return path
