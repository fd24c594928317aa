"""The reranker facade: ranking contract, explanations, features from history only, save/load, new items."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest

from llm_rerank_plugin.rerank.reranker import CO_WATCH, FEATURE_NAMES, LLMReranker, UnknownItemsError, zscore

CANDIDATES = [3, 4, 6, 7, 8, 9]
SCORES = [1.0, 0.8, 0.6, 0.4, 0.2, 0.0]


def test_ranking_contract_and_explanations(tiny_reranker):
    ranking = tiny_reranker.rerank(42, CANDIDATES, SCORES, top_k=4)
    assert len(ranking.item_ids) == 4 and set(ranking.item_ids) <= set(CANDIDATES)
    assert (np.diff(ranking.scores) <= 0).all()
    assert set(ranking.aspects) <= {"overall", "title", "genres", "era"}
    assert ((ranking.aspect_shares > 0) & (ranking.aspect_shares <= 1)).all()
    # "Because you watched": the history item (1, 2 or 5) whose vector is closest to the candidate.
    items = tiny_reranker.items
    history = items.rows([1, 2, 5])
    for item, because in zip(ranking.item_ids, ranking.because, strict=True):
        sims = items.vectors[history] @ items.vectors[items.index[item]]
        assert because == items.titles[history[int(np.argmax(sims))]]
    frame = ranking.to_frame()
    assert list(frame["rank"]) == [1, 2, 3, 4]
    assert list(frame.columns) == [
        "user_id",
        "item_id",
        "rank",
        "score",
        "retrieval_score",
        "aspect",
        "aspect_share",
        "because",
    ]


def test_cold_user_has_no_because_and_bad_input_is_clear(tiny_reranker):
    ranking = tiny_reranker.rerank("new-user", CANDIDATES, SCORES, top_k=2)
    assert ranking.because == [None, None]
    with pytest.raises(UnknownItemsError, match="not in the reranker's catalogue"):
        tiny_reranker.rerank(42, [3, 999], [1.0, 0.5])
    with pytest.raises(ValueError, match="empty candidate list"):
        tiny_reranker.rerank(42, [], [])
    with pytest.raises(ValueError, match="equal length"):
        tiny_reranker.rerank(42, [3, 4], [1.0])


@pytest.mark.parametrize("bad", [float("inf"), -float("inf")])
def test_an_infinite_score_is_refused_by_the_core_too(tiny_reranker, bad):
    with pytest.raises(ValueError, match=r"must be finite.*got \[-?inf\] for items \[4\] of user 42"):
        tiny_reranker.rerank(42, [3, 4], [1.0, bad])
    no_score = tiny_reranker.rerank(42, [3, 4], [1.0, float("nan")])
    assert sorted(no_score.item_ids.tolist()) == [3, 4] and np.isfinite(no_score.scores).all()


def test_features_come_from_the_history_given(tiny_reranker):
    items = tiny_reranker.items
    history = pd.DataFrame(
        {"user_id": [1, 1, 1, 2, 2], "item_id": [1, 7, 2, 1, 7], "timestamp": [10, 20, 30, 10, 5_000_000]}
    )
    items.set_popularity(history)
    rows = items.rows([7, 2, 3])
    # 7 followed 1 twice (users 1 and 2), 2 followed 1 once (two steps later: weight CO_WATCH.decay);
    # 3 never did. Counts are divided by (1 + each successor's weighted count) ** popularity_exponent:
    # 7 also follows 2 backwards (user 1), 2 follows 7 once.
    p = CO_WATCH
    counts = np.array([2.0, p.decay, 0.0])
    popularity = np.array([2.0 + p.backward, 1.0 + p.decay, 0.0]) + 1.0
    np.testing.assert_allclose(
        items.co_watch_counts(items.rows([1]), rows), counts / popularity**p.popularity_exponent, rtol=1e-5
    )
    # Trending counts only events inside the window before "now".
    np.testing.assert_allclose(np.expm1(items.trending(rows, now=40.0)), [1, 1, 0])
    np.testing.assert_allclose(np.expm1(items.trending(rows, now=5_000_000.0)), [1, 0, 0])
    context = tiny_reranker.context(42)
    feats = tiny_reranker.features(context, rows, np.array([3.0, 2.0, 1.0]))
    assert feats.shape == (3, len(FEATURE_NAMES))


def test_history_similarity_reads_every_aspect_text(tiny_reranker):
    """A candidate that shares only one aspect's text (say the genres) with the user's recent items scores
    above ones that share none; with that aspect's vectors all alike too, no candidate stands out."""
    from dataclasses import replace

    reranker = copy.deepcopy(tiny_reranker)
    items = reranker.items
    n, aspects, dim = items.field_vectors.shape
    # Every aspect's vectors alike across items (no signal), except the genres: random, and the same for
    # the history items and one candidate.
    genre = 2  # the "genres" aspect of the default config
    fields = np.broadcast_to(
        np.random.default_rng(0).normal(size=(1, aspects, dim)), (n, aspects, dim)
    ).copy()
    fields[:, genre] = np.random.default_rng(1).normal(size=(n, dim))
    history, shared, other = items.rows([1, 2, 5]), items.index[3], items.index[4]
    fields[history, genre] = fields[shared, genre]
    fields /= np.linalg.norm(fields, axis=-1, keepdims=True)
    items.field_vectors = fields
    context = replace(reranker.context(42), history_rows=history)
    names = list(FEATURE_NAMES)
    rows = np.array([shared, other, items.index[6]])

    def similarity() -> np.ndarray:
        feats = reranker.features(context, rows, np.zeros(3, np.float32))
        return feats[:, [names.index("recent_similarity"), names.index("last_similarity")]]

    sims = similarity()
    assert (sims[0] > sims[1]).all() and (sims[0] > sims[2]).all()
    items.field_vectors[:, genre] = items.field_vectors[0, genre]
    np.testing.assert_allclose(similarity(), 0.0, atol=1e-6)


