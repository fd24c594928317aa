"""``llm-rerank run``: the fitted chain served through the plugin manager, as a platform runs it.

Bundle (``llm-rerank fit``) -> Merlin retrieval candidates -> every enabled final ranking stage found by the
plugin manager (``llm_rerank`` from this package's entry point, or any other plugin's), applied per user
through ``run_rank`` so other plugins' before/after hooks compose. Writes ``recommendations.parquet``
(top-k per user, with explanations) and ``run.json``. Quality is measured by ``llm-rerank evaluate``.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from hooks import PluginError, RecsysPluginManager
from llm_rerank_plugin.config import ConfigError, PipelineConfig
from llm_rerank_plugin.feedback.online import default_store_path
from llm_rerank_plugin.pipeline import Bundle, bundle_path, rankings_frame
from llm_rerank_plugin.pipeline.bundle import RECOMMENDATION_COLUMNS
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


def stage_context(config: PipelineConfig, bundle: Bundle, stage_name: str) -> dict[str, Any]:
    """What a stage factory gets: the fitted reranker, the feedback store, and the bundle itself."""
    section = config.stages.get(stage_name, {})
    cross = None
    if section.get("scorer") == "cross":
        if bundle.cross_encoder is None:
            raise ConfigError(
                f"stages.{stage_name}.scorer = 'cross' needs a fine-tuned cross-encoder in the bundle at "
                f"{bundle.path}; set stages.llm_rerank.cross.enabled: true and run `llm-rerank fit --force`, "
                "or use scorer: bilinear"
            )
        cross = bundle.cross_encoder
    return {
        "reranker": bundle.reranker,
        "store_path": default_store_path(config),
        "bundle": bundle,
        "cross_encoder": cross,
    }


def run_pipeline(
    config: PipelineConfig,
    builtins: tuple = (),
    progress: bool = True,
    users: list[Any] | None = None,
    bundle: Bundle | None = None,
) -> dict[str, Any]:
    """Rank every user (or ``users``) of the fitted bundle through the plugin manager; returns what
    ``run.json`` holds."""
    started = time.perf_counter()
    manager = plugin_manager(config, builtins)
    stage_name = final_stage(manager, config)
    bundle = bundle or Bundle.load(bundle_path(config), config)
    users = bundle.users if users is None else users
    out = config.output_path
    out.mkdir(parents=True, exist_ok=True)
    top_k = config.llm_rerank().top_k
    summary: dict[str, Any] = {
        "plugins": manager.plugin_names(),
        "final_stage": stage_name,
        "bundle": str(bundle.path),
    }
    if stage_name is None:
        frame = rankings_frame(bundle.rank(users, top_k, method="retrieval"))
    else:
        section = config.stages[stage_name]
        manager.validate_stage_config(stage_name, section)
        stage = manager.build_stage(stage_name, section, stage_context(config, bundle, stage_name))
        frames = []
        lists = bundle.candidate_lists(users)
        for user, items, scores in tqdm(
            lists, total=len(users), desc=stage_name, disable=not progress, unit="user"
        ):
            if len(items) == 0:  # every item is in the user's history: no rows, as `recommend` does
                continue
            request = {"user_id": user, "item_ids": items, "scores": scores, "top_k": top_k}
            ranking = manager.run_rank(stage_name, request, stage.rank)
            frames.append(ranking.to_frame() if hasattr(ranking, "to_frame") else ranking)
        frame = pd.concat(frames, ignore_index=True)
        if set(RECOMMENDATION_COLUMNS) <= set(frame.columns):  # the same file as `recommend` writes
            frame = frame[[*RECOMMENDATION_COLUMNS, *(c for c in frame if c not in RECOMMENDATION_COLUMNS)]]
    frame.to_parquet(out / "recommendations.parquet", index=False)
    summary.update(
        users=int(len(users)), rows=int(len(frame)), seconds=round(time.perf_counter() - started, 1)
    )
    (out / "run.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
