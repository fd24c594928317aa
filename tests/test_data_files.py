"""The generic data source (``source: files``), its checks, the source-keyed cache, ml-100k without
fallback, check_columns and the synthetic shop generator. Tiny frames written to tmp_path."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from llm_rerank_plugin.config import DataConfig, PipelineConfig, load_config
from llm_rerank_plugin.data import (
    ConfigColumnError,
    DataError,
    DataSourceError,
    DroppedInteractionsWarning,
    DuplicateIdError,
    EmptyDataError,
    IdTypeError,
    MissingColumnError,
    MissingFileError,
    MissingIdError,
    TimestampError,
    UnknownItemError,
    check_columns,
    leave_last_out,
    load_data,
    movielens,
)
from llm_rerank_plugin.data.base import to_pandas, write_cache
from llm_rerank_plugin.data.synthetic import generate_shop

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def shop_frames() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    inter = pd.DataFrame(
        {
            "customer": ["C01", "C01", "C02", "C01", "C02"],
            "product": ["P01", "P02", "P01", "P03", "P03"],
            "ts": pd.to_datetime(
                ["2024-01-01 10:00", "2024-01-01 10:05", "2024-01-02", "2024-01-03", "2024-01-04"]
            ),
            "qty": [1, 2, 1, 1, 3],
        }
    )
    items = pd.DataFrame(
        {
            "sku": ["P01", "P02", "P03"],
            "name": ["Trail Shoe", "Running Socks", None],
            "tags": [["run", "trail"], [], ["coffee"]],
            "price": [99.5, 9.99, 12.0],
        }
    )
    users = pd.DataFrame({"customer": ["C01", "C02"], "segment": ["budget", "premium"]})
    return inter, items, users


def write_shop(folder: Path, inter=None, items=None, users=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    defaults = shop_frames()
    for name, frame, default in zip(
        ("interactions", "items", "users"), (inter, items, users), defaults, strict=True
    ):
        (default if frame is None else frame).to_parquet(folder / f"{name}.parquet", index=False)
    return folder


def shop_config(folder: Path, **changes) -> DataConfig:
    values = {
        "source": "files",
        "interactions": str(folder / "interactions.parquet"),
        "items": str(folder / "items.parquet"),
        "users": str(folder / "users.parquet"),
        "columns": {"user_id": "customer", "item_id": "product", "timestamp": "ts"},
        "item_id_column": "sku",
        "cache_dir": str(folder / "cache"),
    }
    values.update(changes)
    return DataConfig(**values)


def test_parquet_with_string_ids_datetimes_lists_and_users(tmp_path):
    data = load_data(shop_config(write_shop(tmp_path)))
    inter = data.interactions
    assert list(inter.columns) == ["user_id", "item_id", "rating", "timestamp"]
    assert inter["user_id"].tolist() == ["C01", "C01", "C02", "C01", "C02"]  # file order, ids as given
    assert inter["item_id"].tolist() == ["P01", "P02", "P01", "P03", "P03"]
    assert inter["timestamp"].dtype == np.int64
    assert inter["timestamp"].iloc[0] == pd.Timestamp("2024-01-01 10:00", tz="UTC").timestamp()
    assert inter["timestamp"].iloc[1] - inter["timestamp"].iloc[0] == 300
    assert (inter["rating"] == 1.0).all() and inter["rating"].dtype == np.float64
    assert list(data.items.columns) == ["item_id", "name", "tags", "price"]
    assert list(data.items["tags"].iloc[0]) == ["run", "trail"] and len(data.items["tags"].iloc[1]) == 0
    assert list(data.users.columns) == ["user_id", "segment"]
    assert data.item_text_columns == ["name", "tags", "price"] and data.user_text_columns == ["segment"]
    source = data.source
    assert source["kind"] == "files" and source["cached"] is False
    assert source["paths"] == {
        role: [str((tmp_path / f"{role}.parquet").resolve())] for role in ("interactions", "items", "users")
    }
    assert source["rows"] == {"interactions": 5, "items": 3, "users": 2}
    assert source["columns"]["interactions"]["user_id"] == "customer"
    assert source["columns"]["items"] == {"item_id": "sku"}
    assert source["dropped_interactions"] == 0 and len(source["fingerprint"]) == 20
    json.dumps(source)  # goes into results.json and the bundle manifest as is
    again = load_data(shop_config(tmp_path))
    assert again.source["cached"] is True and again.source["fingerprint"] == source["fingerprint"]
    pd.testing.assert_frame_equal(again.interactions, inter)


def test_an_id_saved_as_the_parquet_index_is_a_column(tmp_path):
    _, items, _ = shop_frames()
    write_shop(tmp_path)
    items.set_index("sku").to_parquet(tmp_path / "items.parquet")
    data = load_data(shop_config(tmp_path))
    assert data.items["item_id"].tolist() == ["P01", "P02", "P03"]


def test_sub_second_datetimes_give_float_seconds_and_users_are_optional(tmp_path):
    inter, _, _ = shop_frames()
    inter.loc[1, "ts"] = pd.Timestamp("2024-01-01 10:00:00.250")
    write_shop(tmp_path, inter=inter)
    data = load_data(shop_config(tmp_path, users=None))
    assert data.interactions["timestamp"].dtype == np.float64
    assert data.interactions["timestamp"].iloc[1] - data.interactions["timestamp"].iloc[0] == pytest.approx(
        0.25
    )
    assert list(data.users.columns) == ["user_id"] and len(data.users) == 0
    assert "users" not in data.source["paths"]


def test_csv_with_integer_ids_and_epoch_seconds(tmp_path):
    pd.DataFrame({"uid": [7, 7, 8], "movie": [10, 11, 10], "stars": [4, 5, 3], "t": [300, 100, 200]}).to_csv(
        tmp_path / "inter.csv", index=False
    )
    pd.DataFrame({"movie": [10, 11], "title": ["Alien", "Fargo"]}).to_csv(tmp_path / "items.csv", index=False)
    cfg = DataConfig(
        source="files",
        interactions=str(tmp_path / "inter.csv"),
        items=str(tmp_path / "items.csv"),
        columns={"user_id": "uid", "item_id": "movie", "timestamp": "t", "rating": "stars"},
        cache_dir=str(tmp_path / "cache"),
    )
    data = load_data(cfg)
    assert data.interactions["user_id"].dtype == np.int64 and data.interactions["item_id"].dtype == np.int64
    assert data.items["item_id"].tolist() == [10, 11]
    assert data.interactions["timestamp"].tolist() == [300, 100, 200]
    assert data.interactions["rating"].tolist() == [4.0, 5.0, 3.0]


def test_csv_ids_with_leading_zeros_stay_strings_and_iso_strings_are_timestamps(tmp_path):
    (tmp_path / "inter.csv").write_text(
        "user_id,item_id,timestamp\n001,0042,2024-05-01T12:00:00+02:00\n002,0042,2024-05-01 10:00:01\n"
    )
    (tmp_path / "items.tsv").write_text("item_id\ttitle\n0042\tThe Answer\n")
    cfg = DataConfig(
        source="files",
        interactions=str(tmp_path / "inter.csv"),
        items=str(tmp_path / "items.tsv"),
        cache_dir=str(tmp_path / "cache"),
    )
    data = load_data(cfg)
    assert data.interactions["user_id"].tolist() == ["001", "002"]
    assert data.interactions["item_id"].tolist() == ["0042", "0042"]
    assert data.items["item_id"].tolist() == ["0042"]
    # 12:00 at +02:00 is 10:00 UTC; naive strings count as UTC
    assert data.interactions["timestamp"].tolist() == [1714557600, 1714557601]


def test_folder_of_parquet_parts_in_natural_order(tmp_path):
    inter, _, _ = shop_frames()
    parts = tmp_path / "inter"
    parts.mkdir()
    inter.iloc[:2].to_parquet(parts / "part.2.parquet", index=False)
    inter.iloc[2:].to_parquet(parts / "part.10.parquet", index=False)
    (parts / "_SUCCESS").write_text("")
    write_shop(tmp_path)
    data = load_data(shop_config(tmp_path, interactions=str(parts)))
    assert data.interactions["item_id"].tolist() == inter["product"].tolist()
    assert [Path(p).name for p in data.source["paths"]["interactions"]] == [
        "part.2.parquet",
        "part.10.parquet",
    ]


def test_parts_with_different_columns_are_an_error(tmp_path):
    inter, _, _ = shop_frames()
    parts = tmp_path / "inter"
    parts.mkdir()
    inter.iloc[:2].to_parquet(parts / "part.0.parquet", index=False)
    inter.iloc[2:].drop(columns="qty").to_parquet(parts / "part.1.parquet", index=False)
    write_shop(tmp_path)
    with pytest.raises(DataError, match=r"differ in columns.*part\.1\.parquet"):
        load_data(shop_config(tmp_path, interactions=str(parts)))


@pytest.mark.parametrize("role", ["interactions", "items", "users"])
def test_missing_file_names_the_key_and_the_path(tmp_path, role):
    write_shop(tmp_path)
    (tmp_path / f"{role}.parquet").unlink()
    with pytest.raises(MissingFileError, match=rf"data\.{role}: .*{role}\.parquet does not exist"):
        load_data(shop_config(tmp_path))


def test_folder_without_parts_and_unknown_format(tmp_path):
    write_shop(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingFileError, match="holds no parquet parts"):
        load_data(shop_config(tmp_path, interactions=str(tmp_path / "empty")))
    (tmp_path / "items.xlsx").write_text("x")
    with pytest.raises(DataSourceError, match=r"unknown format \(\.xlsx\); expected \.parquet"):
        load_data(shop_config(tmp_path, items=str(tmp_path / "items.xlsx")))


def test_mapped_column_absent_lists_the_columns_present(tmp_path):
    write_shop(tmp_path)
    cfg = shop_config(tmp_path, columns={"user_id": "customer", "item_id": "product", "timestamp": "time"})
    with pytest.raises(MissingColumnError) as err:
        load_data(cfg)
    message = str(err.value)
    assert "data.columns.timestamp = 'time'" in message and "interactions.parquet" in message
    assert "['customer', 'product', 'ts', 'qty']" in message


def test_items_id_column_defaults_to_the_interactions_name(tmp_path):
    write_shop(tmp_path)
    with pytest.raises(
        MissingColumnError, match=r"data\.item_id_column \(default: data\.columns\.item_id\) = 'product'"
    ):
        load_data(shop_config(tmp_path, item_id_column=None))


def test_duplicate_item_ids_counted_with_examples(tmp_path):
    _, items, _ = shop_frames()
    items = pd.concat([items, items.iloc[[0, 0, 2]]], ignore_index=True)
    write_shop(tmp_path, items=items)
    with pytest.raises(
        DuplicateIdError, match=r"column 'sku': 2 ids occur more than once \(5 rows\), e\.g\. 'P01', 'P03'"
    ):
        load_data(shop_config(tmp_path))


def test_duplicate_user_ids(tmp_path):
    _, _, users = shop_frames()
    write_shop(tmp_path, users=pd.concat([users, users.iloc[[1]]], ignore_index=True))
    with pytest.raises(DuplicateIdError, match=r"data\.users .*'customer'.*'C02'"):
        load_data(shop_config(tmp_path))


def test_empty_frames(tmp_path):
    inter, items, _ = shop_frames()
    write_shop(tmp_path, items=items.iloc[:0])
    with pytest.raises(EmptyDataError, match=r"data\.items: .*items\.parquet has no rows"):
        load_data(shop_config(tmp_path))
    (tmp_path / "inter.csv").write_text("")
    with pytest.raises(EmptyDataError, match=r"data\.interactions: .*inter\.csv is empty"):
        load_data(shop_config(tmp_path, interactions=str(tmp_path / "inter.csv")))
    (tmp_path / "inter.csv").write_text("customer,product,ts\n")
    with pytest.raises(EmptyDataError, match="has no rows"):
        load_data(shop_config(tmp_path, interactions=str(tmp_path / "inter.csv")))


def test_unparseable_timestamps_counted_with_examples(tmp_path):
    inter, _, _ = shop_frames()
    inter["ts"] = ["2024-01-01", "yesterday", "2024-01-03", "soon", None]
    write_shop(tmp_path, inter=inter)
    with pytest.raises(TimestampError) as err:
        load_data(shop_config(tmp_path))
    message = str(err.value)
    assert "column 'ts': 3 of 5 timestamps cannot be read" in message
    assert "'yesterday', 'soon', None" in message and "rows 1, 3, 4" in message
    assert "expected epoch seconds" in message


def test_nan_epoch_timestamps_are_an_error(tmp_path):
    inter, _, _ = shop_frames()
    inter["ts"] = [1.0, 2.0, np.nan, 4.0, 5.0]
    write_shop(tmp_path, inter=inter)
    with pytest.raises(TimestampError, match="1 of 5 timestamps"):
        load_data(shop_config(tmp_path))


def test_nan_ids_are_an_error(tmp_path):
    inter, items, _ = shop_frames()
    inter.loc[3, "customer"] = None
    write_shop(tmp_path, inter=inter)
    with pytest.raises(MissingIdError, match=r"column 'customer': 1 of 5 rows have no id \(rows 3\)"):
        load_data(shop_config(tmp_path))
    items.loc[1, "sku"] = None
    write_shop(tmp_path, items=items)
    with pytest.raises(MissingIdError, match=r"data\.items .*column 'sku'"):
        load_data(shop_config(tmp_path))


def test_id_type_mismatch_between_files_is_named(tmp_path):
    inter, items, _ = shop_frames()
    items["sku"] = [1, 2, 3]
    write_shop(tmp_path, items=items)
    with pytest.raises(
        IdTypeError, match=r"interactions.*holds strings \('P01'.*items.*holds integers \(1, 2, 3\)"
    ):
        load_data(shop_config(tmp_path))


def test_fractional_ids_are_an_error(tmp_path):
    inter, _, _ = shop_frames()
    inter["customer"] = [1.0, 1.5, 2.0, 1.0, 2.0]
    write_shop(tmp_path, inter=inter)
    with pytest.raises(IdTypeError, match=r"fractional numbers \(1\.5\)"):
        load_data(shop_config(tmp_path))


def test_unknown_items_are_dropped_with_a_warning_or_an_error_when_strict(tmp_path):
    inter, _, _ = shop_frames()
    inter.loc[[1, 4], "product"] = ["P99", "P98"]
    write_shop(tmp_path, inter=inter)
    with pytest.warns(
        DroppedInteractionsWarning, match=r"2 of 5 interactions .* not in the catalogue .*P99, P98"
    ):
        data = load_data(shop_config(tmp_path))
    assert data.interactions["item_id"].tolist() == ["P01", "P01", "P03"]
    assert data.source["dropped_interactions"] == 2 and data.source["rows"]["interactions"] == 3
    # a warm cache repeats the warning, and strict turns it into an error
    with pytest.warns(DroppedInteractionsWarning):
        assert load_data(shop_config(tmp_path)).source["cached"] is True
    with pytest.raises(UnknownItemError, match="2 of 5 interactions .*data.strict is true"):
        load_data(shop_config(tmp_path, strict=True))


def test_no_item_in_the_catalogue_is_an_error(tmp_path):
    _, items, _ = shop_frames()
    items["sku"] = ["X1", "X2", "X3"]
    write_shop(tmp_path, items=items)
    with pytest.raises(UnknownItemError, match="none of the 5 interactions' items"):
        load_data(shop_config(tmp_path))


def test_ratings_mapped_unmapped_and_invalid(tmp_path):
    inter, _, _ = shop_frames()
    write_shop(tmp_path, inter=inter.assign(rating=[1, 2, 3, 4, 5]))
    with pytest.warns(UserWarning, match="has a 'rating' column but data.columns.rating is not set"):
        assert (load_data(shop_config(tmp_path)).interactions["rating"] == 1.0).all()
    mapping = {"user_id": "customer", "item_id": "product", "timestamp": "ts", "rating": "qty"}
    write_shop(tmp_path)
    assert load_data(shop_config(tmp_path, columns=mapping)).interactions["rating"].tolist() == [
        1,
        2,
        1,
        1,
        3,
    ]
    write_shop(tmp_path, inter=inter.assign(qty=["1", "two", "1", "1", "1"]))
    with pytest.raises(DataError, match=r"column 'qty': 1 of 5 ratings are not numbers \(e\.g\. 'two'\)"):
        load_data(shop_config(tmp_path, columns=mapping))


def test_cache_follows_the_source(tmp_path):
    write_shop(tmp_path)
    first = load_data(shop_config(tmp_path))
    inter, _, _ = shop_frames()
    write_shop(tmp_path, inter=inter.iloc[:3])
    path = tmp_path / "interactions.parquet"
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a later modification time, surely
    second = load_data(shop_config(tmp_path))
    assert second.source["cached"] is False and len(second.interactions) == 3
    assert second.source["fingerprint"] != first.source["fingerprint"]
    assert not Path(first.source["cache"]).exists()  # the superseded copy is pruned
    # another column mapping is another source
    mapping = {"user_id": "customer", "item_id": "product", "timestamp": "ts", "rating": "qty"}
    third = load_data(shop_config(tmp_path, columns=mapping))
    assert third.source["fingerprint"] != second.source["fingerprint"] and not third.source["cached"]
    assert third.interactions["rating"].tolist() == [1.0, 2.0, 1.0]
    # a path that no longer exists is an error even with a warm cache
    path.unlink()
    with pytest.raises(MissingFileError):
        load_data(shop_config(tmp_path))


def test_check_columns_lists_every_missing_column_with_its_key(tmp_path):
    data = load_data(shop_config(write_shop(tmp_path)))
    config = PipelineConfig(
        preprocess={
            "user_features": ["segment", "age"],
            "item_features": ["brand"],
            "text_columns": ["name"],
        },
        stages={
            "llm_rerank": {
                "templates": {
                    "item": "{name} {colour}",
                    "item_title": "{title}",
                    "user_profile": "{segment}",
                },
                "aspects": {"overall": None, "era": "released in {year}"},
            }
        },
    )
    with pytest.raises(ConfigColumnError) as err:
        check_columns(data, config)
    message = str(err.value)
    for line in (
        "stages.llm_rerank.templates.item names 'colour'",
        "stages.llm_rerank.templates.item_title names 'title'",
        "stages.llm_rerank.aspects.era names 'year'",
        "preprocess.item_features names 'brand'",
        "preprocess.user_features names 'age'",
    ):
        assert line in message
    assert (
        "'name'" not in message.split("columns present")[0] and "'segment'" not in message.split("users")[0]
    )
    assert "columns present: ['item_id', 'name', 'price', 'tags']" in message
    # a disabled stage's templates are not rendered, so they are not checked
    config.stages["llm_rerank"]["enabled"] = False
    config.preprocess.user_features = ["segment"]
    config.preprocess.item_features = []
    check_columns(data, config)


def test_generator_is_deterministic_and_shaped_like_a_shop(tmp_path):
    counts = generate_shop(tmp_path / "a", scale=0.05, seed=3)
    generate_shop(tmp_path / "b", scale=0.05, seed=3)
    generate_shop(tmp_path / "c", scale=0.05, seed=4)
    assert counts["users"] == 100 and counts["items"] == 75
    frames = {}
    for run in ("a", "b", "c"):
        frames[run] = {
            n: pd.read_parquet(tmp_path / run / f"{n}.parquet") for n in ("interactions", "items", "users")
        }
    for name in ("interactions", "items", "users"):
        pd.testing.assert_frame_equal(frames["a"][name], frames["b"][name])
    assert not frames["a"]["interactions"].equals(frames["c"]["interactions"])
    inter, items, users = (frames["a"][n] for n in ("interactions", "items", "users"))
    assert len(inter) == counts["interactions"] and 1800 <= len(inter) <= 3200
    assert list(inter.columns) == ["customer", "product", "ts", "qty"]
    assert pd.api.types.is_datetime64_any_dtype(inter["ts"]) and inter["ts"].is_monotonic_increasing
    assert list(items.columns) == ["sku", "name", "description", "category", "brand", "tags", "price"]
    assert list(users.columns) == ["customer", "segment", "region"]
    assert items["sku"].str.fullmatch(r"P\d{5}").all() and users["customer"].str.fullmatch(r"C\d{5}").all()
    assert items["sku"].is_unique and set(inter["product"]) <= set(items["sku"])
    assert all(len(t) == 3 for t in items["tags"])
    assert inter.groupby("customer").size().min() >= 3  # leave-last-out can evaluate every customer
    # the text carries the topic: an item's category names a topic that its tags and description share
    row = items.iloc[0]
    assert row["brand"] in row["name"] and row["category"].count(" > ") == 2
    # popularity is skewed: the top 10% of products take a far larger share than 10%
    top = inter["product"].value_counts()
    assert top.iloc[: len(items) // 10].sum() / len(inter) > 0.2


def test_generator_refuses_a_scale_too_small_for_its_topics(tmp_path):
    with pytest.raises(ValueError, match="scale must be at least 0.02"):
        generate_shop(tmp_path, scale=0.01)
    assert not (tmp_path / "interactions.parquet").exists()


def test_generated_shop_sessions_follow_tastes(tmp_path):
    generate_shop(tmp_path, scale=0.1, seed=0)
    inter = pd.read_parquet(tmp_path / "interactions.parquet")
    items = pd.read_parquet(tmp_path / "items.parquet").set_index("sku")
    topic = items["category"].str.split(" > ").str[1]
    inter["topic"] = topic.reindex(inter["product"]).to_numpy()
    inter["role"] = items["category"].str.endswith("Accessories").reindex(inter["product"]).to_numpy()
    # a customer's purchases concentrate on a few topics out of 12
    per_user = inter.groupby("customer")["topic"].agg(lambda t: t.value_counts(normalize=True).iloc[0])
    assert per_user.median() > 0.45
    # order: the next purchase within a customer's sequence is mostly of the same topic, and an accessory
    # follows a main product far more often than the reverse
    nxt = inter.groupby("customer").shift(-1)
    same = (inter["topic"] == nxt["topic"])[nxt["topic"].notna()]
    assert same.mean() > 0.6
    after_main = nxt.loc[~inter["role"] & nxt["role"].notna(), "role"].astype(bool).mean()
    after_acc = nxt.loc[inter["role"] & nxt["role"].notna(), "role"].astype(bool).mean()
    assert after_main > after_acc + 0.2


def test_shop_example_config_loads_the_generated_data_and_its_columns_exist(tmp_path, monkeypatch):
    generate_shop(tmp_path / "out" / "shop-data", scale=0.05, seed=0)
    monkeypatch.chdir(tmp_path)  # the example's paths are relative: out/shop-data/...
    config = load_config(EXAMPLES / "shop.yaml")
    config.data.cache_dir = str(tmp_path / "cache")
    assert config.data.source == "files"
    data = load_data(config.data)
    check_columns(data, config)
    assert data.interactions["user_id"].iloc[0].startswith("C") and data.items["item_id"].iloc[0].startswith(
        "P"
    )
    split = leave_last_out(data.interactions)
    assert len(split.test) == data.summary()["users"]
    assert set(config.evaluation.stages) == {
        "popularity", "retrieval", "candidates", "rerank-zeroshot", "rerank-notext", "rerank-bilinear"
    }  # fmt: skip


def _no_network(*args, **kwargs):
    raise AssertionError("a network source was tried although data.path was given")


@pytest.mark.parametrize("allow_network", [False, True])
def test_ml100k_bad_path_is_an_error_without_fallback(tmp_path, monkeypatch, allow_network):
    monkeypatch.setattr(movielens, "_from_grouplens", _no_network)
    monkeypatch.setattr(movielens, "_from_recbole_wheel", _no_network)
    (tmp_path / "empty").mkdir()
    for bad in (tmp_path / "empty", tmp_path / "nowhere"):
        cfg = DataConfig(
            source="ml-100k", path=str(bad), cache_dir=str(tmp_path / "cache"), allow_network=allow_network
        )
        with pytest.raises(DataSourceError, match=rf"data\.path {bad}.*never replaced by another copy"):
            load_data(cfg)


def test_ml100k_warm_stock_cache_is_not_read_for_a_bogus_path(tmp_path, monkeypatch):
    inter = pd.DataFrame({"user_id": [1], "item_id": [2], "rating": [5], "timestamp": [10]})
    items = pd.DataFrame({"item_id": [2], "title": ["Stock"]})
    users = pd.DataFrame({"user_id": [1]})
    monkeypatch.setattr(movielens, "_from_grouplens", lambda timeout: (inter, items, users))
    monkeypatch.setattr(movielens, "_check_counts", lambda *frames: None)
    stock = load_data(DataConfig(source="ml-100k", cache_dir=str(tmp_path / "cache")))
    assert stock.source["origin"].startswith("GroupLens") and stock.source["cached"] is False
    monkeypatch.setattr(movielens, "_from_grouplens", _no_network)
    warm = load_data(DataConfig(source="ml-100k", cache_dir=str(tmp_path / "cache"), allow_network=False))
    assert warm.source["cached"] is True and warm.items["title"].tolist() == ["Stock"]
    with pytest.raises(DataSourceError, match="does not exist"):
        load_data(
            DataConfig(source="ml-100k", path=str(tmp_path / "bogus"), cache_dir=str(tmp_path / "cache"))
        )


def test_ml100k_local_path_cache_is_keyed_by_its_files(tmp_path, monkeypatch):
    from tests.test_data import tiny_frames, write_grouplens

    monkeypatch.setattr(movielens, "_check_counts", lambda *frames: None)
    folder = write_grouplens(tmp_path / "gl", *tiny_frames())
    cfg = DataConfig(
        source="ml-100k", path=str(folder), cache_dir=str(tmp_path / "cache"), allow_network=False
    )
    first = load_data(cfg)
    assert first.source["paths"]["ml-100k"] == [
        str((folder / n).resolve()) for n in ("u.data", "u.item", "u.user")
    ]
    assert load_data(cfg).source["cached"] is True
    inter, items, users = tiny_frames()
    write_grouplens(folder, inter.iloc[:2], items, users)
    stat = (folder / "u.data").stat()
    os.utime(folder / "u.data", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    changed = load_data(cfg)
    assert changed.source["cached"] is False and len(changed.interactions) == 2


def test_write_cache_manifest_is_json_with_the_source(tmp_path):
    inter = pd.DataFrame({"user_id": [1], "item_id": [2], "rating": [1.0], "timestamp": [3]})
    write_cache(
        tmp_path, inter, pd.DataFrame({"item_id": [2]}), pd.DataFrame({"user_id": [1]}), source={"kind": "x"}
    )
    assert json.loads((tmp_path / "manifest.json").read_text())["source"] == {"kind": "x"}


@pytest.mark.slow
def test_ml100k_written_as_files_with_string_ids_reads_back_the_same_events(ml100k, tmp_path):
    inter = to_pandas(ml100k.interactions)
    renamed = pd.DataFrame(
        {
            "uid": "U" + inter["user_id"].astype(str),
            "movie": "M" + inter["item_id"].astype(str),
            "stars": inter["rating"],
            "when": pd.to_datetime(inter["timestamp"], unit="s"),
        }
    )
    renamed.to_parquet(tmp_path / "events.parquet", index=False)
    items = to_pandas(ml100k.items).rename(columns={"item_id": "movie"})
    items["movie"] = "M" + items["movie"].astype(str)
    items.to_parquet(tmp_path / "movies.parquet", index=False)
    cfg = DataConfig(
        source="files",
        interactions=str(tmp_path / "events.parquet"),
        items=str(tmp_path / "movies.parquet"),
        columns={"user_id": "uid", "item_id": "movie", "timestamp": "when", "rating": "stars"},
        cache_dir=str(tmp_path / "cache"),
    )
    data = load_data(cfg)
    assert data.summary() == ml100k.summary()
    got = data.interactions
    assert (
        got["user_id"].tolist() == renamed["uid"].tolist()
        and got["item_id"].tolist() == renamed["movie"].tolist()
    )
    assert got["timestamp"].tolist() == inter["timestamp"].tolist()
    assert got["rating"].tolist() == inter["rating"].astype(float).tolist()
    assert data.items["title"].tolist() == ml100k.items["title"].tolist()
