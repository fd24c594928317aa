"""The ``LLMRerank`` Merlin operator: schema, transform contract, Merlin/NVTabular integration, artifacts."""

from __future__ import annotations

import logging
import pickle
import subprocess
import sys

import cloudpickle
import merlin.dtypes as md
import numpy as np
import pandas as pd
import pytest
from merlin.dag import ColumnSelector, Graph
from merlin.dag.executors import LocalExecutor
from merlin.schema import ColumnSchema, Schema, Tags

from llm_rerank_plugin import LLMRerank
from llm_rerank_plugin.platform.contract import NoKnownCandidatesError

INPUTS = ["user_id", "item_id", "score"]
KNOWN_USER, COLD_USER = 42, 7


def candidates(id_dtype=np.int64) -> pd.DataFrame:
    """Long format, users interleaved (rows need not be grouped): 42 known, 7 cold; 5 candidates each."""
    rows = [
        (42, 3, 0.9),
        (7, 1, 0.2),
        (42, 9, 0.1),
        (7, 4, 0.8),
        (42, 1, 0.5),
        (7, 10, 0.5),
        (42, 6, 0.7),
        (7, 6, 0.1),
        (42, 8, 0.3),
        (7, 2, 0.9),
    ]
    df = pd.DataFrame(rows, columns=INPUTS)
    return df.astype({"user_id": id_dtype, "item_id": id_dtype, "score": np.float64})


def with_rows(user: int, item_ids: list[int], scores: list[float]) -> pd.DataFrame:
    extra = pd.DataFrame({"user_id": user, "item_id": item_ids, "score": scores})
    return pd.concat([candidates(), extra], ignore_index=True)


def input_schema(df: pd.DataFrame) -> Schema:
    return Schema([ColumnSchema(c, dtype=df[c].dtype) for c in df.columns])


def run_graph(op: LLMRerank, df: pd.DataFrame, schema: Schema | None = None) -> tuple[pd.DataFrame, Schema]:
    graph = Graph(INPUTS >> op)
    graph.construct_schema(schema if schema is not None else input_schema(df))
    out = LocalExecutor().transform(df, [graph.output_node])
    return out, graph.output_schema


def assert_matches_schema(out: pd.DataFrame, schema: Schema) -> None:
    assert list(out.columns) == schema.column_names
    for name, col in schema.column_schemas.items():
        if col.dtype == md.string:  # pandas keeps strings as object columns
            assert out[name].map(lambda v: v is None or isinstance(v, str)).all(), name
        else:
            assert md.dtype(out[name].dtype) == col.dtype, name


def test_graph_reranks_each_user_and_tells_the_schema_truth(tiny_reranker):
    df = candidates()
    out, schema = run_graph(LLMRerank(reranker=tiny_reranker, top_k=3), df)

    assert schema.column_names == [
        "user_id",
        "item_id",
        "rank",
        "score",
        "retrieval_score",
        "aspect",
        "aspect_share",
        "because",
    ]
    assert schema.select_by_tag(Tags.USER_ID).column_names == ["user_id"]
    assert schema.select_by_tag(Tags.ITEM_ID).column_names == ["item_id"]
    assert_matches_schema(out, schema)

    assert out["user_id"].tolist() == [42] * 3 + [7] * 3  # first-appearance order, 3 rows each
    for user, got in out.groupby("user_id", sort=False):
        assert got["rank"].tolist() == [1, 2, 3]
        assert (np.diff(got["score"].to_numpy()) <= 0).all()
        assert set(got["item_id"]) <= set(df.loc[df.user_id == user, "item_id"])
        assert got["aspect"].map(lambda a: isinstance(a, str) and a != "").all()
        mine = df[df.user_id == user]
        want = tiny_reranker.rerank(user, mine.item_id.to_numpy(), mine.score.to_numpy(), top_k=3)
        assert got["item_id"].tolist() == want.item_ids.tolist()
        np.testing.assert_allclose(got["score"], want.scores, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got["retrieval_score"], want.retrieval_scores, rtol=1e-6)
    # The known user's explanations name a history title; the cold user (fallback) gets none.
    assert out.loc[out.user_id == KNOWN_USER, "because"].map(lambda b: isinstance(b, str)).all()
    assert out.loc[out.user_id == COLD_USER, "because"].isna().all()


