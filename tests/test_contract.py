"""The request contract (issue 12): one rule for ids, candidates, top_k, timestamps and texts on the
platform stage, the Merlin operator and the feedback path (``platform/contract.py``)."""

from __future__ import annotations

import gc
import logging
import math
import sqlite3

import numpy as np
import pandas as pd
import pytest
from merlin.dag import ColumnSelector

from hooks import RecsysPluginManager
from llm_rerank_plugin.config import LLMRerankConfig
from llm_rerank_plugin.feedback import InvalidFeedbackEvent, SQLiteUserStateStore, parse_event
from llm_rerank_plugin.feedback.events import parse_text_feedback
from llm_rerank_plugin.platform import contract, plugin
from llm_rerank_plugin.platform.contract import (
    FeedbackRoutingError,
    InvalidItemIdError,
    InvalidScoreError,
    InvalidTimestampError,
    InvalidTopKError,
    InvalidUserIdError,
    MalformedRequestError,
    NoKnownCandidatesError,
    RequestError,
)
from llm_rerank_plugin.platform.operator import LLMRerank
from llm_rerank_plugin.platform.stage import LLMRerankStage, StageRequestError
from llm_rerank_plugin.rerank.text import ItemTemplate, UserTemplate

USER = 42  # the tiny reranker's one known user (history [1, 2, 5])
INPUTS = ["user_id", "item_id", "score"]
ITEMS = [3, 4, 6, 7, 8, 9]
SCORES = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]


@pytest.fixture
def stage(tiny_reranker, tmp_path):
    return LLMRerankStage(LLMRerankConfig(top_k=10), tiny_reranker, tmp_path / "fb.sqlite")


def ranked(ranking) -> list:
    return ranking.item_ids.tolist()


def operator_rows(reranker, frame: pd.DataFrame, top_k: int = 10) -> pd.DataFrame:
    return LLMRerank(reranker=reranker, top_k=top_k).transform(ColumnSelector(INPUTS), frame)


# ------------------------------------------------------------------------------- the rules themselves
@pytest.mark.parametrize(
    ("value", "kind", "expected"),
    [
        (4, "int", 4),
        (np.int32(4), "int", 4),
        ("4", "int", 4),
        ("-3", "int", -3),
        (4.0, "int", 4),
        (np.float32(7.0), "int", 7),
        (4, "str", "4"),
        ("u-7", "str", "u-7"),
        (np.str_("x"), "str", "x"),
        ("4", "any", "4"),
    ],
)
def test_ids_are_normalised_to_the_catalogue_type(value, kind, expected):
    got = contract.normalise_id(value, kind, "user_id")
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize(
    ("value", "kind", "fragment"),
    [
        (None, "int", "is not an id"),
        (True, "int", "is not an id"),
        (np.bool_(False), "str", "is not an id"),
        (float("nan"), "int", "not a finite number"),
        (float("inf"), "int", "not a finite number"),
        (2.5, "int", "is a float"),
        (4.0, "str", "is a float"),
        ("04", "int", "not a canonical integer string"),
        (" 4", "int", "not a canonical integer string"),
        ("4.0", "int", "not a canonical integer string"),
        ("1_000", "int", "not a canonical integer string"),
        ("", "str", "is empty"),
        (" u1", "str", "surrounding whitespace"),
        ("u\x001", "str", "control characters"),
        ("u\ud800", "str", "unpaired surrogates"),
        (2**70, "int", "64-bit"),
        ([1], "int", "unsupported type"),
    ],
)
def test_ids_that_cannot_be_normalised_are_refused_by_name(value, kind, fragment):
    with pytest.raises(InvalidUserIdError, match=fragment) as info:
        contract.normalise_id(value, kind, "user_id")
    assert f"have {kind} ids" in str(info.value) and "expected" in str(info.value)
    with pytest.raises(InvalidItemIdError, match="catalogue's items"):
        contract.normalise_id(value, kind, "item_id")


def test_user_id_type_follows_known_users_else_the_catalogue(tiny_reranker):
    assert contract.user_id_kind(tiny_reranker) == "int" == contract.item_id_kind(tiny_reranker)
    tiny_reranker.histories.clear()
    tiny_reranker.profiles.clear()
    assert contract.user_id_kind(tiny_reranker) == "int"  # no known user: the item id type
    tiny_reranker.set_users({"alice": [1]})
    assert contract.user_id_kind(tiny_reranker) == "str"
    assert contract.normalise_user_id(tiny_reranker, 7) == "7"


