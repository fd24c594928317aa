from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from llm_rerank_plugin.rerank.text import (
    HistoryIndex,
    ItemTemplate,
    MissingFieldError,
    UserTemplate,
    field_texts,
    recent_history,
)


@pytest.fixture
def items() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "item_id": [1, 2, 3, 4],
            "title": ["Toy Story", "Star Wars: Episode IV", "Fargo", "Nameless"],
            "year": pd.array([1995, 1977, None, None], dtype="Int64"),
            "genres": ["Animation, Children's, Comedy", "Action, Sci-Fi", "Crime, Drama", None],
        }
    )


def test_item_template_renders_rows(items: pd.DataFrame) -> None:
    texts = ItemTemplate().render_frame(items)
    assert texts[0] == "Toy Story (1995). Genres: Animation, Children's, Comedy."
    assert texts[1] == "Star Wars: Episode IV (1977). Genres: Action, Sci-Fi."


def test_item_template_missing_values_leave_no_artifacts(items: pd.DataFrame) -> None:
    texts = ItemTemplate().render_frame(items)
    assert texts[2] == "Fargo. Genres: Crime, Drama."
    assert texts[3] == "Nameless."
    for t in texts:
        assert "()" not in t and "  " not in t and ". ." not in t and not t.endswith(": .")


def test_item_template_float_year_and_nan() -> None:
    # a year column read as float because of NaNs must still read "1977"
    tpl = ItemTemplate()
    assert tpl.render({"title": "Star Wars", "year": 1977.0, "genres": "Sci-Fi"}) == (
        "Star Wars (1977). Genres: Sci-Fi."
    )
    assert tpl.render({"title": "X", "year": float("nan"), "genres": np.nan}) == "X."
    assert tpl.render({"title": None, "year": None, "genres": None}) == ""


def test_item_template_render_matches_render_frame(items: pd.DataFrame) -> None:
    tpl = ItemTemplate("{title} [{year}] - {genres}")
    assert [tpl.render(row) for _, row in items.iterrows()] == tpl.render_frame(items)


def test_item_template_missing_column_lists_available(items: pd.DataFrame) -> None:
    with pytest.raises(MissingFieldError) as err:
        ItemTemplate("{title} by {director}").render_frame(items)
    msg = str(err.value)
    assert "director" in msg and "title" in msg and "genres" in msg
    with pytest.raises(MissingFieldError, match="director"):
        ItemTemplate("{director}").render({"title": "x"})


@pytest.mark.parametrize("bad", ["{} ({year})", "{0}", "{title.upper}", "{title"])
def test_item_template_rejects_bad_templates(bad: str) -> None:
    with pytest.raises(ValueError):
        ItemTemplate(bad)


def test_field_texts_per_aspect(items: pd.DataFrame) -> None:
    out = field_texts(items, {"title": "{title}", "genres": "{genres}", "era": "released in {year}"})
    assert list(out) == ["title", "genres", "era"]
    assert out["title"] == ["Toy Story", "Star Wars: Episode IV", "Fargo", "Nameless"]
    assert out["genres"][3] == ""
    assert out["era"] == ["released in 1995", "released in 1977", "", ""]
    with pytest.raises(MissingFieldError):
        field_texts(items, {"title": "{title}", "plot": "{plot}"})


def test_user_template_profile_and_history() -> None:
    tpl = UserTemplate(max_history=2)
    text = tpl.render({"age": 24, "gender": "M", "occupation": "technician"}, ["Fargo", "Heat", "Alien"])
    assert text == "A 24-year-old man technician. Recently watched: Fargo; Heat."


def test_user_template_missing_parts() -> None:
    tpl = UserTemplate()
    assert tpl.render({"age": None, "gender": "F", "occupation": "writer"}, []) == "A woman writer."
    assert tpl.render(None, ["Fargo"]) == "Recently watched: Fargo."
    assert tpl.render(None, []) == ""


