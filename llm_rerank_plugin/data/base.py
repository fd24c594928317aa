"""What every data set loader returns, and the parquet cache they share.

Frames are read back through ``merlin.core.dispatch``, so they are cuDF where Merlin found a GPU and pandas
otherwise; loaders parse raw files with pandas once, at fetch time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merlin.core.dispatch import read_dispatch

INTERACTION_COLUMNS = ("user_id", "item_id", "rating", "timestamp")


class DataSourceError(RuntimeError):
    """No source could provide the data set (the message names each source tried and why it failed)."""


@dataclass
class InteractionData:
    """A data set as three frames, keyed by the data set's original ids.

    ``interactions``: ``user_id``, ``item_id``, ``rating``, ``timestamp`` (one row per event, file order).
    ``items``: ``item_id`` plus whatever text columns the data set has (``item_text_columns``).
    ``users``: ``user_id`` plus profile columns (``user_text_columns``); may be empty.
    """

    name: str
    interactions: Any
    items: Any
    users: Any
    item_text_columns: list[str] = field(default_factory=list)
    user_text_columns: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        missing = [c for c in INTERACTION_COLUMNS if c not in self.interactions.columns]
        if missing:
            raise ValueError(
                f"{self.name}: interactions lack columns {missing}; expected {list(INTERACTION_COLUMNS)}, "
                f"got {list(self.interactions.columns)}"
            )
        if "item_id" not in self.items.columns:
            raise ValueError(f"{self.name}: items need an 'item_id' column, got {list(self.items.columns)}")

    def summary(self) -> dict[str, int]:
        return {
            "users": int(self.interactions["user_id"].nunique()),
            "items": int(len(self.items)),
            "interactions": int(len(self.interactions)),
        }


def write_cache(folder: Path, interactions: Any, items: Any, users: Any, *, source: str) -> None:
    """Write the three frames as parquet plus a manifest; the manifest is written last, so a half-written
    cache is never taken for a complete one."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").unlink(missing_ok=True)
    interactions.to_parquet(folder / "interactions.parquet", index=False)
    items.to_parquet(folder / "items.parquet", index=False)
    users.to_parquet(folder / "users.parquet", index=False)
    manifest = {
        "source": source,
        "item_text_columns": [c for c in items.columns if c != "item_id"],
        "user_text_columns": [c for c in users.columns if c != "user_id"],
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))


def read_cached(folder: Path, name: str) -> InteractionData | None:
    """The cached data set, or None when there is no complete cache."""
    manifest_path = folder / "manifest.json"
    if not manifest_path.exists():
        return None
    manifest = json.loads(manifest_path.read_text())
    read_parquet = read_dispatch(fmt="parquet")
    return InteractionData(
        name=name,
        interactions=read_parquet(str(folder / "interactions.parquet")),
        items=read_parquet(str(folder / "items.parquet")),
        users=read_parquet(str(folder / "users.parquet")),
        item_text_columns=manifest["item_text_columns"],
        user_text_columns=manifest["user_text_columns"],
    )