@pytest.mark.parametrize("value", [1, 10, np.int64(3), 10**9])
def test_top_k_accepts_integers_from_one(value):
    assert contract.check_top_k(value) == int(value)


@pytest.mark.parametrize("value", ["ten", "10", 2.5, 3.0, 0, -1, True, None, [3]])
def test_top_k_refuses_everything_else(value):
    with pytest.raises(InvalidTopKError, match="must be an integer >= 1"):
        contract.check_top_k(value)


def test_duplicates_merge_to_the_first_place_with_the_best_score():
    ids, scores, merged = contract.merge_duplicates(
        np.array([5, 3, 5, 7, 3, 5]), np.array([0.1, np.nan, 0.9, 0.2, 0.4, np.nan], np.float32)
    )
    assert ids.tolist() == [5, 3, 7] and merged == 3
    np.testing.assert_allclose(scores, [0.9, 0.4, 0.2])
    ids, scores, merged = contract.merge_duplicates(np.array([1, 1]), np.array([np.nan, np.nan], np.float32))
    assert ids.tolist() == [1] and math.isnan(scores[0]) and merged == 1


@pytest.mark.parametrize(
    ("scores", "error", "fragment"),
    [
        ([0.5, float("inf")], InvalidScoreError, "infinite"),
        ([0.5, -float("inf")], InvalidScoreError, "infinite"),
        ([0.5, 1e39], InvalidScoreError, "float32"),
        (["0.5", "high"], InvalidScoreError, "must be numbers"),
        ([0.5, True], InvalidScoreError, "must be numbers"),
        ([0.5], MalformedRequestError, "equal length"),
    ],
)
def test_scores_must_be_finite_numbers(scores, error, fragment):
    with pytest.raises(error, match=fragment):
        contract.check_scores(scores, np.array([1, 2]))


def test_nan_and_none_scores_mean_no_score():
    out = contract.check_scores([np.nan, None], np.array([1, 2]))
    assert out.dtype == np.float32 and np.isnan(out).all()


@pytest.mark.parametrize(
    ("value", "fragment"),
    [(-5.0, ">= 0"), (float("nan"), "finite"), (float("inf"), "finite"), (True, "a number"),
     ("soon", "a number"), (1.7e12, "milliseconds")],
)  # fmt: skip
def test_timestamps_must_be_finite_unix_seconds(value, fragment):
    with pytest.raises(InvalidTimestampError, match=fragment):
        contract.check_timestamp(value)
    assert contract.check_timestamp(0) == 0.0 and contract.check_timestamp(8.8e8) == 8.8e8


def test_sanitize_text_removes_surrogates_and_controls_and_cuts():
    assert contract.sanitize_text("a\ud800b\ud83d\ude00c") == "ab\U0001f600c"  # a split pair is joined
    assert contract.sanitize_text("a\x00b\x07c\x7fd\x9f") == "abcd"
    assert contract.sanitize_text("a\tb\r\nc\nd") == "a b c d"
    assert contract.sanitize_text("a\r\nb", keep_newlines=True) == "a\nb"
    assert contract.sanitize_text("x" * 10_000, max_chars=50) == "x" * 50
    assert contract.sanitize_text("plain text") == "plain text"


def test_every_error_is_a_request_error():
    for error in (MalformedRequestError, InvalidTopKError, InvalidUserIdError, InvalidItemIdError,
                  InvalidScoreError, InvalidTimestampError, NoKnownCandidatesError, FeedbackRoutingError,
                  InvalidFeedbackEvent):  # fmt: skip
        assert issubclass(error, RequestError) and issubclass(error, ValueError)
    assert StageRequestError is MalformedRequestError


# ------------------------------------------------------------------------------- issue 12, item 2
def test_duplicate_candidates_are_merged_on_the_stage(stage, tiny_reranker):
    items = [3, 4, 3, 6, 3, 3, 7]
    scores = [0.1, 0.5, 0.9, 0.3, 0.2, np.nan, 0.4]
    got = stage.rank({"user_id": USER, "item_ids": items, "scores": scores})
    assert sorted(ranked(got)) == [3, 4, 6, 7]
    assert dict(zip(ranked(got), got.retrieval_scores.tolist(), strict=True))[3] == pytest.approx(0.9)
    want = tiny_reranker.rerank(USER, [3, 4, 6, 7], [0.9, 0.5, 0.3, 0.4], top_k=10)
    assert ranked(got) == ranked(want)
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-5)