def test_user_template_gender_words_configurable() -> None:
    row = {"age": 30, "gender": "F", "occupation": "artist"}
    assert UserTemplate(gender_words={"F": "female"}).render(row, []) == "A 30-year-old female artist."
    assert UserTemplate(gender_words={}).render(row, []) == "A 30-year-old F artist."
    with pytest.raises(MissingFieldError, match="zip_code"):
        UserTemplate("{zip_code}").render(row, [])


@pytest.fixture
def interactions() -> pd.DataFrame:
    # user 1 watches items 10..15; items 12 and 13 share timestamp 300 (row order decides: 12 first)
    return pd.DataFrame(
        {
            "user_id": [1, 2, 1, 1, 1, 2, 1, 1],
            "item_id": [13, 99, 10, 12, 11, 98, 14, 15],
            "rating": [4, 5, 3, 4, 5, 1, 2, 3],
            "timestamp": [300, 50, 100, 300, 200, 60, 400, 500],
        }
    ).iloc[[2, 4, 3, 0, 6, 7, 1, 5]]  # shuffle rows but keep 12 before 13 among the tie


def test_recent_history_newest_first(interactions: pd.DataFrame) -> None:
    assert recent_history(interactions, 1, n=10) == [15, 14, 13, 12, 11, 10]
    assert recent_history(interactions, 1, n=2) == [15, 14]
    assert recent_history(interactions, 2, n=10) == [98, 99]
    assert recent_history(interactions, 42, n=10) == []


def test_recent_history_ties_keep_row_order() -> None:
    frame = pd.DataFrame({"user_id": [1, 1, 1], "item_id": [7, 8, 9], "timestamp": [5, 5, 5]})
    # equal timestamps: later rows count as later, so they come first in newest-first order
    assert recent_history(frame, 1, n=3) == [9, 8, 7]
    assert recent_history(frame, 1, before_position=2, n=3) == [8, 7]


def test_recent_history_timestamp_cutoff_excludes_future_and_ties(interactions: pd.DataFrame) -> None:
    hist = recent_history(interactions, 1, before_timestamp=300, n=10)
    assert hist == [11, 10]
    # nothing at or after the cutoff may leak into the history
    at_or_after = set(
        interactions.loc[(interactions.user_id == 1) & (interactions.timestamp >= 300), "item_id"]
    )
    assert not at_or_after & set(hist)
    assert recent_history(interactions, 1, before_timestamp=100, n=10) == []
    assert recent_history(interactions, 1, before_timestamp=300.5, n=10) == [13, 12, 11, 10]


def test_recent_history_position_cutoff(interactions: pd.DataFrame) -> None:
    # chronological: 10, 11, 12, 13, 14, 15 -> predicting position 3 (item 13) sees 10, 11, 12
    assert recent_history(interactions, 1, before_position=3, n=10) == [12, 11, 10]
    assert recent_history(interactions, 1, before_position=0, n=10) == []
    assert recent_history(interactions, 1, before_position=5, before_timestamp=300, n=10) == [11, 10]


def test_recent_history_every_target_sees_only_its_past(interactions: pd.DataFrame) -> None:
    rows = interactions.sort_values("timestamp", kind="stable")
    user_rows = rows[rows.user_id == 1].reset_index(drop=True)
    for pos, target in user_rows.iterrows():
        hist = recent_history(interactions, 1, before_position=pos, n=50)
        assert target.item_id not in hist
        assert set(hist) == set(user_rows.item_id[:pos])


def test_history_index_matches_recent_history(interactions: pd.DataFrame) -> None:
    index = HistoryIndex(interactions)
    assert 1 in index and 42 not in index and len(index) == 2
    for uid in [1, 2, 42]:
        for ts in [None, 100, 300, 301, 1000]:
            for pos in [None, 0, 2, 4, 10]:
                for n in [0, 1, 3, 20]:
                    expected = recent_history(
                        interactions, uid, before_timestamp=ts, before_position=pos, n=n
                    )
                    assert index.recent(uid, before_timestamp=ts, before_position=pos, n=n) == expected


def test_recent_history_missing_columns() -> None:
    with pytest.raises(MissingFieldError, match="timestamp"):
        recent_history(pd.DataFrame({"user_id": [1], "item_id": [2]}), 1, n=3)
