"""What every data source returns, the errors it raises, and the parquet cache they share.

Frames are read back through ``merlin.core.dispatch``, so they are cuDF where Merlin found a GPU and pandas
otherwise; loaders parse and check the raw files with pandas once, when the cache for a source is written.

The cache is keyed by the source's identity (the files read, their sizes and modification times, and the
settings that shape the frames): ``<cache_dir>/<kind>/<fingerprint>/``. A changed or different source never
reads another source's cache.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merlin.core.dispatch import read_dispatch

INTERACTION_COLUMNS = ("user_id", "item_id", "rating", "timestamp")
# Part of every fingerprint: bump when the cached frames change shape, so old caches are not read.
CACHE_VERSION = 2


class DataError(Exception):
    """Base of every data error (a source that cannot be read, or data that fails a check)."""


class DataSourceError(DataError, RuntimeError):
    """A source cannot provide the data (the message names the source and why)."""


class MissingFileError(DataSourceError):
    """A path given in ``data.*`` does not exist (or a folder holds no parquet parts)."""


class DataValidationError(DataError, ValueError):
    """The data was read but fails a check; the message names the file, the column and what was expected."""


class MissingColumnError(DataValidationError):
    """A column that ``data.columns`` / ``data.item_id_column`` / ``data.user_id_column`` names is absent."""


class EmptyDataError(DataValidationError):
    """A file (or what is left of it after the checks) has no rows."""


class DuplicateIdError(DataValidationError):
    """The items (or users) file has more than one row for an id."""


class MissingIdError(DataValidationError):
    """Rows without an id (NaN / null) in an id column."""


class IdTypeError(DataValidationError):
    """Ids that are neither integers nor strings, or ids of different kinds in two files."""


class TimestampError(DataValidationError):
    """Timestamps that are neither epoch seconds nor datetimes (or are missing)."""


class UnknownItemError(DataValidationError):
    """Interactions whose item is not in the catalogue, under ``data.strict: true`` (or all of them)."""


class ConfigColumnError(DataValidationError):
    """Templates or ``preprocess`` keys name columns that the items / users frames lack."""


@dataclass
class InteractionData:
    """A data set as three frames, keyed by the data set's original ids (integers or strings, as given).

    ``interactions``: ``user_id``, ``item_id``, ``rating``, ``timestamp`` (one row per event, file order;
    timestamps are epoch seconds).
    ``items``: ``item_id`` plus whatever text columns the data set has (``item_text_columns``).
    ``users``: ``user_id`` plus profile columns (``user_text_columns``); may be empty.
    ``source``: what was actually read (see ``llm_rerank_plugin.data.load_data``): ``kind``, ``origin``,
    ``paths``, ``fingerprint``, ``rows``, ``cache``, ``cached`` and, for files, ``columns`` and
    ``dropped_interactions``. Empty for frames built in memory.
    """

    name: str
    interactions: Any
    items: Any
    users: Any
    item_text_columns: list[str] = field(default_factory=list)
    user_text_columns: list[str] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)

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


def file_identity(path: Path) -> dict[str, Any]:
    """What the cache key takes from one file: where it is, how big, when it last changed."""
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def fingerprint(kind: str, files: dict[str, list[Path]], settings: dict[str, Any] | None = None) -> str:
    """A short hash of a source's identity: its kind, every file read (path, size, mtime) and the settings
    that shape the frames (column mapping, ...)."""
    identity = {
        "version": CACHE_VERSION,
        "kind": kind,
        "files": {role: [file_identity(p) for p in paths] for role, paths in sorted(files.items())},
        "settings": settings or {},
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:20]


def write_cache(folder: Path, interactions: Any, items: Any, users: Any, *, source: dict[str, Any]) -> None:
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
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))


def read_cached(folder: Path, name: str, expected_fingerprint: str) -> InteractionData | None:
    """The cached data set, or None when there is no complete cache for exactly this source."""
    manifest_path = folder / "manifest.json"
    if not manifest_path.exists():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
        source = dict(manifest["source"])
        if source.get("fingerprint") != expected_fingerprint:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None  # an unreadable manifest is a cache miss: the source is read again
    read_parquet = read_dispatch(fmt="parquet")
    source["cached"] = True
    return InteractionData(
        name=name,
        interactions=read_parquet(str(folder / "interactions.parquet")),
        items=read_parquet(str(folder / "items.parquet")),
        users=read_parquet(str(folder / "users.parquet")),
        item_text_columns=manifest["item_text_columns"],
        user_text_columns=manifest["user_text_columns"],
        source=source,
    )


def prune_superseded(folder: Path) -> list[Path]:
    """Remove sibling caches of the same paths with another fingerprint (older versions of these files),
    so that rewriting a source does not pile up copies. Returns the folders removed."""
    try:
        mine = json.loads((folder / "manifest.json").read_text())["source"]
    except (OSError, ValueError, KeyError):
        return []
    removed = []
    for sibling in folder.parent.iterdir():
        if sibling == folder or not (sibling / "manifest.json").is_file():
            continue
        try:
            other = json.loads((sibling / "manifest.json").read_text())["source"]
        except (OSError, ValueError, KeyError):
            continue
        if other.get("paths") == mine.get("paths") and other.get("fingerprint") != mine.get("fingerprint"):
            shutil.rmtree(sibling, ignore_errors=True)
            removed.append(sibling)
    return removed


def to_pandas(frame: Any) -> Any:
    """A host (pandas) copy of a cuDF frame; pandas frames pass through."""
    return frame if not hasattr(frame, "to_pandas") else frame.to_pandas()