def test_duplicate_candidates_are_merged_on_the_operator(tiny_reranker):
    frame = pd.DataFrame(
        {"user_id": USER, "item_id": [3, 4, 3, 6, 3, 7], "score": [0.1, 0.5, 0.9, 0.3, 0.2, 0.4]}
    )
    out = operator_rows(tiny_reranker, frame)
    assert sorted(out["item_id"]) == [3, 4, 6, 7]
    want = tiny_reranker.rerank(USER, [3, 4, 6, 7], [0.9, 0.5, 0.3, 0.4], top_k=10)
    assert out["item_id"].tolist() == ranked(want)


# ------------------------------------------------------------------------------- issue 12, item 3
@pytest.mark.parametrize("top_k", ["ten", 2.5, 0, -1, True, "3"])
def test_the_stage_checks_a_requests_own_top_k(stage, top_k):
    with pytest.raises(InvalidTopKError, match="request top_k must be an integer >= 1"):
        stage.rank({"user_id": USER, "item_ids": ITEMS, "scores": SCORES, "top_k": top_k})


def test_a_valid_request_top_k_is_used(stage):
    assert (
        len(stage.rank({"user_id": USER, "item_ids": ITEMS, "scores": SCORES, "top_k": np.int64(2)}).item_ids)
        == 2
    )
    assert (
        len(stage.rank({"user_id": USER, "item_ids": ITEMS, "scores": SCORES, "top_k": None}).item_ids) == 6
    )
    assert len(stage.rank({"user_id": USER, "item_ids": ITEMS, "scores": SCORES, "top_k": 100}).item_ids) == 6


def test_the_operator_checks_top_k_the_same_way(tiny_reranker):
    for bad in ("ten", 2.5, 0, -1, True):
        with pytest.raises(InvalidTopKError):
            LLMRerank(reranker=tiny_reranker, top_k=bad)


# ------------------------------------------------------------------------------- issue 12, item 4
def test_a_string_user_id_is_the_same_integer_user(stage):
    as_int = stage.rank({"user_id": USER, "item_ids": ITEMS, "scores": SCORES})
    as_str = stage.rank({"user_id": str(USER), "item_ids": ITEMS, "scores": SCORES})
    as_float = stage.rank({"user_id": float(USER), "item_ids": ITEMS, "scores": SCORES})
    for other in (as_str, as_float):
        assert ranked(other) == ranked(as_int) and other.because == as_int.because
        np.testing.assert_allclose(other.scores, as_int.scores)
        assert other.user_id == USER and type(other.user_id) is int
    assert as_int.because[0] is not None  # the known user's history, not a cold user's


@pytest.mark.parametrize("user_id", [None, float("nan"), True, "abc", "042", 42.5, [42]])
def test_user_ids_of_the_wrong_form_are_refused(stage, user_id):
    with pytest.raises(InvalidUserIdError, match="user_id"):
        stage.rank({"user_id": user_id, "item_ids": ITEMS, "scores": SCORES})


def test_mixed_item_id_types_are_normalised(stage):
    got = stage.rank(
        {"user_id": USER, "item_ids": [3, "4", 6.0, np.int32(7)], "scores": [0.4, 0.3, 0.2, 0.1]}
    )
    want = stage.rank({"user_id": USER, "item_ids": [3, 4, 6, 7], "scores": [0.4, 0.3, 0.2, 0.1]})
    assert ranked(got) == ranked(want) and got.item_ids.dtype == np.int64
    with pytest.raises(InvalidItemIdError, match="item_id 'x'"):
        stage.rank({"user_id": USER, "item_ids": [3, "x"], "scores": [0.4, 0.3]})
    with pytest.raises(InvalidItemIdError, match="item_id 4.5"):
        stage.rank({"user_id": USER, "item_ids": [3, 4.5], "scores": [0.4, 0.3]})


