"""Stream replay on a small synthetic data set with the tiny reranker (a stand-in for the fitted bundle)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from llm_rerank_plugin.config import PipelineConfig
from llm_rerank_plugin.evaluation.streaming import run_stream_eval, split_streams
from llm_rerank_plugin.retrieve.base import PAD_ITEM, Candidates

N_EVENTS = 3
# user -> items in time order (the last N_EVENTS form the stream) and their ratings
SEQUENCES = {
    1: ([1, 2, 3, 4, 5, 8], [4, 5, 3, 5, 1, 4]),
    2: ([3, 6, 9, 10, 2, 7], [5, 4, 2, 5, 5, 1]),
    3: ([4, 9, 10, 1, 6, 3], [3, 4, 5, 4, 2, 5]),
    4: ([7, 2], [5, 4]),  # only one event stays before its (shorter) stream
}


def interactions() -> pd.DataFrame:
    rows = []
    for user, (items, ratings) in SEQUENCES.items():
        for t, (item, rating) in enumerate(zip(items, ratings, strict=True)):
            rows.append((user, item, float(rating), 1000 * user + t))
    return pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])


class PopularRetriever:
    """Most popular unseen items (ties by id): a stand-in for the fitted ALS retriever."""

    def __init__(self, history: pd.DataFrame) -> None:
        counts = history["item_id"].value_counts()
        self.order = sorted(range(1, 11), key=lambda i: (-counts.get(i, 0), i))
        self.seen = history.groupby("user_id")["item_id"].apply(set).to_dict()

    def recommend(self, users, k=100) -> Candidates:
        items = np.full((len(users), k), PAD_ITEM, np.int64)
        scores = np.full((len(users), k), -np.inf, np.float32)
        for row, user in enumerate(np.asarray(users).tolist()):
            unseen = [i for i in self.order if i not in self.seen.get(user, set())][:k]
            items[row, : len(unseen)] = unseen
            scores[row, : len(unseen)] = np.linspace(1.0, 0.1, len(unseen))
        return Candidates(np.asarray(users), items, scores)


class FakeBundle:
    """What run_stream_eval needs of a fitted chain: the reranker and retrieval candidates."""

    def __init__(self, reranker, history: pd.DataFrame) -> None:
        self.reranker = reranker
        self.retriever = PopularRetriever(history)

    def candidates(self, users, k=None):
        return self.retriever.recommend(users, k=k)


def make_config(tmp_path, weight=1.0) -> PipelineConfig:
    return PipelineConfig(
        output_dir=str(tmp_path / "out"),
        retrieval={"k": 10},
        evaluation={"stream_events": N_EVENTS},
        stages={"llm_rerank": {"feedback": {"weight": weight}}},
    )


def test_split_keeps_one_event_before_each_stream():
    before, stream = split_streams(interactions(), N_EVENTS)
    assert stream.groupby("user_id").size().to_dict() == {1: 3, 2: 3, 3: 3, 4: 1}
    assert before.groupby("user_id").size().to_dict() == {1: 3, 2: 3, 3: 3, 4: 1}
    assert stream[stream["user_id"] == 1]["item_id"].tolist() == [4, 5, 8]  # time order
    with pytest.raises(ValueError, match="n_events"):
        split_streams(interactions(), 0)


def test_run_stream_eval_writes_every_arm(tiny_reranker, tmp_path, monkeypatch):
    import llm_rerank_plugin.evaluation.streaming as streaming

    fitted_on: list[pd.DataFrame] = []

    def fake_fit(config, *, data, history, path, force):
        fitted_on.append(history)
        return FakeBundle(tiny_reranker, history)

    monkeypatch.setattr(streaming, "fit", fake_fit)
    history, popularity = dict(tiny_reranker.histories), tiny_reranker.items.popularity.copy()
    data = SimpleNamespace(interactions=interactions())
    result = run_stream_eval(make_config(tmp_path), data=data)

    assert json.loads((tmp_path / "out" / "stream.json").read_text()) == json.loads(json.dumps(result))
    assert (result["users"], result["n_events"]) == (4, N_EVENTS)
    assert result["environment"]["path"]["numpy_dispatch"]  # the kernels that decided the figures
    for arm in ("on", "off", "retrieval", "live", "retrieval-live"):
        row = result[arm]
        assert set(row) == {"ndcg@10", "recall@10", "mrr@10", "events"}  # scalars: one table row each
        assert row["events"] == 10
        assert 0.0 <= row["ndcg@10"] <= row["recall@10"] <= 1.0
        assert len(result["by_position"][arm]) == N_EVENTS
    # k=10 over a 10-item catalogue: every remaining candidate is in the top 10, so all arms hit always.
    assert result["retrieval"]["recall@10"] == 1.0
    off = result["off"]["ndcg@10"]
    assert result["relative_gain"] == pytest.approx(result["on"]["ndcg@10"] / off - 1)
    # No feedback before the first event: the on and off arms rank it identically.
    assert result["by_position"]["on"][0] == result["by_position"]["off"][0]
    # Paired over users (each user's mean over their stream events), not over the correlated events.
    comparisons = result["comparisons"]
    assert set(comparisons) == {
        "on vs off",
        "live vs on",
        "retrieval-live vs retrieval",
        "live vs retrieval-live",
    }
    for c in comparisons.values():
        assert c["users"] == 4 and c["ci_low"] <= c["mean_diff"] <= c["ci_high"]
    # The live replay starts from the same state and lists: its first events rank as the on arm's.
    assert result["by_position"]["live"][0] == result["by_position"]["on"][0]
    assert result["live_gain_over_on"] == pytest.approx(
        result["live"]["ndcg@10"] / result["on"]["ndcg@10"] - 1
    )
    # The chain was fitted on the pre-stream interactions only.
    (fitted,) = fitted_on
    assert len(fitted) == len(interactions()) - 10
    # The reranker is handed back as it came; the throwaway store is gone.
    assert tiny_reranker.histories == history
    np.testing.assert_array_equal(tiny_reranker.items.popularity, popularity)
    assert not list((tmp_path / "out").glob("stream-*"))


def test_feedback_changes_the_on_arm_only_after_events(tiny_reranker, tmp_path):
    """With the direct term weighted far above the base scores, the on arm's list after a positive
    event is ordered by similarity to the liked item: by construction, whatever the random model."""
    from llm_rerank_plugin.evaluation.streaming import _pre_stream_users, replay
    from llm_rerank_plugin.feedback import SQLiteUserStateStore
    from llm_rerank_plugin.feedback.online import OnlineReranker, fusion_params

    config = make_config(tmp_path, weight=1e6)
    before, stream = split_streams(interactions(), N_EVENTS)
    users = [1, 2, 3]
    stream = stream[stream["user_id"].isin(users)]
    candidates = PopularRetriever(before).recommend(users, k=10)
    feedback = config.llm_rerank().feedback
    with SQLiteUserStateStore(tmp_path / "on.sqlite") as store:
        online = OnlineReranker(tiny_reranker, store, fusion_params(feedback), feedback.weight)
        with _pre_stream_users(tiny_reranker, before, users):
            out = replay(tiny_reranker, online, candidates, stream, keep_lists=True)
        # Only the on arm records: once per stream event.
        assert sum(len(store.events(str(u))) for u in users) == len(stream) == len(out)

    first = out[out["position"] == 0]
    assert first["ranked_on"].tolist() == first["ranked_off"].tolist(), "no feedback yet: same lists"
    later = out[out["position"] > 0]
    assert any(a != b for a, b in zip(later["ranked_on"], later["ranked_off"], strict=True))
    vectors, index = tiny_reranker.items.vectors, tiny_reranker.items.index
    for user in users:
        rows = out[out["user_id"] == user].reset_index(drop=True)
        liked, rating = rows.loc[0, "item_id"], rows.loc[0, "rating"]
        if rating < 4:
            continue
        ranked = rows.loc[1, "ranked_on"]
        cos = [float(vectors[index[i]] @ vectors[index[liked]]) for i in ranked]
        assert cos == sorted(cos, reverse=True), (user, ranked, cos)
    assert out["rank_off"].between(0, 10).all() and out["rank_on"].between(0, 10).all()


def test_the_live_replay_ranks_candidates_fetched_after_each_event(tiny_reranker, tmp_path):
    from llm_rerank_plugin.evaluation.streaming import _pre_stream_users, replay_live
    from llm_rerank_plugin.feedback import SQLiteUserStateStore
    from llm_rerank_plugin.feedback.online import OnlineReranker, fusion_params

    config = make_config(tmp_path)
    before, stream = split_streams(interactions(), N_EVENTS)
    users = [1, 2, 3]
    stream = stream[stream["user_id"].isin(users)]
    candidates = PopularRetriever(before).recommend(users, k=10)
    refreshed = list(range(10, 0, -1))  # another order than the first lists: which list ranked shows
    calls = []

    def refresh(user):
        calls.append(user)
        return np.asarray(refreshed), np.linspace(1.0, 0.1, 10).astype(np.float32)

    feedback = config.llm_rerank().feedback
    with SQLiteUserStateStore(tmp_path / "live.sqlite") as store:
        online = OnlineReranker(tiny_reranker, store, fusion_params(feedback), feedback.weight)
        with _pre_stream_users(tiny_reranker, before, users):
            out = replay_live(tiny_reranker, online, candidates, refresh, stream)
        assert sum(len(store.events(str(u))) for u in users) == len(stream) == len(out)
    assert calls == stream["user_id"].tolist()  # once after every event, in order
    for row, user in enumerate(users):
        items = stream[stream["user_id"] == user]["item_id"].tolist()
        first = [i for i in candidates.item_ids[row].tolist() if i != PAD_ITEM]
        ranks = out[out["user_id"] == user]["rank_retrieval-live"].tolist()
        for n, item in enumerate(items):
            shown = first if n == 0 else [i for i in refreshed if i not in items[:n]]
            assert ranks[n] == (shown[:10].index(item) + 1 if item in shown[:10] else 0), (user, n)
    assert out["rank_live"].between(0, 10).all()


def test_unknown_arm_is_rejected(tiny_reranker):
    from llm_rerank_plugin.evaluation.streaming import replay

    with pytest.raises(ValueError, match="unknown arms"):
        replay(
            tiny_reranker,
            None,
            Candidates(np.array([1]), np.zeros((1, 1), int), np.zeros((1, 1))),
            pd.DataFrame(columns=["user_id", "item_id", "rating"]),
            arms=("sideways",),
        )
