"""Property-based tests of the request and feedback contracts (issue 12; ``platform/contract.py``).

Random candidate lists (duplicates, NaN/inf scores, unknown ids, mixed id types, empty), random ``top_k``
and user ids, and random feedback event streams go through the platform stage and the Merlin operator.
Invariants: a request either fails with one of the package's named errors (a ``RequestError``; for a
valid request, never) or gives unique ids from the candidates, ``min(top_k, distinct known candidates)``
of them (less the ones the user's feedback hid), sorted by score, each with its best retrieval score; the
operator answers the same; and after every feedback step the stored state equals a rebuild from the log,
under the canonical user key only.
"""

from __future__ import annotations

import math
import re
import sqlite3
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import event as label
from hypothesis import strategies as st
from merlin.dag import ColumnSelector

from llm_rerank_plugin.config import LLMRerankConfig
from llm_rerank_plugin.feedback import InvalidFeedbackEvent
from llm_rerank_plugin.platform.contract import (
    InvalidItemIdError,
    InvalidScoreError,
    InvalidTopKError,
    InvalidUserIdError,
    MalformedRequestError,
    NoKnownCandidatesError,
    RequestError,
)
from llm_rerank_plugin.platform.operator import LLMRerank
from llm_rerank_plugin.platform.stage import LLMRerankStage