def test_feedback_for_a_string_id_lands_in_the_integer_users_state(stage, tiny_reranker):
    """The issue's corruption: a request as "42", then a like for 42, made a new one-item user "42"."""
    stage.rank({"user_id": "42", "item_ids": ITEMS, "scores": SCORES})
    assert stage.feedback({"event_id": "l1", "user_id": 42, "kind": "like", "item_id": 9})
    assert stage.feedback({"event_id": "l2", "user_id": "42", "kind": "like", "item_id": "8"})
    assert "42" not in tiny_reranker.histories
    assert tiny_reranker.histories[42][:5] == [8, 9, 1, 2, 5]
    assert stage.online.state(42).n_events == 2 == stage.online.state("42").n_events
    with sqlite3.connect(stage.store_path) as db:
        assert db.execute("SELECT DISTINCT user_id FROM feedback_events").fetchall() == [("42",)]
    after = stage.rank({"user_id": 42, "item_ids": ITEMS, "scores": SCORES})
    assert after.because[0] is not None


@pytest.mark.parametrize(
    ("event", "fragment"),
    [
        ({"user_id": "042"}, "user_id '042'"),
        ({"user_id": "abc"}, "user_id 'abc'"),
        ({"item_id": "x9"}, "item_id 'x9'"),
        ({"item_id": "09"}, "item_id '09'"),
        ({"user_id": " 42"}, "surrounding whitespace"),
        ({"user_id": True}, "user_id"),
        ({"user_id": None}, "user_id"),
    ],
)
def test_feedback_ids_that_cannot_be_normalised_are_refused_before_the_log(
    stage, tiny_reranker, event, fragment
):
    history = list(tiny_reranker.histories[USER])
    with pytest.raises(InvalidFeedbackEvent, match=fragment):
        stage.feedback({"event_id": "bad", "user_id": USER, "kind": "like", "item_id": 3, **event})
    assert tiny_reranker.histories[USER] == history
    with sqlite3.connect(stage.store_path) as db:
        assert db.execute("SELECT COUNT(*) FROM feedback_events").fetchone() == (0,)


# ------------------------------------------------------------------------------- issue 12, item 5
@pytest.mark.parametrize("timestamp", [-5.0, float("inf"), float("nan"), True, 1.7e12, "later"])
def test_event_timestamps_must_be_finite_unix_seconds(stage, tiny_reranker, timestamp):
    clock = tiny_reranker.last_seen.get(USER)
    with pytest.raises(InvalidFeedbackEvent, match="timestamp"):
        stage.feedback(
            {"event_id": "t", "user_id": USER, "kind": "click", "item_id": 3, "timestamp": timestamp}
        )
    assert tiny_reranker.last_seen.get(USER) == clock
    assert stage.online.state(USER) is None


def test_an_event_logged_before_the_timestamp_rule_still_loads(tmp_path):
    path = tmp_path / "old.sqlite"
    with SQLiteUserStateStore(path) as store:
        store.append(parse_event({"event_id": "e", "user_id": "42", "kind": "click", "item_id": "3"}))
    with sqlite3.connect(path) as db:  # as an older version would have written it
        db.execute("UPDATE feedback_events SET payload = json_set(payload, '$.timestamp', -5.0)")
    with SQLiteUserStateStore(path) as store:
        assert [ev.timestamp for _, ev in store.events("42")] == [-5.0]


# ------------------------------------------------------------------------------- issue 12, item 9
def test_add_items_with_a_lone_surrogate_in_a_title(tiny_reranker):
    cfg = LLMRerankConfig()
    new = pd.DataFrame(
        [
            (11, "Bad \ud800 Title\x00", 1999, "Drama\tComedy"),
            (12, "Emoji \ud83d\ude00 Night", 2001, "Horror"),
        ],
        columns=["item_id", "title", "year", "genres"],
    )
    assert tiny_reranker.add_items(new, cfg.templates.item, cfg.aspects) == 2
    texts = tiny_reranker.items.texts[-2:]
    assert texts == [
        "Bad Title (1999). Genres: Drama Comedy.",
        "Emoji \U0001f600 Night (2001). Genres: Horror.",
    ]
    ranking = tiny_reranker.rerank(USER, [11, 12, 3], [0.3, 0.2, 0.1])
    assert sorted(ranking.item_ids.tolist()) == [3, 11, 12]


def test_templates_sanitise_and_cap_texts():
    row = {"title": "A\ud800\x07 b" + "x" * 5000, "year": 1990, "genres": "Drama"}
    text = ItemTemplate(max_chars=100).render(row)
    assert text.startswith("A b") and len(text) == 100
    user = UserTemplate(max_chars=60).render(
        {"age": 30, "gender": "F", "occupation": "writer\x00"}, ["T\udfff1"] * 20
    )
    assert len(user) <= 60 and "\x00" not in user and "\udfff" not in user


