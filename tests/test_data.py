"""MovieLens loading: sources, formats, cache, counts and the error when no source works."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pandas as pd
import pytest

from llm_rerank_plugin.data import DataSourceError, load_dataset, movielens
from llm_rerank_plugin.data.movielens import load_movielens_100k


def write_grouplens(folder: Path, inter: pd.DataFrame, items: pd.DataFrame, users: pd.DataFrame) -> Path:
    """Write frames in the GroupLens ml-100k file formats (u.data, u.item, u.user)."""
    folder.mkdir(parents=True, exist_ok=True)
    inter[["user_id", "item_id", "rating", "timestamp"]].astype(int).to_csv(
        folder / "u.data", sep="\t", header=False, index=False
    )
    lines = []
    for row in items.itertuples():
        flags = ["1" if g in str(row.genres).split(", ") else "0" for g in movielens._GENRES]
        year = "" if pd.isna(row.year) else f" ({int(row.year)})"
        date = "" if pd.isna(row.year) else f"01-Jan-{int(row.year)}"
        lines.append("|".join([str(row.item_id), f"{row.title}{year}", date, "", "http://x", *flags]))
    (folder / "u.item").write_text("\n".join(lines) + "\n", encoding="latin-1")
    users.to_csv(folder / "u.user", sep="|", header=False, index=False)
    return folder


def tiny_frames() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    inter = pd.DataFrame(
        {"user_id": [1, 1, 2], "item_id": [10, 11, 10], "rating": [5, 3, 4], "timestamp": [100, 200, 150]}
    )
    items = pd.DataFrame(
        {
            "item_id": [10, 11],
            "title": ["Star Wars", "Fargo"],
            "year": [1977, 1996],
            "genres": ["Action, Sci-Fi", "Crime, Drama, Thriller"],
        }
    )
    users = pd.DataFrame(
        {
            "user_id": [1, 2],
            "age": [24, 53],
            "gender": ["M", "F"],
            "occupation": ["technician", "other"],
            "zip_code": ["85711", "94043"],
        }
    )
    return inter, items, users


def test_grouplens_folder_and_zip_parse_to_the_same_frames(tmp_path):
    folder = write_grouplens(tmp_path / "ml-100k", *tiny_frames())
    archive = tmp_path / "ml-100k.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name in ("u.data", "u.item", "u.user"):
            zf.write(folder / name, f"ml-100k/{name}")
    from_folder = movielens._from_local(folder)
    from_zip = movielens._from_local(archive)
    for a, b in zip(from_folder, from_zip, strict=True):
        pd.testing.assert_frame_equal(a, b)
    inter, items, users = from_folder
    assert list(items["title"]) == ["Star Wars", "Fargo"]
    assert list(items["year"]) == [1977, 1996]
    assert items.loc[0, "genres"] == "Action, Sci-Fi"
    assert list(users["zip_code"]) == ["85711", "94043"]
    assert len(inter) == 3


def test_local_path_with_wrong_counts_is_rejected_and_nothing_cached(tmp_path):
    folder = write_grouplens(tmp_path / "ml-100k", *tiny_frames())
    with pytest.raises(DataSourceError) as err:
        load_movielens_100k(folder, cache_dir=tmp_path / "cache", allow_network=False)
    assert "unexpected counts" in str(err.value) and str(folder) in str(err.value)
    assert "data.source: files" in str(err.value)  # the way to load a filtered copy
    assert not list((tmp_path / "cache").glob("**/manifest.json"))


def test_a_failing_path_is_the_only_source_tried(tmp_path, monkeypatch):
    def network(*args, **kwargs):
        raise AssertionError("network source tried although a path was given")

    monkeypatch.setattr(movielens, "_from_grouplens", network)
    monkeypatch.setattr(movielens, "_from_recbole_wheel", network)
    with pytest.raises(DataSourceError) as err:
        load_movielens_100k(tmp_path / "nowhere", cache_dir=tmp_path / "cache", allow_network=True)
    assert f"data.path {tmp_path / 'nowhere'}" in str(err.value) and "does not exist" in str(err.value)


def test_without_a_path_the_error_names_every_network_source_tried(tmp_path, monkeypatch):
    monkeypatch.setattr(movielens, "GROUPLENS_URL", "http://127.0.0.1:9/ml-100k.zip")
    monkeypatch.setattr(movielens, "RECBOLE_REQUIREMENT", str(tmp_path / "recbole-1.2.1-py3-none-any.whl"))
    with pytest.raises(DataSourceError) as err:
        load_movielens_100k(None, cache_dir=tmp_path / "cache", timeout=2)
    message = str(err.value)
    assert "GroupLens http://127.0.0.1:9/ml-100k.zip" in message
    assert "recbole-1.2.1-py3-none-any.whl" in message and "pip download" in message


def test_no_path_and_no_network_says_so(tmp_path):
    with pytest.raises(DataSourceError, match="no data.path given and data.allow_network is false"):
        load_movielens_100k(None, cache_dir=tmp_path / "cache", allow_network=False)


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="unknown data set 'ml-1b'.*'ml-100k'"):
        load_dataset("ml-1b")


@pytest.mark.slow
def test_real_movielens_counts_and_local_round_trip(ml100k, tmp_path):
    assert ml100k.summary() == {"users": 943, "items": 1682, "interactions": 100_000}
    assert {"title", "year", "genres"} <= set(ml100k.item_text_columns)
    assert {"age", "gender", "occupation"} <= set(ml100k.user_text_columns)
    star_wars = ml100k.items[ml100k.items["item_id"] == 50].iloc[0]
    assert star_wars["title"].startswith("Star Wars") and "Sci-Fi" in star_wars["genres"]
    # The same data written as GroupLens files loads from a local path, passes the checks and caches.
    folder = write_grouplens(tmp_path / "gl", ml100k.interactions, ml100k.items, ml100k.users)
    local = load_movielens_100k(folder, cache_dir=tmp_path / "cache", allow_network=False)
    assert local.summary() == ml100k.summary()
    assert local.source["origin"].startswith("local path") and local.source["cached"] is False
    assert (Path(local.source["cache"]) / "manifest.json").exists()
    again = load_movielens_100k(folder, cache_dir=tmp_path / "cache", allow_network=False)
    assert again.source["cached"] is True
    pd.testing.assert_frame_equal(again.interactions, local.interactions)
    # the local copy's cache is its own: without the path, nothing is read from it
    with pytest.raises(DataSourceError):
        load_movielens_100k(None, cache_dir=tmp_path / "cache", allow_network=False)
