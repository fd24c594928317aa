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
