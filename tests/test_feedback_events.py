import pytest
from pydantic import ValidationError

from llm_rerank_plugin.feedback import FeedbackEvent, InvalidFeedbackEvent, parse_event, parse_text_feedback


def ev(**kw):
    base = {"event_id": "e1", "user_id": "u1", "kind": "click", "item_id": "i1"}
    return {**base, **kw}


def test_valid_event_converts_int_ids_and_defaults_timestamp():
    e = parse_event(ev(user_id=42, item_id=7))
    assert (e.user_id, e.item_id) == ("42", "7")
    assert e.timestamp > 0
    assert parse_event(e) is e


def test_event_is_frozen_and_round_trips_json():
    e = parse_event(ev(kind="rating", rating=4.5))
    with pytest.raises(ValidationError):
        e.rating = 1.0
    assert FeedbackEvent.model_validate_json(e.model_dump_json()) == e


@pytest.mark.parametrize(
    "kw, fragments",
    [
        ({"item_id": None}, ["item_id", "click", "got None"]),
        ({"kind": "rating", "rating": 7}, ["rating", "0.5", "5", "MovieLens", "got 7"]),
        ({"kind": "rating", "rating": 0.0}, ["rating", "got 0.0"]),
        ({"kind": "rating"}, ["rating", "requires a rating"]),
        ({"kind": "text", "text": "   ", "item_id": None}, ["text", "non-empty"]),
        ({"kind": "purchase"}, ["kind", "'purchase'", "'click'"]),
        ({"event_id": ""}, ["event_id", "at least 1"]),
        ({"timestamp": float("nan")}, ["timestamp", "finite"]),
        ({"itemid": "x"}, ["itemid", "unknown field", "item_id"]),
    ],
)
def test_invalid_event_message_names_field_value_and_expectation(kw, fragments):
    with pytest.raises(InvalidFeedbackEvent) as info:
        parse_event(ev(**kw))
    for fragment in fragments:
        assert fragment in str(info.value)


def test_all_bad_fields_are_reported_at_once():
    with pytest.raises(InvalidFeedbackEvent) as info:
        parse_event({"user_id": "u1", "kind": "dislike"})
    msg = str(info.value)
    assert "event_id: required field is missing" in msg and "item_id" in msg


def test_invalid_event_is_a_value_error_and_non_dicts_are_rejected():
    assert issubclass(InvalidFeedbackEvent, ValueError)
    with pytest.raises(InvalidFeedbackEvent, match="dict/JSON object, got list"):
        parse_event(["e1", "u1"])


@pytest.mark.parametrize(
    "kw, sign",
    [
        ({"kind": "click"}, 1),
        ({"kind": "like"}, 1),
        ({"kind": "skip"}, -1),
        ({"kind": "dislike"}, -1),
        ({"kind": "rating", "rating": 4.0}, 1),
        ({"kind": "rating", "rating": 5.0}, 1),
        ({"kind": "rating", "rating": 3.5}, 0),
        ({"kind": "rating", "rating": 2.5}, 0),
        ({"kind": "rating", "rating": 2.0}, -1),
        ({"kind": "rating", "rating": 0.5}, -1),
        ({"kind": "text", "text": "more comedies", "item_id": None}, 0),
    ],
)
def test_polarity(kw, sign):
    e = parse_event(ev(**kw))
    assert e.polarity == sign and e.sign == sign


@pytest.mark.parametrize(
    "text, expected",
    [
        ("less horror, more 80s comedies", [(-1, "horror"), (1, "80s comedies")]),
        ("no musicals and more sci-fi please", [(-1, "musicals"), (1, "sci-fi")]),
        ("I don\u2019t want horror but more westerns!", [(-1, "horror"), (1, "westerns")]),
        ("stop showing me romance; fewer sequels", [(-1, "romance"), (-1, "sequels")]),
        ("Please, more Tarantino", [(1, "tarantino")]),
        (
            "avoid gore\nnever musicals\nwithout subtitles",
            [(-1, "gore"), (-1, "musicals"), (-1, "subtitles")],
        ),
        ("hate slow dramas, not too much violence", [(-1, "slow dramas"), (-1, "violence")]),
        ("film noir", [(1, "film noir")]),
        ("a bit less gore, a lot more heists", [(-1, "gore"), (1, "heists")]),
        ("  ", []),
        ("more, please", []),
    ],
)
def test_parse_text_feedback(text, expected):
    assert parse_text_feedback(text) == expected


def test_parse_text_feedback_rejects_non_str():
    with pytest.raises(TypeError, match="must be a str, got int"):
        parse_text_feedback(3)
