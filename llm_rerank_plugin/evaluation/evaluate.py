"""``llm-rerank evaluate``: every configured stage under the written protocol, with machine-readable output.

Writes ``results.json`` (per stage: metric -> value, plus the config and protocol) and ``rankings.parquet``
(``user_id``, ``item_id``, ``rank``, ``score``, ``stage`` in original ids, test users) into the config's
output folder, so anyone can recompute every metric.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from llm_rerank_plugin.config import PipelineConfig
from llm_rerank_plugin.evaluation.environment import numeric_environment
from llm_rerank_plugin.evaluation.metrics import (
    ndcg_per_user,
    paired_bootstrap,
    ranking_metrics,
    target_ranks,
)
from llm_rerank_plugin.evaluation.protocol import PROTOCOL, Protocol, output_dir
from llm_rerank_plugin.pipeline.bundle import json_default
from llm_rerank_plugin.retrieve.base import PAD_ITEM


@dataclass
class StageRanking:
    """A stage's ranked lists for the test users: (U, K) original item ids and scores."""

    item_ids: np.ndarray
    scores: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


StageRunner = Callable[[Protocol], StageRanking]


def _popularity(protocol: Protocol) -> StageRanking:
    ranked = protocol.bundle.popularity.recommend(protocol.users, k=protocol.config.retrieval.k)
    return StageRanking(ranked.item_ids, ranked.scores)


def _retrieval(protocol: Protocol) -> StageRanking:
    """The Merlin retrieval model alone (the baseline row, named after it: ``als``, ``bpr``...)."""
    candidates = protocol.bundle.candidates(protocol.users, merged=False)
    return StageRanking(candidates.item_ids, candidates.scores)


def _candidates(protocol: Protocol) -> StageRanking:
    """The lists every rerank stage reorders: retrieval merged with the sequential model when enabled."""
    candidates = protocol.bundle.candidates(protocol.users)
    return StageRanking(candidates.item_ids, candidates.scores, dict(protocol.bundle.retrieval_info))


def stage_runners() -> dict[str, StageRunner]:
    """Stage name (as in ``evaluation.stages``) -> runner. Rerank stages come from the reranker package."""
    from llm_rerank_plugin.evaluation.rerank_stages import RERANK_STAGES

    return {"popularity": _popularity, "retrieval": _retrieval, "candidates": _candidates, **RERANK_STAGES}


def output_stage_name(config: PipelineConfig, stage: str) -> str:
    """``retrieval`` is reported under the retrieval model's name (``als``, ``bpr``, ...)."""
    return config.retrieval.model if stage == "retrieval" else stage


@dataclass
class EvaluationResult:
    metrics: dict[str, dict[str, float]]
    rankings: pd.DataFrame
    seconds: dict[str, float]
    info: dict[str, dict[str, Any]]
    comparisons: dict[str, dict[str, float]] = field(default_factory=dict)
    cold: dict[str, Any] | None = None


def compare_stages(ranks: dict[str, np.ndarray], retrieval: str, seed: int) -> dict[str, dict[str, float]]:
    """Paired-bootstrap 95% CIs of the per-user NDCG@10 difference: every rerank stage against the
    candidates it reorders (and the retrieval baseline), the candidates against the baseline, and the text
    scorer against its no-text ablation (what the language model adds)."""
    bases = [b for b in ("candidates", retrieval) if b in ranks]
    pairs = [(stage, base) for stage in ranks if stage.startswith("rerank-") for base in bases]
    if "candidates" in ranks and retrieval in ranks:
        pairs.append(("candidates", retrieval))
    if "rerank-bilinear" in ranks and "rerank-notext" in ranks:
        pairs.append(("rerank-bilinear", "rerank-notext"))
    return {
        f"{a} vs {b}": paired_bootstrap(ndcg_per_user(ranks[a]), ndcg_per_user(ranks[b]), seed=seed)
        for a, b in pairs
    }


def evaluate(
    config: PipelineConfig,
    stages: list[str] | None = None,
    protocol: Protocol | None = None,
    cold: bool | None = None,
) -> EvaluationResult:
    """Run the stages on the test phase and write ``results.json`` and ``rankings.parquet``; with ``cold``
    (default: when ``evaluation.cold_items`` or ``cold_users`` is above 0) also the cold-start protocol
    (``llm_rerank_plugin.evaluation.cold``), under ``cold`` in ``results.json``."""
    stages = stages or list(config.evaluation.stages)
    runners = stage_runners()
    unknown = [s for s in stages if s not in runners]
    if unknown:
        raise ValueError(f"unknown evaluation stages {unknown}; expected some of {sorted(runners)}")
    started = time.perf_counter()
    protocol = protocol or Protocol(config, stages=stages)
    bundle = protocol.bundle
    seconds = {"fit": time.perf_counter() - started}
    metrics, info, frames, ranked = {}, {}, [], {}
    for stage in stages:
        name = output_stage_name(config, stage)
        t0 = time.perf_counter()
        ranking = runners[stage](protocol)
        seconds[name] = time.perf_counter() - t0
        metrics[name] = ranking_metrics(ranking.item_ids, protocol.target_items, config.evaluation.cutoffs)
        info[name] = ranking.info
        frames.append(_long_frame(protocol.users, ranking, name))
        ranked[name] = ranking.item_ids
    comparisons = compare_stages(
        {name: target_ranks(items, protocol.target_items) for name, items in ranked.items()},
        config.retrieval.model,
        config.seed,
    )
    e = config.evaluation
    cold_results = None
    if (e.cold_items > 0 or e.cold_users > 0) if cold is None else cold:
        from llm_rerank_plugin.evaluation.cold import run_cold_protocol

        t0 = time.perf_counter()
        cold_results = run_cold_protocol(config, protocol.data)
        seconds["cold"] = time.perf_counter() - t0
    rankings = pd.concat(frames, ignore_index=True)
    out = output_dir(config)
    rankings.to_parquet(out / "rankings.parquet", index=False)
    results = {
        "dataset": protocol.data.name,
        "source": getattr(protocol.data, "source", None),
        "summary": protocol.data.summary(),
        "bundle": str(bundle.path),
        "training": bundle.manifest["training"],
        "stages": metrics,
        "comparisons": comparisons,
        **({"cold": cold_results} if cold_results is not None else {}),
        "stage_info": info,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "protocol": PROTOCOL,
        "config": config.model_dump(mode="json"),
        "environment": numeric_environment(),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, default=json_default))
    return EvaluationResult(metrics, rankings, seconds, info, comparisons, cold_results)


def _long_frame(users: np.ndarray, ranking: StageRanking, stage: str) -> pd.DataFrame:
    valid = ranking.item_ids != PAD_ITEM
    ranks = np.broadcast_to(np.arange(1, ranking.item_ids.shape[1] + 1), ranking.item_ids.shape)
    return pd.DataFrame(
        {
            "user_id": np.broadcast_to(users[:, None], ranking.item_ids.shape)[valid],
            "item_id": ranking.item_ids[valid],
            "rank": ranks[valid].astype("int32"),
            "score": ranking.scores[valid].astype("float32"),
            "stage": stage,
        }
    )
