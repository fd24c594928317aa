"""Rerank stages for ``llm-rerank evaluate`` (filled in by the reranker)."""

from __future__ import annotations

RERANK_STAGES: dict = {}
