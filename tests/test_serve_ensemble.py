"""The serving chain as a Merlin Systems ensemble, run locally (``ensemble.transform``; no server): it must
give the in-process recommendation, apply feedback another process logged, and survive an export."""

from __future__ import annotations

import json
from pathlib import Path

import merlin.systems.dag  # noqa: E402, F401  (a pinned dependency: its absence is a failure, not a skip)
import numpy as np
import pandas as pd
import pytest

from llm_rerank_plugin.config import PipelineConfig  # noqa: E402
from llm_rerank_plugin.feedback.store import SQLiteUserStateStore  # noqa: E402
from llm_rerank_plugin.retrieve.base import PAD_ITEM, Candidates  # noqa: E402
from llm_rerank_plugin.serve.export import build_ensemble, export_ensemble, user_workflow  # noqa: E402
from llm_rerank_plugin.serve.ops import RESPONSE_COLUMNS  # noqa: E402

N_USERS, TOP_K, K_CANDIDATES = 12, 3, 6
COLD_USER = 999


class TinyBundle:
    """The ``pipeline.Bundle`` interface the serving code uses, over tiny logs: NVTabular preprocessor,
    Merlin implicit ALS, popularity for unknown users, a tiny-BERT reranker holding all histories."""

    user_id_kind = "int"
    item_id_kind = "int"
    path = None

    def __init__(self, reranker, work: Path) -> None:
        from llm_rerank_plugin.preprocess.workflow import Preprocessor
        from llm_rerank_plugin.retrieve.retrievers import make_retriever

        rng = np.random.default_rng(0)
        rows = [
            (user, int(item), float(t))
            for user in range(1, N_USERS + 1)
            for t, item in enumerate(rng.choice(np.arange(1, 11), 4, replace=False))
        ]
        logs = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
        self.config = PipelineConfig(
            output_dir=str(work), retrieval={"k": K_CANDIDATES}, stages={"llm_rerank": {"top_k": TOP_K}}
        )
        self.preprocessor = Preprocessor.fit(logs, work / "workflow")
        dataset = self.preprocessor.transform_dataset(logs)
        users, items = self.preprocessor.vocabulary("user_id"), self.preprocessor.vocabulary("item_id")
        self.retriever = make_retriever("als", factors=4, iterations=3).fit(dataset, users, items)
        self.popular = make_retriever("popularity").fit(dataset, users, items)
        newest_first = logs.sort_values("timestamp", ascending=False)
        reranker.set_users({u: g["item_id"].tolist() for u, g in newest_first.groupby("user_id")})
        self.reranker = reranker

    def candidates(self, user_ids, k=None) -> Candidates:
        k = k or self.config.retrieval.k
        ids = np.asarray(user_ids)
        known = np.array([self.retriever.known_user(u) for u in ids.tolist()], dtype=bool)
        items = np.full((len(ids), k), PAD_ITEM, np.int64)
        scores = np.full((len(ids), k), -np.inf, np.float32)
        for mask, retriever in ((known, self.retriever), (~known, self.popular)):
            if mask.any():
                found = retriever.recommend(ids[mask], k)
                items[mask], scores[mask] = found.item_ids, found.scores
        return Candidates(ids, items, scores)

    def recommend(self, user_ids, k=None) -> pd.DataFrame:
        k = k or self.config.llm_rerank().top_k
        found = self.candidates(user_ids)
        frames = []
        for user, items, scores in zip(found.user_ids.tolist(), found.item_ids, found.scores, strict=True):
            valid = items != PAD_ITEM
            frames.append(self.reranker.rerank(user, items[valid], scores[valid], top_k=k).to_frame())
        return pd.concat(frames, ignore_index=True)


@pytest.fixture
def tiny_bundle(tiny_reranker, tmp_path, single_torch_thread):
    return TinyBundle(tiny_reranker, tmp_path)


