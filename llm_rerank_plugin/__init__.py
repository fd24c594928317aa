"""An LLM (pretrained transformer) reranking stage for NVIDIA Merlin recommender pipelines.

Importing the package is cheap: heavy entry points (Merlin, torch) are exported lazily, on first access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llm_rerank_plugin.platform.operator import LLMRerank

# name -> module that defines it; imported only when the name is first used.
_LAZY_EXPORTS = {"LLMRerank": "llm_rerank_plugin.platform.operator"}

__all__ = ["LLMRerank"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY_EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this hook
    return value
