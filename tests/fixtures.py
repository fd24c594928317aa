"""Fixtures on the real MovieLens-100k, loaded once per session (fetched into the user cache once)."""

from __future__ import annotations

import pytest

from llm_rerank_plugin.data import InteractionData, leave_last_out, load_dataset


@pytest.fixture(scope="session")
def ml100k() -> InteractionData:
    return load_dataset("ml-100k")


@pytest.fixture(scope="session")
def ml100k_split(ml100k):
    return leave_last_out(ml100k.interactions)


@pytest.fixture(scope="session")
def ml100k_preprocessed(ml100k, ml100k_split, tmp_path_factory):
    """(preprocessor fitted on train, its work folder, the feature spec)."""
    from llm_rerank_plugin.preprocess.workflow import FeatureSpec, Preprocessor, join_features

    spec = FeatureSpec()
    work = tmp_path_factory.mktemp("workflow")
    pre = Preprocessor.fit(join_features(ml100k_split.train, ml100k, spec), work)
    return pre, work, spec


TINY_ITEMS = [
    (1, "Star Wars", 1977, "Action, Adventure, Sci-Fi"),
    (2, "Alien", 1979, "Horror, Sci-Fi"),
    (3, "Toy Story", 1995, "Animation, Children's, Comedy"),
    (4, "Fargo", 1996, "Crime, Drama, Thriller"),
    (5, "The Shining", 1980, "Horror"),
    (6, "Airplane", 1980, "Comedy"),
    (7, "Space Opera Returns", 1983, "Action, Sci-Fi"),
    (8, "Night of the Living Dead", 1968, "Horror"),
    (9, "Love Story", 1970, "Romance, Drama"),
    (10, "Red King", 1990, "War, Drama"),
]


@pytest.fixture
def tiny_items():
    import pandas as pd

    return pd.DataFrame(TINY_ITEMS, columns=["item_id", "title", "year", "genres"])


@pytest.fixture
def tiny_reranker(tiny_bert_dir, tiny_items):
    """An untrained LLMReranker over 10 movies with a tiny random BERT (no download, fast)."""
    from llm_rerank_plugin.config import LLMRerankConfig
    from llm_rerank_plugin.rerank.encoder import TextEncoder
    from llm_rerank_plugin.rerank.reranker import FEATURE_NAMES, ItemTable, LLMReranker
    from llm_rerank_plugin.rerank.scorer import MultiAspectScorer
    from llm_rerank_plugin.rerank.text import UserTemplate

    cfg = LLMRerankConfig()
    encoder = TextEncoder(str(tiny_bert_dir), device="cpu", show_progress=False)
    items = ItemTable.build(tiny_items, encoder, cfg.templates.item, cfg.aspects)
    scorer = MultiAspectScorer(
        encoder.dim,
        list(cfg.aspects),
        rank=8,
        n_features=len(FEATURE_NAMES),
        tied_fields=True,
        gate_hidden=16,
    )
    reranker = LLMReranker(encoder, scorer, items, UserTemplate())
    reranker.set_users({42: [1, 2, 5]}, {42: {"age": 30, "gender": "F", "occupation": "writer"}})
    return reranker


@pytest.fixture(scope="module")
def single_torch_thread():
    """Tiny matmuls gain nothing from threads, and on a shared 2-core box torch's thread pool oversubscribes
    the CPU and slows such tests several-fold; the setting is restored for the other modules."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def encode_afresh():
    """Each test runs its encoders: vectors another test (or encoder) encoded are not reused from the
    process's memory of encoded texts."""
    from llm_rerank_plugin.rerank.encoder import forget_recent_vectors

    forget_recent_vectors()


def unit_rows(x):
    """Rows scaled to unit L2 norm, float32."""
    import numpy as np

    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)
