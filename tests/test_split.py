"""Leave-last-out split: counts, no leak from the future, ties broken by original order."""

from __future__ import annotations

import pandas as pd

from llm_rerank_plugin.data.split import hold_out_last, leave_last_out


def test_ties_broken_by_original_order():
    inter = pd.DataFrame(
        {"user_id": [1, 1, 1, 1], "item_id": [5, 6, 7, 8], "rating": 4.0, "timestamp": [10, 30, 30, 20]}
    )
    split = leave_last_out(inter)
    # Items 6 and 7 share the last second: file order decides, so 7 (later row) is the test item.
    assert split.test["item_id"].tolist() == [7]
    assert split.valid["item_id"].tolist() == [6]
    assert split.train["item_id"].tolist() == [5, 8]


def test_short_histories_stay_in_train():
    inter = pd.DataFrame(
        {"user_id": [1, 1, 2, 2, 2], "item_id": [1, 2, 1, 2, 3], "rating": 3.0, "timestamp": [1, 2, 1, 2, 3]}
    )
    split = leave_last_out(inter)
    assert split.test["user_id"].tolist() == [2]
    assert sorted(split.train[split.train["user_id"] == 1]["item_id"]) == [1, 2]


def test_hold_out_last_keeps_one_event():
    inter = pd.DataFrame({"user_id": [1, 1, 2], "item_id": [1, 2, 3], "rating": 3.0, "timestamp": [1, 2, 1]})
    kept, held = hold_out_last(inter, 5)
    assert kept["item_id"].tolist() == [1, 3]
    assert held["item_id"].tolist() == [2]


def test_real_split_counts_and_no_leak(ml100k):
    split = leave_last_out(ml100k.interactions)
    assert (len(split.train), len(split.valid), len(split.test)) == (98_114, 943, 943)
    assert split.test["user_id"].nunique() == 943
    key = ["user_id", "item_id", "timestamp", "event_order"]
    train_keys = set(map(tuple, split.train[key].to_numpy().tolist()))
    assert not train_keys & set(map(tuple, split.test[key].to_numpy().tolist()))
    assert not train_keys & set(map(tuple, split.valid[key].to_numpy().tolist()))
    # Nothing in train (or validation) is later than the user's test event.
    last_train = split.train.groupby("user_id")["timestamp"].max()
    test_time = split.test.set_index("user_id")["timestamp"]
    assert (last_train <= test_time.loc[last_train.index]).all()
    valid_time = split.valid.set_index("user_id")["timestamp"]
    assert (valid_time <= test_time.loc[valid_time.index]).all()
    assert len(split.train) + len(split.valid) + len(split.test) == 100_000