@pytest.mark.parametrize("id_dtype", [np.int32, np.int64])
def test_id_dtypes_follow_the_input(tiny_reranker, id_dtype):
    out, schema = run_graph(LLMRerank(reranker=tiny_reranker, top_k=2), candidates(id_dtype))
    assert schema["user_id"].dtype == md.dtype(id_dtype) == schema["item_id"].dtype
    assert_matches_schema(out, schema)


def test_list_columns_give_the_same_ranking_as_long_format(tiny_reranker):
    long = candidates()
    lists = long.groupby("user_id", sort=False).agg(list).reset_index()  # one row per user
    op = LLMRerank(reranker=tiny_reranker, top_k=3)
    schema = Schema(
        [
            ColumnSchema("user_id", dtype=np.int64),
            ColumnSchema("item_id", dtype=np.int64, is_list=True, is_ragged=True),
            ColumnSchema("score", dtype=np.float64, is_list=True, is_ragged=True),
        ]
    )
    out, out_schema = run_graph(op, lists, schema)
    assert_matches_schema(out, out_schema)
    assert not out_schema["item_id"].is_list
    pd.testing.assert_frame_equal(out, run_graph(op, long)[0])


def test_list_rows_must_pair_items_with_scores(tiny_reranker):
    op = LLMRerank(reranker=tiny_reranker)
    bad = pd.DataFrame({"user_id": [42, 7], "item_id": [[1, 2], [3]], "score": [[0.5, 0.1], [0.2, 0.3]]})
    with pytest.raises(ValueError, match=r"lists differ in length for users \[7\]"):
        op.transform(ColumnSelector(INPUTS), bad)
    empty = pd.DataFrame({"user_id": [42, 7], "item_id": [[1, 2], []], "score": [[0.5, 0.1], []]})
    with pytest.raises(ValueError, match=r"users \[7\] have an empty candidate list"):
        op.transform(ColumnSelector(INPUTS), empty)


def test_fewer_candidates_than_top_k_and_empty_frames(tiny_reranker):
    op = LLMRerank(reranker=tiny_reranker, top_k=10)
    out = op.transform(ColumnSelector(INPUTS), candidates())
    assert out.groupby("user_id")["rank"].max().tolist() == [5, 5]
    empty = op.transform(ColumnSelector(INPUTS), candidates().iloc[:0])
    assert len(empty) == 0
    assert_matches_schema(empty, op.compute_output_schema(input_schema(candidates()), ColumnSelector(INPUTS)))


def test_missing_columns_are_named(tiny_reranker):
    op = LLMRerank(reranker=tiny_reranker)
    with pytest.raises(ValueError, match=r"missing input columns \['score'\].*\['user_id', 'item_id'\]"):
        Graph(["user_id", "item_id"] >> op).construct_schema(input_schema(candidates()))
    with pytest.raises(ValueError, match=r"missing input columns \['score'\].*expects \['user_id'"):
        op.transform(ColumnSelector(INPUTS), candidates().drop(columns="score"))
    renamed = LLMRerank(reranker=tiny_reranker, user_col="uid")
    with pytest.raises(ValueError, match=r"\['uid'\]"):
        renamed.compute_output_schema(input_schema(candidates()), ColumnSelector(INPUTS))


def test_unknown_candidates_are_dropped_with_a_warning(tiny_reranker, caplog):
    df = with_rows(42, [999, 998], [5.0, 4.0])
    with caplog.at_level(logging.WARNING, logger="llm_rerank_plugin.platform.contract"):
        out = LLMRerank(reranker=tiny_reranker, top_k=10).transform(ColumnSelector(INPUTS), df)
    assert not out["item_id"].isin([998, 999]).any()
    assert (out.user_id == 42).sum() == 5
    assert "user 42: dropping 2 candidate ids" in caplog.text and "999" in caplog.text


def test_a_user_with_only_unknown_candidates_is_an_error(tiny_reranker):
    df = with_rows(5, [999, 998], [1.0, 0.5])
    with pytest.raises(
        NoKnownCandidatesError, match=r"user 5: none of the 2 candidate item ids.*\[999, 998\]"
    ):
        LLMRerank(reranker=tiny_reranker).transform(ColumnSelector(INPUTS), df)


