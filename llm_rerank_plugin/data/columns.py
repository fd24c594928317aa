"""The columns a config names must exist in the data: checked once, before anything is fitted."""

from __future__ import annotations

from typing import Any

from llm_rerank_plugin.config import PipelineConfig
from llm_rerank_plugin.data.base import ConfigColumnError, InteractionData
from llm_rerank_plugin.rerank.text import ItemTemplate, UserTemplate


def required_columns(config: PipelineConfig) -> dict[str, list[tuple[str, str]]]:
    """``{"items": [(config key, column), ...], "users": [...]}`` for every column the config names.

    Templates count only while the ``llm_rerank`` stage is enabled (its texts are rendered only then).
    """
    items: list[tuple[str, str]] = []
    users: list[tuple[str, str]] = []
    stage = config.llm_rerank()
    if stage.enabled:
        prefix = "stages.llm_rerank"
        items += [(f"{prefix}.templates.item", f) for f in ItemTemplate(stage.templates.item).fields]
        title = ItemTemplate(stage.templates.item_title)
        items += [(f"{prefix}.templates.item_title", f) for f in title.fields]
        for aspect, template in stage.aspects.items():
            if template is not None:
                items += [(f"{prefix}.aspects.{aspect}", f) for f in ItemTemplate(template).fields]
        users += [
            (f"{prefix}.templates.user_profile", f)
            for f in UserTemplate(profile=stage.templates.user_profile).fields
        ]
    items += [("preprocess.item_features", c) for c in config.preprocess.item_features]
    items += [("preprocess.text_columns", c) for c in config.preprocess.text_columns]
    users += [("preprocess.user_features", c) for c in config.preprocess.user_features]
    return {"items": items, "users": users}


def _where(data: InteractionData, role: str) -> str:
    paths = data.source.get("paths", {}).get(role) if data.source else None
    return f"{role} ({paths[0] if len(paths) == 1 else f'{len(paths)} parts'})" if paths else role


def check_columns(data: InteractionData, config: PipelineConfig) -> None:
    """Raise ``ConfigColumnError`` listing every column that a template (item, item_title, user_profile,
    aspects) or ``preprocess.*`` key names and the items / users frames lack, with the key that named it."""
    frames: dict[str, Any] = {"items": data.items, "users": data.users}
    problems = []
    for role, wanted in required_columns(config).items():
        have = set(map(str, frames[role].columns))
        missing = [(key, col) for key, col in wanted if col not in have]
        if not missing:
            continue
        lines = [f"  {key} names {col!r}" for key, col in dict.fromkeys(missing)]
        present = sorted(have)
        hint = ""
        if role == "users" and present == ["user_id"]:
            hint = (
                " (no users file: give data.users, or set templates.user_profile: '' and "
                "preprocess.user_features: [])"
            )
        problems.append(
            f"{_where(data, role)} lack columns named in the config:\n"
            + "\n".join(lines)
            + f"\n  columns present: {present}{hint}"
        )
    if problems:
        raise ConfigColumnError(
            "the config names columns the data does not have; expected every template field and "
            "preprocess column to be a column of the items / users files:\n" + "\n".join(problems)
        )
