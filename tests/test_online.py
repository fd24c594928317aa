"""OnlineReranker: feedback recorded through the store changes the next ranking of the tiny reranker.

The tiny reranker is untrained and its BERT random, so assertions are chosen to hold by construction:
neighbours and text matches are computed with the same encoder, and where the scorer's own response to
feedback (user vector, aspect gate) would add arbitrary noise, FusionParams switch those channels (nearly)
off so that only the direct, known-sign feedback term moves the scores.
"""

from __future__ import annotations

import numpy as np
import pytest

from llm_rerank_plugin.feedback import FusionParams, InvalidFeedbackEvent, SQLiteUserStateStore
from llm_rerank_plugin.feedback.events import parse_text_feedback
from llm_rerank_plugin.feedback.fusion import feedback_adjustment
from llm_rerank_plugin.feedback.online import OnlineReranker, fusion_params, hides_item
from llm_rerank_plugin.rerank.reranker import LLMReranker

USER = 42
# Only the direct feedback term moves scores: user vector fixed (feedback_weight=0), aspect bias ~0.
DIRECT_ONLY = FusionParams(feedback_weight=0.0, aspect_step=1e-9)


def candidates(reranker: LLMReranker, user=USER):
    """Every catalogue item not in the user's history, with descending retrieval scores."""
    history = set(reranker.histories.get(user, []))
    ids = np.array([i for i in reranker.items.item_ids.tolist() if i not in history])
    return ids, np.linspace(1.0, 0.0, len(ids)).astype(np.float32)


def scores_by_item(ranking) -> dict:
    return dict(zip(ranking.item_ids.tolist(), ranking.scores.tolist(), strict=True))


def rank_of(ranking, item) -> int:
    return ranking.item_ids.tolist().index(item)


@pytest.fixture
def store(tmp_path):
    with SQLiteUserStateStore(tmp_path / "feedback.sqlite") as s:
        yield s


@pytest.fixture
def online(tiny_reranker, store):
    return OnlineReranker(tiny_reranker, store, FusionParams())


def like(event_id, item, user=USER, kind="like", **extra):
    return {"event_id": event_id, "user_id": str(user), "kind": kind, "item_id": str(item), **extra}


def test_user_without_feedback_gets_the_plain_ranking(online, tiny_reranker):
    ids, scores = candidates(tiny_reranker)
    got = online.rerank(USER, ids, scores, top_k=None)
    want = tiny_reranker.rerank(USER, ids, scores, top_k=None)
    np.testing.assert_array_equal(got.item_ids, want.item_ids)
    np.testing.assert_allclose(got.scores, want.scores)
    assert online.state(USER) is None


def test_empty_feedback_state_scores_like_the_plain_path(online, tiny_reranker):
    """A neutral rating is logged but moves nothing: the live path must then equal the plain path."""
    ids, scores = candidates(tiny_reranker)
    want = tiny_reranker.rerank(USER, ids, scores, top_k=None)
    assert online.record(like("neutral", 3, kind="rating", rating=3.0))
    assert online.state(USER).n_events == 1
    got = online.rerank(USER, ids, scores, top_k=None)
    np.testing.assert_array_equal(got.item_ids, want.item_ids)
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-5, atol=1e-6)
    assert got.because == want.because and got.aspects == want.aspects


def test_like_moves_history_and_explanations_without_reencoding(online, tiny_reranker):
    ids, scores = candidates(tiny_reranker)
    liked = int(ids[0])
    encoded = []
    encode = tiny_reranker.encoder.encode
    tiny_reranker.encoder.encode = lambda texts: encoded.append(list(texts)) or encode(texts)
    online.rerank(USER, ids, scores)  # warm: the user's context is cached from here on
    encoded.clear()
    online.record(like("l1", liked))
    assert tiny_reranker.histories[USER][0] == liked
    rest = ids[ids != liked]
    got = online.rerank(USER, rest, scores[: len(rest)], top_k=None)
    assert encoded == [], "feedback must not cost an encoder pass (the text vector is pinned)"
    # Explanations follow the moved history: equal to a fresh context built from it (because() depends
    # only on the history rows), although the plain path re-encodes the text and so scores differently.
    fresh = tiny_reranker.contexts([USER])[0]
    want_because = dict(
        zip(rest.tolist(), tiny_reranker.because(fresh, tiny_reranker.items.rows(rest)), strict=True)
    )
    assert dict(zip(got.item_ids.tolist(), got.because, strict=True)) == want_because
    assert tiny_reranker.items.titles[tiny_reranker.items.index[liked]] in got.because