def assert_same_ranking(served: pd.DataFrame, expected: pd.DataFrame) -> None:
    assert list(served.columns) == list(RESPONSE_COLUMNS)
    assert served["user_id"].tolist() == expected["user_id"].tolist()
    assert served["item_id"].tolist() == expected["item_id"].tolist()
    assert served["rank"].tolist() == expected["rank"].tolist()
    np.testing.assert_allclose(served["score"].to_numpy(), expected["score"].to_numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(served["retrieval_score"], expected["retrieval_score"], rtol=1e-5, atol=1e-6)
    assert served["because"].tolist() == expected["because"].fillna("").tolist()
    assert served["aspect"].tolist() == expected["aspect"].tolist()


def test_local_ensemble_equals_in_process_recommendation(tiny_bundle, tmp_path):
    users = [3, COLD_USER, 1]
    ensemble = build_ensemble(tiny_bundle, tmp_path / "feedback.sqlite")
    assert ensemble.input_schema.column_names == ["user_id"]
    served = ensemble.transform(pd.DataFrame({"user_id": np.array(users, dtype=np.int64)}))
    expected = tiny_bundle.recommend(users)
    assert_same_ranking(served, expected)
    assert (served.groupby("user_id").size() == TOP_K).all()
    # The cold user got popularity candidates and nothing to cite.
    cold = served[served["user_id"] == COLD_USER]
    assert len(cold) == TOP_K and (cold["because"] == "").all()
    assert (served[served["user_id"] == 3]["because"] != "").all()


def test_dislike_logged_by_another_process_hides_the_item(tiny_bundle, tmp_path):
    store_path = tmp_path / "feedback.sqlite"
    ensemble = build_ensemble(tiny_bundle, store_path)
    frame = pd.DataFrame({"user_id": np.array([5], dtype=np.int64)})
    before = ensemble.transform(frame)
    top = int(before["item_id"].iloc[0])
    # A separate store object stands for the `feedback` model's process writing to the same file.
    with SQLiteUserStateStore(store_path) as writer:
        assert writer.append({"event_id": "d1", "user_id": 5, "kind": "dislike", "item_id": top})
    after = ensemble.transform(frame)
    assert top not in after["item_id"].tolist()
    assert len(after) == TOP_K  # K_CANDIDATES > TOP_K: the next candidate moves up
    # Other users are untouched.
    other = pd.DataFrame({"user_id": np.array([6], dtype=np.int64)})
    assert_same_ranking(ensemble.transform(other), tiny_bundle.recommend([6]))


def test_export_writes_the_contract_and_leaves_the_caller_ensemble_usable(tiny_bundle, tmp_path):
    ensemble = build_ensemble(tiny_bundle, tmp_path / "feedback.sqlite")
    frame = pd.DataFrame({"user_id": np.array([2, COLD_USER], dtype=np.int64)})
    before = ensemble.transform(frame)
    inputs_before = tiny_bundle.preprocessor.workflow.input_schema.column_names

    repo = export_ensemble(
        tiny_bundle, tmp_path / "repo", store_path=tmp_path / "feedback.sqlite", instances=3
    )

    pd.testing.assert_frame_equal(ensemble.transform(frame), before)  # the caller's ensemble still runs
    assert tiny_bundle.preprocessor.workflow.input_schema.column_names == inputs_before
    names = {p.name for p in repo.iterdir() if p.is_dir()}
    assert names == {"recommend", "feedback", "0_transformworkflowtriton"}
    recommend = (repo / "recommend" / "config.pbtxt").read_text()
    assert 'name: "user_id" data_type: TYPE_INT64 dims: [ -1, 1 ]' in recommend
    for column in ("item_id", "score", "rank", "because"):
        assert f'name: "{column}"' in recommend
    assert "count: 3" in recommend
    assert "count: 3" in (repo / "0_transformworkflowtriton" / "config.pbtxt").read_text()
    assert (repo / "recommend" / "1" / "ensemble" / "ensemble.pkl").is_file()
    assert (repo / "recommend" / "1" / "ensemble" / "llm_rerank" / "reranker.json").is_file()
    for model in names:
        shim = (repo / model / "1" / "model.py").read_text()
        assert "patch_resource_tracker_lock()" in shim
    manifest = json.loads((repo / "llm_rerank_serving.json").read_text())
    assert manifest["instances"] == 3 and manifest["user_id_kind"] == "int"
    assert str(tmp_path / "feedback.sqlite") in (repo / "feedback" / "config.pbtxt").read_text()
    with pytest.raises(FileExistsError, match="not empty"):
        export_ensemble(tiny_bundle, repo, store_path=tmp_path / "feedback.sqlite")


def test_user_workflow_is_a_fresh_fitted_copy(tiny_bundle):
    workflow = user_workflow(tiny_bundle)
    assert workflow.input_schema.column_names == ["user_id"]
    assert workflow.output_schema.column_names == ["user_index"]
    encoded = workflow.transform(pd.DataFrame({"user_id": np.array([1, COLD_USER], dtype=np.int64)}))
    assert encoded["user_index"].iloc[0] >= 3 and encoded["user_index"].iloc[1] == 2  # 2 = out of vocabulary
    assert "item_id" in tiny_bundle.preprocessor.workflow.input_schema.column_names


def test_retrieval_refuses_a_workflow_and_retriever_that_disagree(tiny_bundle, tmp_path):
    ensemble = build_ensemble(tiny_bundle, tmp_path / "feedback.sqlite")
    tiny_bundle.retriever.known_user = lambda user: False  # as if fitted on other logs
    with pytest.raises(RuntimeError, match="disagree"):
        ensemble.transform(pd.DataFrame({"user_id": np.array([1], dtype=np.int64)}))


def test_stub_fix_gives_the_resource_tracker_a_lock_with_recursion_count():
    from multiprocessing import resource_tracker

    from llm_rerank_plugin.serve.stubfix import patch_resource_tracker_lock

    class OldRLock:  # what the stub's CPython 3.11.2 C RLock looks like to a 3.11.7 stdlib
        pass

    tracker = resource_tracker._resource_tracker
    saved = tracker._lock
    try:
        tracker._lock = OldRLock()
        assert patch_resource_tracker_lock() is True
        assert hasattr(tracker._lock, "_recursion_count")
        assert patch_resource_tracker_lock() is False
    finally:
        tracker._lock = saved


def test_server_backends_and_environment(tmp_path):
    from llm_rerank_plugin.serve import server

    backends = server.prepare_backends(tmp_path)
    assert (backends / "python" / "triton_python_backend_stub").is_file()
    assert (backends / "python" / "libtriton_python.so").is_file()
    assert (server.tritonserver_dist() / "bin" / "tritonserver").is_file()
    env = server._server_env()
    libdir = server.interpreter_libdir()
    if libdir is not None:  # the stub must load this interpreter's libpython, not the system's
        assert env["LD_LIBRARY_PATH"].split(":")[0] == str(libdir)
    assert server.free_port() > 0
    with pytest.raises(FileNotFoundError, match="no model repository"):
        server.TritonServer(tmp_path / "missing")


# ---------------------------------------------------------------- a real fitted bundle (string ids)
@pytest.fixture(scope="module")
def fitted_shop(tiny_bert_dir, tmp_path_factory, single_torch_thread):
    import yaml

    from llm_rerank_plugin.config import load_config
    from llm_rerank_plugin.data.synthetic import generate_shop
    from llm_rerank_plugin.pipeline import fit
    from tests.test_lifecycle import shop_config

    tmp = tmp_path_factory.mktemp("serve_shop")
    generate_shop(tmp / "shop", scale=0.04, seed=3)
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(shop_config(tmp, tmp / "shop", tiny_bert_dir)))
    return fit(load_config(path))


