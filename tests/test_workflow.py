"""NVTabular preprocessing: fitted on train, tags, text carried through, save/reload, unknown ids."""

from __future__ import annotations

import pandas as pd
from merlin.schema import Tags

from llm_rerank_plugin.preprocess.workflow import OOV_INDEX, Preprocessor, join_features


def test_schema_tags_and_text_columns(ml100k, ml100k_split, ml100k_preprocessed):
    pre, _, spec = ml100k_preprocessed
    schema = pre.workflow.output_schema
    assert schema.select_by_tag(Tags.USER_ID).column_names == ["user_id"]
    assert schema.select_by_tag(Tags.ITEM_ID).column_names == ["item_id"]
    assert {"age", "gender", "occupation"} <= set(schema.select_by_tag(Tags.USER).column_names)
    assert "year" in schema.select_by_tag(Tags.ITEM).column_names
    out = pre.transform(join_features(ml100k_split.test.head(50), ml100k, spec))
    raw = join_features(ml100k_split.test.head(50), ml100k, spec)
    assert out["title"].tolist() == raw["title"].tolist()  # untouched text
    assert out["genres"].tolist() == raw["genres"].tolist()
    assert (out["item_id"] >= 3).all()


def test_save_reload_gives_identical_transform(ml100k, ml100k_split, ml100k_preprocessed, tmp_path):
    pre, _, spec = ml100k_preprocessed
    pre.save(tmp_path / "wf")
    reloaded = Preprocessor.load(tmp_path / "wf")
    frame = join_features(ml100k_split.valid, ml100k, spec)
    pd.testing.assert_frame_equal(pre.transform(frame), reloaded.transform(frame))
    assert list(reloaded.vocabulary("item_id")) == list(pre.vocabulary("item_id"))


def test_unknown_ids_go_to_the_oov_bucket(ml100k_preprocessed):
    pre, _, _ = ml100k_preprocessed
    frame = pd.DataFrame(
        {
            "user_id": [1, 99_999],
            "item_id": [99_999, 50],
            "rating": [4.0, 5.0],
            "timestamp": [1, 2],
            "title": ["New", "Star Wars"],
            "genres": ["Drama", "Sci-Fi"],
            "year": [2030.0, 1977.0],
            "age": [24, 30],
            "gender": ["M", "F"],
            "occupation": ["technician", "astronaut"],
        }
    )
    out = pre.transform(frame)
    assert out["item_id"].tolist()[0] == OOV_INDEX and out["item_id"].tolist()[1] >= 3
    assert out["user_id"].tolist()[1] == OOV_INDEX and out["occupation"].tolist()[1] == OOV_INDEX
    vocab = pre.vocabulary("item_id")
    assert vocab[out["item_id"].tolist()[1]] == 50


def test_fit_on_train_only(ml100k, ml100k_split, ml100k_preprocessed):
    pre, _, _ = ml100k_preprocessed
    known = set(v for v in pre.vocabulary("item_id") if v is not None)
    assert known == set(ml100k_split.train["item_id"].unique())


def test_a_column_that_is_feature_and_text_is_encoded_once(tmp_path):
    from llm_rerank_plugin.data import InteractionData
    from llm_rerank_plugin.preprocess.workflow import FeatureSpec

    items = pd.DataFrame({"item_id": ["a", "b", "c"], "category": ["x", "y", "x"], "name": ["A", "B", "C"]})
    inter = pd.DataFrame(
        {"user_id": ["u", "u", "v"], "item_id": ["a", "b", "c"], "rating": 1.0, "timestamp": [1, 2, 3]}
    )
    data = InteractionData("t", inter, items, pd.DataFrame({"user_id": ["u", "v"]}))
    spec = FeatureSpec([], ["category"], ["name", "category"])
    frame = join_features(inter, data, spec)
    assert list(frame.columns).count("category") == 1
    pre = Preprocessor.fit(frame, tmp_path, spec)
    out = pre.transform(frame)
    assert list(out.columns).count("category") == 1 and out["name"].tolist() == ["A", "B", "C"]
