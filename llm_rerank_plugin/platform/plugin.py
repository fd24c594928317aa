"""The ``llm_rerank`` plugin: registered through the ``recsys.plugins`` entry point.

Implements the platform's hooks; the stage itself is :class:`LLMRerankStage`.

Feedback routing. ``recsys_feedback(stage_name="llm_rerank", event)`` delivers each event to exactly one
stage of this process, so it is written once, to the store it belongs to:

1. An event may name its stage under the key ``"stage"``: the ``name`` the stage was built with (the
   build context's optional ``name``) or the path of its feedback store. It goes to that stage (the most
   recently built one when several with one store answer to it). No live stage by that name, or several
   on different stores, is a :class:`FeedbackRoutingError`. The key is removed before the event is
   validated.
2. An event without ``"stage"`` goes to the live stage when there is one, or when all live stages share
   one store file (it is written once; the others read it from the shared store on their next request).
   With live stages on different stores it is a :class:`FeedbackRoutingError` listing them: the sender
   must say which, since writing to all would corrupt every store but one.
3. With no live ``llm_rerank`` stage, the hook answers nothing (``None``): the event is not for us.

The hook returns the stage's acknowledgement: True if the event was new, False if its id was seen.
"""

from __future__ import annotations

import itertools
import os
import weakref
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from hooks import StageSpec, hookimpl
from llm_rerank_plugin.config import LLMRerankConfig, format_errors
from llm_rerank_plugin.platform.contract import FeedbackRoutingError

STAGE_NAME = "llm_rerank"
# Stages built in this process (build order), so feedback delivered through the platform hook reaches
# them; weak, so a stage the platform dropped is not kept alive by the plugin.
_LIVE: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_BUILT = itertools.count()


def build_stage(config: dict[str, Any], context: Any) -> Any:
    """Factory for the platform: ``context`` must give ``reranker`` (a trained LLMReranker) or ``bundle``
    (a fitted ``Bundle`` or the path of its folder, ``<output_dir>/model``), and
    ``store_path`` (the feedback SQLite file), as a dict or attributes; with ``scorer: cross`` also
    ``cross_encoder`` (a fine-tuned CrossEncoder); optionally ``name`` (the stage's name for feedback
    routing, see the module doc)."""
    from llm_rerank_plugin.platform.stage import LLMRerankStage

    def get(name: str, required: bool = True) -> Any:
        value = context.get(name) if isinstance(context, dict) else getattr(context, name, None)
        if value is None and required:
            raise ValueError(
                f"the llm_rerank stage needs '{name}' in its build context; got {context!r:.200}"
            )
        return value

    stage_config = LLMRerankConfig.model_validate(config)
    reranker = get("reranker", required=False)
    if reranker is None:
        bundle = get("bundle", required=False)
        if bundle is None:
            raise ValueError(
                "the llm_rerank stage needs 'reranker' (a trained LLMReranker) or 'bundle' (a fitted bundle "
                f"or its folder, <output_dir>/model) in its build context; got {context!r:.200}"
            )
        if isinstance(bundle, str | os.PathLike):
            from llm_rerank_plugin.platform.operator import load_reranker

            reranker = load_reranker(str(bundle), stage_config.device)
        else:
            reranker = bundle.reranker
    stage = LLMRerankStage(
        stage_config,
        reranker,
        get("store_path"),
        get("cross_encoder", required=False),
        name=get("name", required=False),
    )
    _LIVE[next(_BUILT)] = stage
    return stage


def live_stages() -> list[Any]:
    """The ``llm_rerank`` stages alive in this process, oldest first."""
    return [stage for _, stage in sorted(_LIVE.items(), key=lambda pair: pair[0])]


def route_feedback(event: Any) -> Any:
    """The live stage ``event`` goes to (module doc), or None when there is none."""
    stages = live_stages()
    if not stages:
        return None
    if isinstance(event, dict) and "stage" in event:
        target = event["stage"]
        chosen = [stage for stage in stages if stage.answers_to(target)]
        if not chosen:
            raise FeedbackRoutingError(
                f"feedback event names stage {target!r:.200}, but no live llm_rerank stage has that name or "
                f"store; live stages: {_describe(stages)}"
            )
        if len({stage.store_path for stage in chosen}) > 1:
            raise FeedbackRoutingError(
                f"feedback event names stage {target!r:.200}, which several live llm_rerank stages with "
                f"different stores answer to: {_describe(chosen)}; name a store path instead"
            )
        return chosen[-1]
    if len({stage.store_path for stage in stages}) > 1:
        raise FeedbackRoutingError(
            "feedback event names no stage, and the live llm_rerank stages use different stores: "
            f'{_describe(stages)}; add "stage": <stage name or store path> to the event'
        )
    return stages[-1]


def _describe(stages: list[Any]) -> str:
    return ", ".join(f"{stage.name!r} (store {stage.store_path})" for stage in stages)


@hookimpl
def recsys_register_stages(register: Callable[[StageSpec], None]) -> None:
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
    if stage_name != STAGE_NAME:
        return None
    stage = route_feedback(event)
    return None if stage is None else stage.feedback(event)
