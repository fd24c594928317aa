"""The ``llm_rerank`` plugin: registered through the ``recsys.plugins`` entry point.

Implements the platform's hooks; the stage itself is :class:`LLMRerankStage`.
"""

from __future__ import annotations

import weakref
from typing import Any

from pydantic import ValidationError

from hooks import StageSpec, hookimpl
from llm_rerank_plugin.config import LLMRerankConfig, format_errors

STAGE_NAME = "llm_rerank"
# Stages built in this process, so feedback delivered through the platform hook reaches them.
_LIVE: weakref.WeakSet = weakref.WeakSet()


def build_stage(config: dict[str, Any], context: Any) -> Any:
    """Factory for the platform: ``context`` must give ``reranker`` (a trained LLMReranker) and
    ``store_path`` (the feedback SQLite file), as a dict or attributes; with ``scorer: cross`` also
    ``cross_encoder`` (a fine-tuned CrossEncoder)."""
    from llm_rerank_plugin.platform.stage import LLMRerankStage

    def get(name: str, required: bool = True) -> Any:
        value = context.get(name) if isinstance(context, dict) else getattr(context, name, None)
        if value is None and required:
            raise ValueError(
                f"the llm_rerank stage needs '{name}' in its build context; got {context!r:.200}"
            )
        return value

    stage = LLMRerankStage(
        LLMRerankConfig.model_validate(config),
        get("reranker"),
        get("store_path"),
        get("cross_encoder", required=False),
    )
    _LIVE.add(stage)
    return stage


@hookimpl
def recsys_register_stages(register) -> None:
    register(
        StageSpec(
            name=STAGE_NAME,
            factory=build_stage,
            kind="ranking",
            final=True,
            description="LLM reranker: text of users and items through a pretrained encoder, multi-aspect "
            "personalized scoring fused with the retrieval score, real-time feedback, explanations",
        )
    )


@hookimpl
def recsys_validate_stage_config(stage_name: str, config: dict) -> list[str] | None:
    if stage_name != STAGE_NAME:
        return None
    try:
        LLMRerankConfig.model_validate(config)
    except ValidationError as exc:
        return format_errors(exc, f"stages.{STAGE_NAME}")
    return []


@hookimpl
def recsys_feedback(stage_name: str, event: dict) -> Any:
    if stage_name != STAGE_NAME or not _LIVE:
        return None
    return [stage.feedback(event) for stage in list(_LIVE)]
