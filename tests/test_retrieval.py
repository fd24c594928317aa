"""Retrieval: K respected, seen items excluded, save/reload, popularity order, BPR selectable."""

from __future__ import annotations

import numpy as np
import pytest

from llm_rerank_plugin.preprocess.workflow import join_features
from llm_rerank_plugin.retrieve.base import PAD_ITEM
from llm_rerank_plugin.retrieve.retrievers import load_retriever, make_retriever


@pytest.fixture(scope="module")
def fitted(ml100k, ml100k_split, ml100k_preprocessed):
    pre, _, spec = ml100k_preprocessed
    dataset = pre.transform_dataset(join_features(ml100k_split.train, ml100k, spec))
    vocab = pre.vocabulary("user_id"), pre.vocabulary("item_id")
    return {
        name: make_retriever(name, iterations=5).fit(dataset, *vocab)
        if name != "popularity"
        else make_retriever(name).fit(dataset, *vocab)
        for name in ("als", "bpr", "popularity")
    }


@pytest.mark.parametrize("name", ["als", "bpr", "popularity"])
def test_k_respected_and_seen_items_excluded(fitted, ml100k_split, name):
    users = ml100k_split.test["user_id"].to_numpy()[:100]
    candidates = fitted[name].recommend(users, k=37)
    assert candidates.item_ids.shape == (100, 37)
    assert (candidates.item_ids != PAD_ITEM).all()
    assert (np.diff(candidates.scores, axis=1) <= 1e-6).all()
    seen = ml100k_split.train.groupby("user_id")["item_id"].apply(set)
    for user, row in zip(users, candidates.item_ids, strict=True):
        assert not set(row) & seen[user]
        assert len(set(row)) == 37


def test_k_beyond_catalogue_pads(fitted, ml100k_split):
    user = ml100k_split.test["user_id"].to_numpy()[:1]
    candidates = fitted["als"].recommend(user, k=5000)
    n_real = (candidates.item_ids != PAD_ITEM).sum()
    n_train_items = ml100k_split.train["item_id"].nunique()
    n_seen = (ml100k_split.train["user_id"] == user[0]).sum()
    assert n_real == n_train_items - n_seen
    assert np.isneginf(candidates.scores[0, n_real:]).all()


def test_popularity_is_ordered_by_count(fitted, ml100k_split):
    counts = ml100k_split.train["item_id"].value_counts()
    ranked = (
        fitted["popularity"].recommend(np.array([ml100k_split.test["user_id"].iloc[0]]), k=20).item_ids[0]
    )
    ranked_counts = counts.loc[ranked].to_numpy()
    assert (np.diff(ranked_counts) <= 0).all()


def test_save_and_reload(fitted, ml100k_split, tmp_path):
    users = ml100k_split.test["user_id"].to_numpy()[:20]
    fitted["als"].save(tmp_path / "als")
    again = load_retriever(tmp_path / "als")
    np.testing.assert_array_equal(
        again.recommend(users, k=10).item_ids, fitted["als"].recommend(users, k=10).item_ids
    )
    pairs = fitted["als"].recommend(users, k=3)
    scores = again.score(np.repeat(users, 3), pairs.item_ids.ravel())
    np.testing.assert_allclose(scores, pairs.scores.ravel(), rtol=1e-5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown retrieval algorithm 'knn'"):
        make_retriever("knn")
    with pytest.raises(RuntimeError, match="not fitted"):
        make_retriever("als").recommend([1], k=3)


def test_items_added_without_events_get_their_reserved_places(fitted, ml100k_split, tmp_path):
    import copy

    als = copy.deepcopy(fitted["als"])
    users = ml100k_split.test["user_id"].to_numpy()[:50]
    before = als.recommend(users, k=37)
    # Five new items with weak factors: on score alone they never make a top 37.
    weak = 0.01 * als.item_factors[3:].mean(axis=0, keepdims=True)
    new_ids = [90001, 90002, 90003, 90004, 90005]
    als.add_items(new_ids, np.repeat(weak, 5, axis=0) * np.arange(1, 6)[:, None])
    assert als.added_items == 5 and als.seen.shape[1] == len(als.item_map)
    np.testing.assert_array_equal(als.recommend(users, k=37).item_ids, before.item_ids)
    kept = als.recommend(users, k=37, reserved_for_added=3)
    assert (np.diff(kept.scores, axis=1) <= 1e-6).all()
    for row, old in zip(kept.item_ids, before.item_ids, strict=True):
        assert len(set(row) & set(new_ids)) == 3
        assert [i for i in row if i not in new_ids] == old[:34].tolist()
    assert all(
        len(set(r) & set(new_ids)) == 5 for r in als.recommend(users, k=37, reserved_for_added=9).item_ids
    )
    # A list longer than the rest of the catalogue still fills every place it can.
    everything = als.recommend(users[:1], k=5000, reserved_for_added=2)
    n_seen = (ml100k_split.train["user_id"] == users[0]).sum()
    assert (everything.item_ids != PAD_ITEM).sum() == ml100k_split.train["item_id"].nunique() + 5 - n_seen
    als.save(tmp_path / "als")
    again = load_retriever(tmp_path / "als")
    assert again.added_items == 5
    np.testing.assert_array_equal(again.recommend(users, k=37, reserved_for_added=3).item_ids, kept.item_ids)
    as_fitted = als.recommend(users, k=37, with_added=False).item_ids
    np.testing.assert_array_equal(as_fitted, before.item_ids)
    with pytest.raises(ValueError, match="reserved_for_added must be >= 0"):
        als.recommend(users, k=5, reserved_for_added=-1)