def test_save_and_load_artifacts_round_trip(tiny_reranker, tmp_path):
    df = candidates()
    op = LLMRerank(reranker=tiny_reranker, top_k=3)
    want, _ = run_graph(op, df)

    op.save_artifacts(str(tmp_path))
    assert (tmp_path / "llm_rerank" / "reranker.json").is_file()
    # Once saved, the pickle carries the folder, not the model; it reloads from there.
    shipped = pickle.loads(cloudpickle.dumps(op))
    assert shipped.reranker is None
    shipped.load_artifacts(str(tmp_path))
    pd.testing.assert_frame_equal(run_graph(shipped, df)[0], want, rtol=1e-5)

    lazy = pickle.loads(cloudpickle.dumps(op))  # no load_artifacts: reloads on first use
    pd.testing.assert_frame_equal(lazy.transform(ColumnSelector(INPUTS), df), want, rtol=1e-5)
    from_folder = LLMRerank(path=str(tmp_path / "llm_rerank"), top_k=3, device="cpu")
    pd.testing.assert_frame_equal(run_graph(from_folder, df)[0], want, rtol=1e-5)

    with pytest.raises(FileNotFoundError, match="no saved reranker"):
        from_folder.load_artifacts(str(tmp_path / "elsewhere"))


def test_pickle_without_a_folder_carries_the_model(tiny_reranker):
    op = LLMRerank(reranker=tiny_reranker, top_k=3)
    want = op.transform(ColumnSelector(INPUTS), candidates())  # warms the reranker's caches first
    shipped = pickle.loads(cloudpickle.dumps(op))
    assert shipped.reranker is not None and shipped.path is None
    pd.testing.assert_frame_equal(shipped.transform(ColumnSelector(INPUTS), candidates()), want, rtol=1e-5)
    assert op.reranker is tiny_reranker  # pickling leaves the live operator alone


def test_constructor_validation(tiny_reranker):
    with pytest.raises(ValueError, match="reranker object or the path"):
        LLMRerank()
    with pytest.raises(ValueError, match="top_k"):
        LLMRerank(reranker=tiny_reranker, top_k=0)


def test_inside_an_nvtabular_workflow(tiny_reranker, tmp_path):
    nvt = pytest.importorskip("nvtabular")
    from merlin.io import Dataset

    df = candidates()
    want, _ = run_graph(LLMRerank(reranker=tiny_reranker, top_k=3), df)
    workflow = nvt.Workflow(INPUTS >> LLMRerank(reranker=tiny_reranker, top_k=3))
    # One partition: the operator reranks per partition, so a user's candidates must not be split.
    dataset = Dataset(df, npartitions=1)
    workflow.fit(dataset)  # nothing to fit; builds the schemas
    got = workflow.transform(dataset).to_ddf().compute().reset_index(drop=True)
    pd.testing.assert_frame_equal(got, want)
    assert workflow.output_schema.column_names == list(want.columns)

    workflow.save(str(tmp_path / "workflow"))  # cloudpickle; the model travels inside (no folder)
    reloaded = nvt.Workflow.load(str(tmp_path / "workflow"))
    pd.testing.assert_frame_equal(reloaded.transform(df).reset_index(drop=True), want, rtol=1e-5)


def test_in_a_merlin_systems_ensemble(tiny_reranker):
    from merlin.systems.dag.ensemble import Ensemble

    df = candidates()
    ensemble = Ensemble(INPUTS >> LLMRerank(reranker=tiny_reranker, top_k=3), input_schema(df))
    out = LocalExecutor().transform(df, ensemble.graph)
    assert list(out.columns) == ensemble.output_schema.column_names
    assert len(out) == 6


@pytest.mark.gpu
def test_cudf_in_cudf_out(tiny_reranker):
    cudf = pytest.importorskip("cudf", reason="cuDF (GPU) is not available")
    op = LLMRerank(reranker=tiny_reranker, top_k=3)
    want = op.transform(ColumnSelector(INPUTS), candidates())
    got = op.transform(ColumnSelector(INPUTS), cudf.from_pandas(candidates()))
    assert isinstance(got, cudf.DataFrame)
    pd.testing.assert_frame_equal(got.to_pandas(), want, rtol=1e-5)


def test_package_import_stays_light():
    heavy = "{'torch', 'merlin', 'transformers'}"
    code = f"import sys, llm_rerank_plugin; print(sorted({heavy} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
