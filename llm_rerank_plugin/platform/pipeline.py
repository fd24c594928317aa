"""``llm-rerank run``: the whole pipeline from one platform config, through the plugin manager.

Data -> NVTabular preprocessing -> Merlin retrieval -> every enabled final ranking stage found by the
plugin manager (``llm_rerank`` from this package's entry point, or any other plugin's), applied per user
through ``run_rank`` so other plugins' before/after hooks compose. Writes ``recommendations.parquet``
(top-k per test user, with explanations) and ``run.json`` (metrics of retrieval vs. the final stage).
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from hooks import PluginError, RecsysPluginManager
from llm_rerank_plugin.config import ConfigError, PipelineConfig
from llm_rerank_plugin.evaluation.metrics import ranking_metrics
from llm_rerank_plugin.evaluation.protocol import PROTOCOL, Protocol, output_dir
from llm_rerank_plugin.evaluation.rerank_stages import set_serving_state
from llm_rerank_plugin.feedback.online import default_store_path
from llm_rerank_plugin.platform.plugin import STAGE_NAME


def plugin_manager(config: PipelineConfig, builtins: tuple = ()) -> RecsysPluginManager:
    """Plugins from the ``recsys.plugins`` entry points, filtered by ``plugins.enabled/disabled``."""
    try:
        return RecsysPluginManager(builtins, enabled=config.plugins.enabled, disabled=config.plugins.disabled)
    except PluginError as exc:
        raise ConfigError(f"plugins: {exc}") from None


def final_stage(manager: RecsysPluginManager, config: PipelineConfig) -> str | None:
    """The enabled final ranking stage named in ``stages``, if any (``llm_rerank`` by preference)."""
    available = manager.stages()
    # A stage whose plugin is disabled in the config is switched off with it, not an error.
    configured = [n for n in config.stages if n not in config.plugins.disabled]
    names = [n for n in configured if n in available and available[n].final]
    names = [n for n in names if config.stages[n].get("enabled", True)]
    unknown = [n for n in configured if n not in available]
    if unknown:
        raise ConfigError(
            f"stages: no installed plugin offers {unknown}; stages available: {sorted(available)} "
            f"(plugins loaded: {manager.plugin_names()})"
        )
    if not names:
        return None
    return STAGE_NAME if STAGE_NAME in names else names[0]


def trained_reranker(protocol: Protocol) -> Any:
    """The reranker saved by an earlier ``evaluate``/``run`` in this output folder, else train one."""
    from llm_rerank_plugin.evaluation.rerank_stages import RerankExperiment
    from llm_rerank_plugin.rerank.reranker import LLMReranker

    saved = protocol.artifacts / "reranker"
    if (saved / "scorer.pt").exists():
        return LLMReranker.load(saved, device=protocol.config.llm_rerank().device)
    experiment = RerankExperiment(protocol)
    experiment.bilinear()
    return experiment.reranker


def run_pipeline(config: PipelineConfig, builtins: tuple = (), progress: bool = True) -> dict[str, Any]:
    """Run the configured pipeline on the test phase; returns what ``run.json`` holds."""
    started = time.perf_counter()
    manager = plugin_manager(config, builtins)
    stage_name = final_stage(manager, config)
    protocol = Protocol(config)
    test = protocol.phase("test")
    out = output_dir(config)
    summary: dict[str, Any] = {
        "plugins": manager.plugin_names(),
        "final_stage": stage_name,
        "protocol": PROTOCOL,
    }
    metrics = {config.retrieval.model: ranking_metrics(test.candidates.item_ids, test.target_items)}
    if stage_name is None:
        frame = test.candidates.to_frame(like=pd.DataFrame())
        frame = frame[frame["rank"] <= config.llm_rerank().top_k]
    else:
        section = config.stages[stage_name]
        manager.validate_stage_config(stage_name, section)
        reranker = trained_reranker(protocol) if stage_name == STAGE_NAME else None
        set_serving_state(reranker, test.history, config.llm_rerank().templates.max_history)
        context = {
            "reranker": reranker,
            "store_path": default_store_path(config),
            "protocol": protocol,
            "cross_encoder": _cross_encoder(protocol) if section.get("scorer") == "cross" else None,
        }
        stage = manager.build_stage(stage_name, section, context)
        frames = []
        for user, items, scores in tqdm(
            list(_candidate_lists(test.candidates)), desc=f"{stage_name}", disable=not progress, unit="user"
        ):
            request = {"user_id": user, "item_ids": items, "scores": scores, "top_k": test.candidates.k}
            ranking = manager.run_rank(stage_name, request, stage.rank)
            frames.append(ranking.to_frame() if hasattr(ranking, "to_frame") else ranking)
        full = pd.concat(frames, ignore_index=True)
        ranked = _to_matrix(full, test.users, test.candidates.k)
        metrics[stage_name] = ranking_metrics(ranked, test.target_items)
        frame = full[full["rank"] <= config.llm_rerank().top_k]
    frame.to_parquet(out / "recommendations.parquet", index=False)
    summary.update(
        metrics=metrics,
        users=int(len(test.users)),
        rows=int(len(frame)),
        seconds=round(time.perf_counter() - started, 1),
    )
    (out / "run.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _candidate_lists(candidates):
    for user, items, scores in zip(candidates.user_ids, candidates.item_ids, candidates.scores, strict=True):
        keep = items >= 0
        yield user, items[keep], scores[keep]


def _to_matrix(frame: pd.DataFrame, users: np.ndarray, k: int) -> np.ndarray:
    out = np.full((len(users), k), -1, dtype=np.int64)
    position = {u: i for i, u in enumerate(users.tolist())}
    rows = frame["user_id"].map(position).to_numpy()
    cols = frame["rank"].to_numpy() - 1
    keep = cols < k
    out[rows[keep], cols[keep]] = frame["item_id"].to_numpy()[keep]
    return out


def _cross_encoder(protocol: Protocol) -> Any:
    """The cross-encoder that ``evaluate`` fine-tuned into this output folder."""
    from llm_rerank_plugin.rerank.cross import CrossEncoder

    saved = protocol.artifacts / "cross-encoder"
    if not saved.is_dir():
        raise ConfigError(
            f"stages.llm_rerank.scorer = 'cross' needs the fine-tuned cross-encoder at {saved}; run "
            "`llm-rerank evaluate` with the rerank-cross stage first, or use scorer: bilinear"
        )
    return CrossEncoder.load(saved, device=protocol.config.llm_rerank().device)