def test_dislike_removes_the_item_and_pushes_its_nearest_neighbour_down(tiny_reranker, store):
    online = OnlineReranker(tiny_reranker, store, DIRECT_ONLY)
    ids, scores = candidates(tiny_reranker)
    before = online.rerank(USER, ids, scores, top_k=None)
    disliked = int(before.item_ids[0])
    vectors = tiny_reranker.items.vectors
    others = [i for i in ids.tolist() if i != disliked]
    cos = [
        float(vectors[tiny_reranker.items.index[i]] @ vectors[tiny_reranker.items.index[disliked]])
        for i in others
    ]
    neighbour = others[int(np.argmax(cos))]

    # Features are z-scored within the list, so compare with the same list minus the disliked item.
    keep = ids != disliked
    before = online.rerank(USER, ids[keep], scores[keep], top_k=None)
    online.record(like("d1", disliked, kind="dislike"))
    after = online.rerank(USER, ids, scores, top_k=None)
    assert disliked not in after.item_ids.tolist()
    assert len(after.item_ids) == len(ids) - 1
    assert online.hidden_items(USER) == [disliked]
    # The direct term lowers every score by its cosine with the disliked item: the neighbour most.
    drop = {i: s - scores_by_item(before)[i] for i, s in scores_by_item(after).items()}
    assert min(drop, key=drop.get) == neighbour
    assert rank_of(after, neighbour) >= rank_of(before, neighbour)

    # Weighted enough to beat the base score spread, the neighbour sinks to the bottom.
    online.feedback_weight = 0.0
    base = scores_by_item(online.rerank(USER, ids, scores, top_k=None))
    adj = dict(
        zip(
            ids.tolist(),
            feedback_adjustment(vectors[tiny_reranker.items.rows(ids)], online.state(USER)).tolist(),
            strict=True,
        )
    )
    need = max((base[neighbour] - base[j]) / (adj[j] - adj[neighbour]) for j in others if j != neighbour)
    online.feedback_weight = 2.0 * max(need, 0.0) + 1.0
    assert online.rerank(USER, ids, scores, top_k=None).item_ids[-1] == neighbour


def test_text_request_lifts_the_item_closest_to_it(tiny_reranker, store):
    online = OnlineReranker(tiny_reranker, store, DIRECT_ONLY)
    ids, scores = candidates(tiny_reranker)
    request = "more horror"
    ((sign, phrase),) = parse_text_feedback(request)
    assert (sign, phrase) == (1, "horror")
    direction = tiny_reranker.encoder.encode([phrase])[0]  # what the resolver builds, same encoder
    rows = tiny_reranker.items.rows(ids)
    target = int(ids[np.argmax(tiny_reranker.items.vectors[rows] @ direction)])
    before = online.rerank(USER, ids, scores, top_k=None)
    online.record({"event_id": "t1", "user_id": str(USER), "kind": "text", "text": request})
    after = online.rerank(USER, ids, scores, top_k=None)
    gain = {i: s - scores_by_item(before)[i] for i, s in scores_by_item(after).items()}
    assert max(gain, key=gain.get) == target
    assert rank_of(after, target) <= rank_of(before, target)
    # Heavily weighted, the request decides the top.
    online.feedback_weight = 1e4
    assert online.rerank(USER, ids, scores, top_k=3).item_ids[0] == target


def test_duplicate_event_ids_are_applied_once(online, store):
    assert online.record(like("dup", 3)) is True
    state = online.state(USER)
    assert online.record(like("dup", 3)) is False
    assert online.record(like("dup", 4)) is False  # the id, not the payload, is the key
    again = online.state(USER)
    assert again.n_events == state.n_events == 1
    np.testing.assert_array_equal(again.pos, state.pos)
    assert len(store.events(str(USER))) == 1