def test_zscore_handles_constants_and_padding():
    np.testing.assert_allclose(zscore(np.array([2.0, 2.0])), [0.0, 0.0])
    out = zscore(np.array([1.0, -np.inf, 3.0]))
    assert np.isfinite(out).all() and out[1] == out.min()


def test_save_load_round_trip(tiny_reranker, tmp_path):
    tiny_reranker.items.set_popularity(
        pd.DataFrame({"user_id": [1, 1], "item_id": [1, 7], "timestamp": [1, 2]})
    )
    tiny_reranker.last_seen[42] = 2.0
    before = tiny_reranker.rerank(42, CANDIDATES, SCORES, top_k=None)
    tiny_reranker.save(tmp_path / "r")
    again = LLMReranker.load(tmp_path / "r", device="cpu")
    after = again.rerank(42, CANDIDATES, SCORES, top_k=None)
    np.testing.assert_array_equal(before.item_ids, after.item_ids)
    np.testing.assert_allclose(before.scores, after.scores, rtol=1e-5, atol=1e-6)
    assert before.because == after.because and before.aspects == after.aspects


def test_a_bundle_with_other_features_fails_by_name(tiny_reranker, tmp_path):
    """A reranker saved with a different feature list (an older version's) is refused on load, naming both
    lists, rather than scored with misaligned weights."""
    import json

    from llm_rerank_plugin.rerank.scorer import MultiAspectScorer

    tiny_reranker.save(tmp_path / "renamed")
    meta_path = tmp_path / "renamed" / "reranker.json"
    meta = json.loads(meta_path.read_text())
    meta["feature_names"] = list(FEATURE_NAMES[:-1]) + ["something_else"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="something_else.*Fit it again"):
        LLMReranker.load(tmp_path / "renamed", device="cpu")

    # Before the names were saved, only the scorer's width tells: an older bundle with one feature fewer.
    older = copy.deepcopy(tiny_reranker)
    old = older.scorer
    older.scorer = MultiAspectScorer(
        old.dim, old.aspect_names, rank=old.rank, n_features=len(FEATURE_NAMES) - 1, tied_fields=True
    )
    older.save(tmp_path / "older")
    meta_path = tmp_path / "older" / "reranker.json"
    meta = json.loads(meta_path.read_text())
    del meta["feature_names"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=f"trained on {len(FEATURE_NAMES) - 1} features"):
        LLMReranker.load(tmp_path / "older", device="cpu")


