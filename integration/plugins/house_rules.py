"""A third-party plugin beside ours: a blocklist before ranking, an audit trail after it."""

from __future__ import annotations

import numpy as np

from hooks import hookimpl

BLOCKED = {50, 181}  # Star Wars, Return of the Jedi: say, rights expired in this market
AUDIT: list[tuple[str, object, int]] = []


@hookimpl
def recsys_before_rank(stage_name, request):
    items = np.asarray(request["item_ids"])
    keep = ~np.isin(items, list(BLOCKED))
    return {**request, "item_ids": items[keep], "scores": np.asarray(request["scores"])[keep]}


@hookimpl
def recsys_after_rank(stage_name, request, ranking):
    AUDIT.append((stage_name, request["user_id"], len(ranking.item_ids)))
    return None  # observe only