@pytest.mark.parametrize(
    "bad",
    [
        {"event_id": "b1", "user_id": "42", "kind": "like"},  # no item
        {"event_id": "b2", "user_id": "42", "kind": "rating", "item_id": "3", "rating": 9},
        {"event_id": "b3", "user_id": "42", "kind": "text", "text": ""},
        {"event_id": "b4", "user_id": "42", "kind": "like", "item_id": "3", "colour": "red"},
        {"event_id": "b5", "user_id": "42", "kind": "teleport", "item_id": "3"},
        ["not", "a", "dict"],
    ],
)
def test_malformed_events_are_rejected_and_change_nothing(online, tiny_reranker, store, bad):
    ids, scores = candidates(tiny_reranker)
    online.record(like("ok", int(ids[-1])))
    history = list(tiny_reranker.histories[USER])
    state = online.state(USER)
    before = online.rerank(USER, ids, scores, top_k=None)
    with pytest.raises(InvalidFeedbackEvent):
        online.record(bad)
    assert len(store.events(str(USER))) == 1
    assert tiny_reranker.histories[USER] == history
    assert online.state(USER).last_seq == state.last_seq
    after = online.rerank(USER, ids, scores, top_k=None)
    np.testing.assert_array_equal(after.item_ids, before.item_ids)
    np.testing.assert_array_equal(after.scores, before.scores)


def mixed_events(ids):
    a, b, c, d = (str(int(i)) for i in ids[:4])
    return [
        like("e1", a),
        like("e2", b, kind="dislike"),
        {"event_id": "e3", "user_id": str(USER), "kind": "text", "text": "less horror, more comedy"},
        like("e4", c, kind="rating", rating=5.0),
        like("e5", d, kind="skip"),
        like("e6", c, kind="rating", rating=1.0),
        like("e7", "999"),  # not in the catalogue: logged, skipped
    ]


def test_rebuild_from_the_log_equals_the_incremental_state(online, tiny_reranker):
    ids, _ = candidates(tiny_reranker)
    assert online.record_many(mixed_events(ids)) == 7
    incremental = online.state(USER)
    assert (incremental.n_events, incremental.n_skipped, incremental.last_seq) == (6, 1, 7)
    rebuilt = online.rebuild(USER)
    np.testing.assert_array_equal(rebuilt.pos, incremental.pos)
    np.testing.assert_array_equal(rebuilt.neg, incremental.neg)
    np.testing.assert_array_equal(rebuilt.aspect_bias, incremental.aspect_bias)
    assert (rebuilt.last_seq, rebuilt.n_events, rebuilt.n_skipped) == (7, 6, 1)
    assert np.abs(rebuilt.aspect_bias).sum() > 0  # the aspect channel did take part
    # b was disliked; c was rated 5 then 1 (hidden); the skipped d stays listed.
    assert online.hidden_items(USER) == sorted([int(ids[1]), int(ids[2])])


def test_state_survives_a_new_online_reranker_over_the_same_file(tiny_reranker, tmp_path):
    saved = tiny_reranker.save(tmp_path / "reranker")  # "the process" starts from these artifacts
    ids, scores = candidates(tiny_reranker)
    db = tmp_path / "feedback.sqlite"
    with SQLiteUserStateStore(db) as store:
        first = OnlineReranker(tiny_reranker, store, FusionParams())
        first.record_many(mixed_events(ids))
        want_state = first.state(USER)
        want = first.rerank(USER, ids, scores, top_k=None)

    restarted = LLMReranker.load(saved, encoder=tiny_reranker.encoder)
    with SQLiteUserStateStore(db) as store:
        second = OnlineReranker(restarted, store, FusionParams())
        got_state = second.state(USER)
        np.testing.assert_array_equal(got_state.pos, want_state.pos)
        np.testing.assert_array_equal(got_state.aspect_bias, want_state.aspect_bias)
        assert got_state.last_seq == want_state.last_seq
        # The liked items were replayed into the fresh history, so the whole ranking is the same.
        assert restarted.histories[USER][:2] == tiny_reranker.histories[USER][:2]
        got = second.rerank(USER, ids, scores, top_k=None)
        np.testing.assert_array_equal(got.item_ids, want.item_ids)
        np.testing.assert_allclose(got.scores, want.scores, rtol=1e-5, atol=1e-6)
        assert got.because == want.because


