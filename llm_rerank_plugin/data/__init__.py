"""Data sets as frames. Add a loader by registering a function returning ``InteractionData``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llm_rerank_plugin.data.base import DataSourceError, InteractionData
from llm_rerank_plugin.data.movielens import load_movielens_100k
from llm_rerank_plugin.data.split import Split, leave_last_out

LOADERS: dict[str, Callable[..., InteractionData]] = {"ml-100k": load_movielens_100k}


def load_dataset(name: str, **options: Any) -> InteractionData:
    """Load a registered data set by name (``options`` go to its loader: path, cache_dir, ...)."""
    if name not in LOADERS:
        raise ValueError(f"unknown data set {name!r}; expected one of {sorted(LOADERS)}")
    return LOADERS[name](**options)


__all__ = [
    "LOADERS",
    "DataSourceError",
    "InteractionData",
    "Split",
    "leave_last_out",
    "load_dataset",
    "load_movielens_100k",
]