# ------------------------------------------------------------------------------- also seen: routing
def two_stages(tiny_reranker, tmp_path, same_store=False):
    gc.collect()  # stages of earlier tests must not be live any more
    pm = RecsysPluginManager(builtins=[("llm_rerank", plugin)], load_entrypoints=False)
    paths = [tmp_path / "a.sqlite", tmp_path / ("a.sqlite" if same_store else "b.sqlite")]
    stages = [
        pm.build_stage("llm_rerank", {}, {"reranker": tiny_reranker, "store_path": path, "name": name})
        for name, path in zip(["shop-a", "shop-b"], paths, strict=True)
    ]
    return pm, stages


def logged(stage) -> int:
    with sqlite3.connect(stage.store_path) as db:
        return db.execute("SELECT COUNT(*) FROM feedback_events").fetchone()[0]


def test_feedback_goes_to_the_stage_it_names(tiny_reranker, tmp_path):
    pm, (a, b) = two_stages(tiny_reranker, tmp_path)
    event = {"event_id": "e1", "user_id": USER, "kind": "dislike", "item_id": 3}
    with pytest.raises(FeedbackRoutingError, match="different stores.*'shop-a'.*'shop-b'"):
        pm.send_feedback("llm_rerank", event)
    assert (logged(a), logged(b)) == (0, 0)
    assert pm.send_feedback("llm_rerank", {**event, "stage": "shop-b"}) == [True]
    assert (logged(a), logged(b)) == (0, 1)
    assert pm.send_feedback("llm_rerank", {**event, "event_id": "e2", "stage": str(a.store_path)}) == [True]
    assert (logged(a), logged(b)) == (1, 1)
    with pytest.raises(FeedbackRoutingError, match="names stage 'shop-c'"):
        pm.send_feedback("llm_rerank", {**event, "stage": "shop-c"})
    with pytest.raises(FeedbackRoutingError, match="sent to stage 'shop-a'"):
        a.feedback({**event, "stage": "shop-b"})
    assert pm.send_feedback("other_stage", event) == []


def test_a_name_shared_by_stages_on_different_stores_is_ambiguous(tiny_reranker, tmp_path):
    gc.collect()
    pm = RecsysPluginManager(builtins=[("llm_rerank", plugin)], load_entrypoints=False)
    stages = [
        pm.build_stage("llm_rerank", {}, {"reranker": tiny_reranker, "store_path": tmp_path / f"{n}.sqlite",
                                          "name": "shop"})
        for n in "ab"
    ]  # fmt: skip
    event = {"event_id": "e1", "user_id": USER, "kind": "click", "item_id": 3}
    with pytest.raises(FeedbackRoutingError, match="several live llm_rerank stages with different stores"):
        pm.send_feedback("llm_rerank", {**event, "stage": "shop"})
    assert pm.send_feedback("llm_rerank", {**event, "stage": str(stages[0].store_path)}) == [True]
    assert [logged(s) for s in stages] == [1, 0]


def test_stages_sharing_a_store_write_an_event_once(tiny_reranker, tmp_path):
    pm, (a, b) = two_stages(tiny_reranker, tmp_path, same_store=True)
    request = {"user_id": USER, "item_ids": ITEMS, "scores": SCORES}
    a.rank(request)
    assert pm.send_feedback(
        "llm_rerank", {"event_id": "e1", "user_id": USER, "kind": "dislike", "item_id": 3}
    ) == [True]
    assert logged(a) == 1
    assert 3 not in ranked(a.rank(request)) and 3 not in ranked(b.rank(request))


# ------------------------------------------------------------------------------- also seen: long texts
def test_a_100_kb_text_feedback_costs_a_bounded_number_of_phrases(stage, tiny_reranker):
    encoded: list[str] = []
    encode = tiny_reranker.encoder.encode
    tiny_reranker.encoder.encode = lambda texts: encoded.extend(texts) or encode(texts)
    text = ", ".join(f"less horror number {i}" for i in range(5000))  # ~110 KB, 5000 phrases
    assert len(text) > 100_000
    stage.rank({"user_id": USER, "item_ids": ITEMS, "scores": SCORES})  # the user's text is encoded here
    encoded.clear()
    assert stage.feedback({"event_id": "t", "user_id": USER, "kind": "text", "text": text})
    assert 0 < len(encoded) <= contract.MAX_TEXT_PHRASES
    ((_, event),) = stage.online.store.events(str(USER))
    assert len(event.text) <= stage.config.max_text_chars