def test_new_items_are_added_incrementally(tiny_reranker):
    tiny_reranker.items.set_popularity(
        pd.DataFrame({"user_id": [1, 1], "item_id": [1, 7], "timestamp": [1, 2]})
    )
    new = pd.DataFrame(
        {
            "item_id": [11, 3],
            "title": ["Blade Runner", "Toy Story"],
            "year": [1982, 1995],
            "genres": ["Sci-Fi", "Animation"],
        }
    )
    from llm_rerank_plugin.config import LLMRerankConfig

    cfg = LLMRerankConfig()
    assert tiny_reranker.add_items(new, cfg.templates.item, cfg.aspects) == 1  # 3 is known already
    ranking = tiny_reranker.rerank(42, [11, 3, 7], [0.1, 0.2, 0.3], top_k=None)
    assert 11 in ranking.item_ids
    assert tiny_reranker.items.co_watch.shape == (11, 11)


def test_observe_moves_history_and_clock(tiny_reranker):
    tiny_reranker.context(42)
    tiny_reranker.observe(42, 8, timestamp=123.0)
    assert tiny_reranker.histories[42][0] == 8 and tiny_reranker.last_seen[42] == 123.0
    assert not tiny_reranker.is_cached(42)
    assert tiny_reranker.context(42).history_rows[0] == tiny_reranker.items.index[8]


def test_history_stats_snapshot_and_restore(tiny_reranker):
    items = tiny_reranker.items
    items.set_popularity(pd.DataFrame({"user_id": [1, 1], "item_id": [1, 7], "timestamp": [10, 20]}))
    rows = items.rows([7, 2])
    saved = items.history_stats()
    before = (
        items.trending(rows, 20.0),
        items.co_watch_counts(items.rows([1]), rows),
        items.popularity.copy(),
    )
    items.set_popularity(pd.DataFrame({"user_id": [2, 2], "item_id": [1, 2], "timestamp": [5, 6]}))
    items.restore_history_stats(saved)
    after = (items.trending(rows, 20.0), items.co_watch_counts(items.rows([1]), rows), items.popularity)
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)


def test_places_kept_for_new_items_take_the_last_of_the_top():
    from llm_rerank_plugin.rerank.reranker import _keep_places

    order = np.arange(10)  # best first
    new = np.isin(order, [7, 9])
    assert _keep_places(order, new, 5, 0).tolist() == [0, 1, 2, 3, 4]
    assert _keep_places(order, new, 5, 1).tolist() == [0, 1, 2, 3, 7]
    assert _keep_places(order, new, 5, 2).tolist() == [0, 1, 2, 7, 9]
    assert _keep_places(order, new, 5, 4).tolist() == [0, 1, 2, 7, 9]  # only two new items exist
    already = np.isin(order, [2, 9])
    assert _keep_places(order, already, 5, 1).tolist() == [0, 1, 2, 3, 4]
    assert _keep_places(order, already, 5, 2).tolist() == [0, 1, 2, 3, 9]
    shuffled = np.array([4, 0, 8, 1, 9, 2, 7, 3, 5, 6])
    assert _keep_places(shuffled, np.isin(np.arange(10), [6]), 3, 1).tolist() == [4, 0, 6]


def test_a_new_item_gets_a_kept_place_in_a_served_ranking(tiny_reranker):
    # Items 1..9 have events, 10 has none: with one place kept it is in every top 3, at its own score.
    events = pd.DataFrame({"user_id": 7, "item_id": list(range(1, 10)) * 3, "timestamp": np.arange(27.0)})
    tiny_reranker.items.set_popularity(events)
    candidates = [3, 4, 6, 7, 8, 9, 10]
    scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, -5.0]  # the new item last by far on retrieval
    plain = tiny_reranker.rerank(42, candidates, scores, top_k=3)
    assert 10 not in plain.item_ids
    tiny_reranker.new_item_slots = 1
    kept = tiny_reranker.rerank(42, candidates, scores, top_k=3)
    assert kept.item_ids[:2].tolist() == plain.item_ids[:2].tolist() and kept.item_ids[2] == 10
    assert (np.diff(kept.scores) <= 0).all()
    full = tiny_reranker.rerank(42, candidates, scores, top_k=None)
    assert sorted(full.item_ids.tolist()) == sorted(candidates)