CATALOGUE = list(range(1, 11))  # the tiny reranker's item ids
USERS = (42, 7)  # 42 is known (history [1, 2, 5]); 7 is cold
PROPERTY_SETTINGS = settings(
    max_examples=80,
    deadline=None,
    database=None,  # no .hypothesis folder in the repository
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
BAD = object()  # what the oracle below gives for an id the contract must refuse


# -------------------------------------------------------------------------------------- strategies
def mostly(common, rare, one_in: int):
    """``common``, or ``rare`` about once in ``one_in`` draws (so most requests are valid)."""
    return st.integers(0, one_in - 1).flatmap(lambda n: rare if n == 0 else common)


item_ids = mostly(
    st.one_of(
        st.sampled_from(CATALOGUE),
        st.sampled_from(CATALOGUE).map(str),
        st.sampled_from(CATALOGUE).map(float),
        st.sampled_from(CATALOGUE).map(np.int32),
        st.integers(-3, 40),  # mostly unknown ids of the right type
    ),
    st.one_of(
        st.sampled_from(["04", " 4", "4.0", "x", "", "\ud800"]),
        st.floats(allow_nan=True, allow_infinity=True),
        st.none(),
        st.booleans(),
    ),
    one_in=40,
)
scores = mostly(
    st.one_of(st.floats(-5, 5), st.integers(-10, 10), st.just(float("nan"))),
    st.one_of(st.sampled_from([float("inf"), -float("inf"), 1e39]), st.floats()),
    one_in=25,
)
top_ks = mostly(
    st.one_of(st.integers(1, 12), st.none()),
    st.one_of(st.integers(-2, 0), st.booleans(), st.floats(-1, 12), st.just("ten")),
    one_in=8,
)
user_ids = mostly(
    st.sampled_from([42, "42", 42.0, np.int64(42), 7, "7"]),
    st.sampled_from(["042", "abc", 42.5, float("nan"), True, None]),
    one_in=8,
)
candidate_lists = mostly(
    st.lists(st.tuples(item_ids, scores), min_size=1, max_size=14),
    st.one_of(
        st.just([]),
        st.lists(st.tuples(st.integers(100, 105), scores), min_size=1, max_size=4),  # none known
    ),
    one_in=10,
)


def oracle_id(value):
    """An independent statement of the id rule for an integer catalogue (platform/contract.py): an integer
    in the int64 range, given as an int, a float with no fraction or a canonical integer string."""
    if value is None or isinstance(value, bool | np.bool_):
        return BAD
    if isinstance(value, int | np.integer):
        number = int(value)
    elif isinstance(value, float):
        number = int(value) if math.isfinite(value) and value.is_integer() else BAD
    elif isinstance(value, str):
        number = int(value) if re.fullmatch(r"-?(?:0|[1-9][0-9]*)", value) else BAD
    else:
        return BAD
    return number if number is not BAD and -(2**63) <= number < 2**63 else BAD


def expected_outcome(user_id, items, values, top_k):
    """(error class, None) when the request must be refused, else (None, {item: best score})."""
    if len(items) == 0:
        return MalformedRequestError, None
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        return InvalidTopKError, None
    if oracle_id(user_id) is BAD:
        return InvalidUserIdError, None
    ids = [oracle_id(v) for v in items]
    if any(i is BAD for i in ids):
        return InvalidItemIdError, None
    with np.errstate(over="ignore"):
        if any(np.isinf(np.float32(v)) for v in values):
            return InvalidScoreError, None
    best: dict[int, float] = {}
    for i, v in zip(ids, values, strict=True):
        v = float(np.float32(v))
        best[i] = (
            v if i not in best or math.isnan(best[i]) else (best[i] if math.isnan(v) else max(best[i], v))
        )
    known = {i: v for i, v in best.items() if i in CATALOGUE}
    if not known:
        return NoKnownCandidatesError, None
    return None, known


def check_ranking(ranking, known: dict, top_k: int, hidden: set = frozenset()) -> None:
    got = ranking.item_ids.tolist()
    visible = {i: v for i, v in known.items() if i not in hidden}
    assert len(got) == len(set(got)), got
    assert set(got) <= set(visible), (got, visible)
    assert len(got) == min(top_k, len(visible))
    assert np.isfinite(ranking.scores).all()
    assert (np.diff(ranking.scores) <= 1e-6).all(), ranking.scores
    for item, retrieval in zip(got, ranking.retrieval_scores.tolist(), strict=True):
        want = visible[item]
        assert (math.isnan(want) and math.isnan(retrieval)) or retrieval == pytest.approx(want), item


# -------------------------------------------------------------------------------------- ranking
@PROPERTY_SETTINGS
@given(
    user_id=user_ids,
    candidates=candidate_lists,
    top_k=top_ks,
)
# The cases of issue 12, always run: duplicates, a string user id, NaN, mixed id types, +inf, no known item.
@example(user_id=42, candidates=[(3, 0.1), (4, 0.2), (3, 0.9), (3, float("nan"))], top_k=2)
@example(user_id="42", candidates=[(3, float("nan")), ("4", 1), (6.0, 0.5), (np.int32(7), -1.0)], top_k=None)
@example(user_id=42, candidates=[(3, 0.5), (4, float("inf"))], top_k=3)
@example(user_id=7, candidates=[(100, 0.5), (101, 0.4)], top_k=3)
@example(user_id=42, candidates=[(3, 0.5), (999, 0.4)], top_k=0)
def test_ranking_requests_on_the_stage_and_the_operator(tiny_reranker, tmp_path, user_id, candidates, top_k):
    stage = _stage(tiny_reranker, tmp_path)
    items = [c[0] for c in candidates]
    values = [c[1] for c in candidates]
    request = {"user_id": user_id, "item_ids": items, "scores": values}
    if top_k is not None:
        request["top_k"] = top_k
    error, known = expected_outcome(user_id, items, values, top_k)
    label(f"ranking: {'ok' if error is None else error.__name__}")
    if error is not None:
        with pytest.raises(error):
            stage.rank(request)
        return
    k = stage.config.top_k if top_k is None else top_k
    ranking = stage.rank(request)
    check_ranking(ranking, known, k)

    # The operator answers the same request the same way (long format, ids as they came).
    frame = pd.DataFrame(
        {
            "user_id": pd.Series([user_id] * len(items), dtype=object),
            "item_id": pd.Series(items, dtype=object),
            "score": pd.Series(values, dtype=np.float64),
        }
    )
    out = LLMRerank(reranker=tiny_reranker, top_k=k).transform(
        ColumnSelector(["user_id", "item_id", "score"]), frame
    )
    assert out["item_id"].tolist() == ranking.item_ids.tolist()
    np.testing.assert_allclose(out["score"].to_numpy(), ranking.scores, rtol=1e-5, atol=1e-6)


@PROPERTY_SETTINGS
@given(user_id=user_ids, candidates=candidate_lists)
def test_the_operator_refuses_what_the_stage_refuses(tiny_reranker, tmp_path, user_id, candidates):
    if not candidates:
        return  # an empty frame is an empty answer for the operator (no user asked anything)
    items = [c[0] for c in candidates]
    values = [c[1] for c in candidates]
    error, _ = expected_outcome(user_id, items, values, None)
    if error is None:
        return
    frame = pd.DataFrame(
        {
            "user_id": pd.Series([user_id] * len(items), dtype=object),
            "item_id": pd.Series(items, dtype=object),
            "score": pd.Series(values, dtype=np.float64),
        }
    )
    with pytest.raises(error):
        LLMRerank(reranker=tiny_reranker, top_k=5).transform(
            ColumnSelector(["user_id", "item_id", "score"]), frame
        )


# -------------------------------------------------------------------------------------- feedback
texts = st.one_of(
    st.lists(
        st.sampled_from(
            [
                "less",
                "more",
                "horror",
                "comedy",
                "war",
                ",",
                " and ",
                "\n",
                " ",
                "\ud800",
                "\x00",
                "\udfff",
                "\t",
                "\U0001f600",
                "no",
                "please",
            ]
        ),  # fmt: skip
        max_size=12,
    ).map("".join),
    st.text(max_size=30),
)
ABSENT = "absent"
timestamps = mostly(
    st.one_of(st.just(ABSENT), st.floats(0, 1e10)),
    st.one_of(st.just(-5.0), st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none()),
    one_in=8,
)


@st.composite
def events(draw, n: int):
    kind = draw(st.sampled_from(["click", "like", "rating", "skip", "dislike", "text"]))
    event = {"event_id": f"e{n}", "user_id": draw(user_ids), "kind": kind}
    if kind == "text":
        event["text"] = draw(texts)
    else:
        event["item_id"] = draw(item_ids)
    if kind == "rating":
        event["rating"] = draw(mostly(st.sampled_from([0.5, 1.0, 2.0, 3.0, 4.0, 5.0]), st.floats(-1, 7), 8))
    timestamp = draw(timestamps)
    if timestamp != ABSENT:
        event["timestamp"] = timestamp
    return event


@st.composite
def event_streams(draw):
    size = draw(st.integers(1, 8))
    return [draw(events(n)) for n in range(size)]


def clean(event) -> bool:
    """An event the contract must accept (some others are accepted too)."""
    ok_user = oracle_id(event["user_id"]) in USERS and not isinstance(event["user_id"], float)
    ok_item = event["kind"] == "text" or (
        oracle_id(event.get("item_id")) in CATALOGUE and not isinstance(event.get("item_id"), float | str)
    )
    ok_time = event.get("timestamp", 1.0) is not None and not isinstance(event.get("timestamp"), bool)
    ok_time = ok_time and 0 <= event.get("timestamp", 1.0) < 1e10
    ok_rating = event["kind"] != "rating" or 0.5 <= event["rating"] <= 5
    ok_text = event["kind"] != "text" or re.search(r"(less|more|horror|comedy|war)", event["text"] or "")
    return bool(ok_user and ok_item and ok_time and ok_rating and ok_text)


@PROPERTY_SETTINGS
@given(stream=event_streams(), candidates=st.lists(st.sampled_from(CATALOGUE), min_size=1, max_size=10))
def test_feedback_streams_keep_the_store_equal_to_its_log(tiny_reranker, tmp_path, stream, candidates):
    stage = _stage(tiny_reranker, tmp_path)
    online = stage.online
    for event in stream:
        before = _logged(stage)
        try:
            stage.feedback(event)
            label("feedback: accepted")
        except InvalidFeedbackEvent:
            label("feedback: refused")
            assert not clean(event), event
            assert _logged(stage) == before  # a refused event writes nothing
        except RequestError as exc:  # pragma: no cover - a failure message, not a branch
            raise AssertionError(
                f"feedback raised {type(exc).__name__}, expected InvalidFeedbackEvent"
            ) from exc

        # Only canonical user keys, in the store and in the reranker.
        with sqlite3.connect(stage.store_path) as db:
            keys = {row[0] for row in db.execute("SELECT DISTINCT user_id FROM feedback_events")}
        assert keys <= {str(u) for u in USERS}, keys
        assert all(type(u) is int for u in tiny_reranker.histories), list(tiny_reranker.histories)

        for user in USERS:
            state = online.state(user)
            if state is None:
                continue
            stored = online.store.get_state(str(user))
            rebuilt = online.rebuild(user)
            for got in (stored, rebuilt):
                assert (got.last_seq, got.n_events, got.n_skipped) == (
                    state.last_seq, state.n_events, state.n_skipped
                )  # fmt: skip
                for name in ("pos", "neg", "aspect_bias"):
                    np.testing.assert_allclose(getattr(got, name), getattr(state, name), rtol=1e-5, atol=1e-6)

        # The next ranking honours the contract with the feedback applied (hidden items removed).
        for user in USERS:
            ranking = stage.rank(
                {"user_id": str(user), "item_ids": candidates, "scores": [0.5] * len(candidates)}
            )
            hidden = set(online.hidden_items(user))
            check_ranking(ranking, dict.fromkeys(candidates, 0.5), stage.config.top_k, hidden)


# -------------------------------------------------------------------------------------- helpers
def _stage(reranker, tmp_path: Path) -> LLMRerankStage:
    # A fresh store per example: hypothesis runs many examples inside one test (one tmp_path).
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    return LLMRerankStage(LLMRerankConfig(top_k=5), reranker, folder / "fb.sqlite")


def _logged(stage: LLMRerankStage) -> int:
    with sqlite3.connect(stage.store_path) as db:
        return db.execute("SELECT COUNT(*) FROM feedback_events").fetchone()[0]