def test_fitted_bundle_ensemble_equals_bundle_recommend(fitted_shop, tmp_path):
    from llm_rerank_plugin.pipeline import Bundle

    bundle = Bundle.load(fitted_shop.path)
    assert bundle.user_id_kind == "str" and bundle.item_id_kind == "str"
    users = [*bundle.users[:3], "C-never-seen"]
    ensemble = build_ensemble(bundle, tmp_path / "feedback.sqlite", bundle_path=bundle.path)
    served = ensemble.transform(pd.DataFrame({"user_id": np.array(users, dtype=object)}))
    assert_same_ranking(served, bundle.recommend(users))
    assert set(served["user_id"]) == set(users)
    assert all(isinstance(i, str) for i in served["item_id"])


def test_fitted_bundle_exports_bytes_ids_and_refers_to_the_bundle(fitted_shop, tmp_path):
    repo = export_ensemble(fitted_shop, tmp_path / "repo", store_path=tmp_path / "feedback.sqlite")
    config = (repo / "recommend" / "config.pbtxt").read_text()
    assert 'name: "user_id" data_type: TYPE_STRING dims: [ -1, 1 ]' in config
    assert 'name: "item_id" data_type: TYPE_STRING dims: [ -1, 1 ]' in config
    # The model is taken from the bundle folder in each server process, not copied into the repository.
    assert not (repo / "recommend" / "1" / "ensemble" / "llm_rerank").exists()
    manifest = json.loads((repo / "llm_rerank_serving.json").read_text())
    assert manifest["bundle"] == str(Path(fitted_shop.path).resolve())
    assert manifest["user_id_kind"] == "str"


def test_direct_chain_gives_the_ensemble_output(fitted_shop, tiny_bundle, tmp_path):
    from llm_rerank_plugin.pipeline import Bundle
    from llm_rerank_plugin.serve.ops import DirectChain

    bundle = Bundle.load(fitted_shop.path)
    for source, users, path in (
        (bundle, np.array([*bundle.users[:3], "C-never-seen"], dtype=object), bundle.path),
        (tiny_bundle, np.array([4, COLD_USER, 2], dtype=np.int64), None),
    ):
        ensemble = build_ensemble(source, tmp_path / "feedback.sqlite", bundle_path=path)
        expected = ensemble.transform(pd.DataFrame({"user_id": users}))
        chain = DirectChain(ensemble.graph.output_node)
        pd.testing.assert_frame_equal(chain.transform(users), expected, check_dtype=False)


def test_direct_export_drops_the_workflow_model(tiny_bundle, tmp_path):
    repo = export_ensemble(
        tiny_bundle, tmp_path / "repo", store_path=tmp_path / "f.sqlite", executor="direct"
    )
    assert {p.name for p in repo.iterdir() if p.is_dir()} == {"recommend", "feedback"}
    assert "DirectRecommendModel" in (repo / "recommend" / "1" / "model.py").read_text()
    assert json.loads((repo / "llm_rerank_serving.json").read_text())["executor"] == "direct"
    with pytest.raises(ValueError, match="executor must be one of"):
        export_ensemble(tiny_bundle, tmp_path / "other", store_path=tmp_path / "f.sqlite", executor="fast")