def test_events_logged_by_another_process_count_on_the_next_request(online, tiny_reranker, tmp_path):
    ids, scores = candidates(tiny_reranker)
    online.rerank(USER, ids, scores)
    with SQLiteUserStateStore(online.store.path) as other:  # another worker's connection
        other.append(like("elsewhere", int(ids[0]), kind="dislike"))
    assert int(ids[0]) not in online.rerank(USER, ids, scores, top_k=None).item_ids.tolist()


def test_without_watching_the_store_only_own_events_count(tiny_reranker, store):
    online = OnlineReranker(tiny_reranker, store, FusionParams(), watch_store=False)
    ids, scores = candidates(tiny_reranker)
    online.rerank(USER, ids, scores)
    store.append(like("elsewhere", int(ids[0]), kind="dislike"))
    assert int(ids[0]) in online.rerank(USER, ids, scores, top_k=None).item_ids.tolist()
    online.record(like("own", int(ids[1]), kind="dislike"))  # catches up with the log, other's event too
    left = online.rerank(USER, ids, scores, top_k=None).item_ids.tolist()
    assert int(ids[0]) not in left and int(ids[1]) not in left


def test_a_like_unhides_and_all_rejected_gives_an_empty_ranking(online, tiny_reranker):
    ids, scores = candidates(tiny_reranker)
    pair, pair_scores = ids[:2], scores[:2]
    online.record(like("x1", int(pair[0]), kind="dislike"))
    online.record(like("x2", int(pair[1]), kind="rating", rating=1.5))
    empty = online.rerank(USER, pair, pair_scores)
    assert len(empty.item_ids) == 0 and empty.to_frame().empty
    online.record(like("x3", int(pair[0])))
    assert online.rerank(USER, pair, pair_scores).item_ids.tolist() == [int(pair[0])]


def test_state_snapshot_can_be_deferred_and_flushed(tiny_reranker, store):
    online = OnlineReranker(tiny_reranker, store, FusionParams(), persist_state=False)
    online.record(like("f1", 3))
    assert store.get_state(str(USER)) is None
    assert online.flush() == 1
    assert store.get_state(str(USER)).last_seq == online.state(USER).last_seq


def test_a_new_user_with_int_ids_gets_an_int_history_key(online, tiny_reranker):
    online.record(like("n1", 3, user=7))
    assert tiny_reranker.histories[7] == [3]
    ranking = online.rerank(7, np.array([3, 4, 6]), np.array([0.3, 0.2, 0.1]))
    assert len(ranking.item_ids) == 3


def test_helpers(tmp_path):
    from llm_rerank_plugin.config import FeedbackConfig
    from llm_rerank_plugin.feedback import parse_event

    params = fusion_params(FeedbackConfig(step_positive=0.2, decay=0.5, weight=3.0))
    assert (params.step_positive, params.decay) == (0.2, 0.5)
    base = {"event_id": "h", "user_id": "1", "item_id": "2"}
    assert hides_item(parse_event({**base, "kind": "dislike"}))
    assert hides_item(parse_event({**base, "kind": "rating", "rating": 2.0}))
    assert not hides_item(parse_event({**base, "kind": "skip"}))
    assert not hides_item(parse_event({**base, "kind": "rating", "rating": 3.0}))


def test_bad_arguments_are_named(tiny_reranker, store):
    with pytest.raises(ValueError, match="feedback_weight"):
        OnlineReranker(tiny_reranker, store, FusionParams(), feedback_weight=-1)
    online = OnlineReranker(tiny_reranker, store, FusionParams())
    online.record(like("a", 3))
    with pytest.raises(ValueError, match="equal length"):
        online.rerank(USER, np.array([3, 4]), np.array([1.0]))
