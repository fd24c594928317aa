"""Never-seen catalogue items as candidates: the retriever's item factors extended with text-predicted ones.

``fit`` (``retrieval.text_items``) fits a ``TextAdapter`` from the reranker's item vectors to the
retriever's item factors on the items with at least ``min_interactions`` events of the history, then adds
every catalogue item the retriever has no factor for with the factor the adapter predicts.
``Bundle.add_items`` does the same for items added to a served bundle.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from llm_rerank_plugin.rerank.reranker import ItemTable
from llm_rerank_plugin.retrieve.retrievers import ImplicitRetriever, Retriever
from llm_rerank_plugin.retrieve.text_adapter import TextAdapter, fit_text_adapter


def factor_model(retriever: Retriever) -> ImplicitRetriever | None:
    """The matrix-factorisation model of a retriever (``.base`` of a hybrid), or None (popularity)."""
    model = getattr(retriever, "base", retriever)
    return model if isinstance(model, ImplicitRetriever) else None


def item_text_matrix(table: ItemTable, rows: np.ndarray) -> np.ndarray:
    """Each item's aspect vectors side by side (the whole text is one of them): what the adapter reads."""
    fields = table.field_vectors[np.asarray(rows)]
    return fields.reshape(len(fields), -1).astype(np.float64)


def fit_item_text_adapter(
    retriever: Retriever, table: ItemTable, history: Any, min_interactions: int, seed: int
) -> TextAdapter:
    """The ridge map text -> item factor, fitted on the items with ``>= min_interactions`` events in
    ``history`` (a host frame with ``item_id``) that the retriever has a factor for."""
    model = factor_model(retriever)
    if model is None:
        raise ValueError(
            f"the {retriever.algorithm} retriever has no item factors to map text onto; retrieval.text_items "
            "needs retrieval.model als or bpr"
        )
    counts = history["item_id"].value_counts()
    eligible = counts.index[counts.to_numpy() >= min_interactions].tolist()
    items = [i for i in eligible if i in model.item_map and i in table.index]
    if len(items) < 10:
        raise ValueError(
            f"only {len(items)} items have >= {min_interactions} events (retrieval.text_items."
            "min_interactions) to fit the text adapter on; expected >= 10, or a lower min_interactions"
        )
    items = sorted(items, key=lambda i: table.index[i])  # catalogue order: the fit does not depend on counts
    text = item_text_matrix(table, table.rows(items))
    factors = model.item_factors[model.item_map.encode(items)]
    return fit_text_adapter(text, factors, seed)


def add_text_items(retriever: Retriever, table: ItemTable, adapter: TextAdapter) -> list[Any]:
    """Give every item of ``table`` the retriever has no factor for the adapter's prediction; returns
    their ids (catalogue order)."""
    new = [i for i in table.item_ids.tolist() if i not in retriever.item_map]
    if new:
        retriever.add_items(new, adapter.predict(item_text_matrix(table, table.rows(new))))
    return new