def test_text_feedback_is_sanitised_and_phrases_are_bounded():
    assert len(parse_text_feedback(", ".join(["less horror"] * 100))) == contract.MAX_TEXT_PHRASES
    assert parse_text_feedback("less horror\nmore comedy", max_phrases=1) == [(-1, "horror")]
    event = parse_event(
        {"event_id": "t", "user_id": "1", "kind": "text", "text": "less \ud800hor\x00ror\nmore war"}
    )
    assert event.text == "less horror\nmore war"
    assert parse_text_feedback(event.text) == [(-1, "horror"), (1, "war")]
    with pytest.raises(InvalidFeedbackEvent, match="non-empty text"):
        parse_event({"event_id": "t", "user_id": "1", "kind": "text", "text": "\x00\ud800"})


# ------------------------------------------------------------------------------- also seen: unknown items
def test_unknown_items_are_dropped_with_a_warning_on_both_surfaces(stage, tiny_reranker, caplog):
    items, scores = [3, 999, 4, 6, 998], [0.9, 5.0, 0.8, 0.7, 4.0]
    with caplog.at_level(logging.WARNING, logger="llm_rerank_plugin.platform.contract"):
        got = stage.rank({"user_id": USER, "item_ids": items, "scores": scores})
    assert "user 42: dropping 2 candidate ids not in the reranker's catalogue, e.g. [999, 998]" in caplog.text
    frame = pd.DataFrame({"user_id": USER, "item_id": items, "score": scores})
    assert operator_rows(tiny_reranker, frame)["item_id"].tolist() == ranked(got) and len(ranked(got)) == 3
    with pytest.raises(NoKnownCandidatesError, match=r"user 42: none of the 2 .*\[999, 998\]"):
        stage.rank({"user_id": USER, "item_ids": [999, 998], "scores": [1.0, 0.5]})
    with pytest.raises(NoKnownCandidatesError, match=r"user 42: none of the 2 .*\[999, 998\]"):
        operator_rows(tiny_reranker, frame[frame.item_id > 900])


# ------------------------------------------------------------------------------- also seen: +inf
@pytest.mark.parametrize("bad", [float("inf"), -float("inf")])
def test_infinite_scores_are_refused_on_both_surfaces(stage, tiny_reranker, bad):
    scores = [0.9, bad, 0.7]
    with pytest.raises(InvalidScoreError, match=r"infinite.*for items \[4\]"):
        stage.rank({"user_id": USER, "item_ids": [3, 4, 6], "scores": scores})
    frame = pd.DataFrame({"user_id": USER, "item_id": [3, 4, 6], "score": scores})
    with pytest.raises(InvalidScoreError, match=r"for items \[4\]"):
        operator_rows(tiny_reranker, frame)


def test_nan_scores_rank_sanely(stage, tiny_reranker):
    got = stage.rank({"user_id": USER, "item_ids": [3, 4, 6], "scores": [0.9, np.nan, 0.7]})
    assert sorted(ranked(got)) == [3, 4, 6] and np.isfinite(got.scores).all()
    assert (np.diff(got.scores) <= 0).all()
    frame = pd.DataFrame({"user_id": USER, "item_id": [3, 4, 6], "score": [0.9, np.nan, 0.7]})
    assert operator_rows(tiny_reranker, frame)["item_id"].tolist() == ranked(got)


def test_the_operator_normalises_user_ids_and_keeps_the_input_column(tiny_reranker):
    frame = pd.DataFrame({"user_id": ["42", 42, "42"], "item_id": [3, 4, 6], "score": [0.9, 0.8, 0.7]})
    frame["user_id"] = frame["user_id"].astype(object)
    out = operator_rows(tiny_reranker, frame)
    assert out["user_id"].tolist() == ["42"] * 3  # one user: the rows of "42" and 42 are merged
    want = tiny_reranker.rerank(USER, [3, 4, 6], [0.9, 0.8, 0.7])
    assert out["item_id"].tolist() == ranked(want)
    with pytest.raises(InvalidUserIdError, match="user_id None"):
        operator_rows(tiny_reranker, pd.DataFrame({"user_id": [None], "item_id": [3], "score": [0.5]}))
    with pytest.raises(InvalidUserIdError, match="user_id True"):
        operator_rows(tiny_reranker, pd.DataFrame({"user_id": [True], "item_id": [3], "score": [0.5]}))
