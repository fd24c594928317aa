"""fit -> bundle -> recommend, on a tiny synthetic shop (string ids, datetimes) with a tiny random BERT."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from llm_rerank_plugin.cli import app
from llm_rerank_plugin.config import load_config
from llm_rerank_plugin.pipeline import Bundle, BundleError, BundleExistsError, fit


def shop_config(tmp_path, data_dir, model_dir, **overrides) -> dict:
    config = {
        "output_dir": str(tmp_path / "out"),
        "data": {
            "source": "files",
            "interactions": str(data_dir / "interactions.parquet"),
            "items": str(data_dir / "items.parquet"),
            "users": str(data_dir / "users.parquet"),
            "columns": {"user_id": "customer", "item_id": "product", "timestamp": "ts"},
            "item_id_column": "sku",
            "user_id_column": "customer",
            "cache_dir": str(tmp_path / "cache"),
        },
        "preprocess": {"user_features": ["segment"], "item_features": ["category"], "text_columns": ["name"]},
        "retrieval": {"k": 20, "factors": 8, "iterations": 3},
        "stages": {
            "llm_rerank": {
                "model": str(model_dir),
                "rank": 4,
                "top_k": 5,
                "aspects": {"overall": None, "name": "{name}", "category": "{category}"},
                "templates": {
                    "item": "{name}. {category} by {brand}. Tags: {tags}.",
                    "item_title": "{name}",
                    "user_profile": "A {segment} shopper in {region}.",
                    "history_prefix": " Recently bought: ",
                    "max_history": 5,
                },
                "train": {"epochs": 2, "max_minutes": 1, "holdout": 2},
            }
        },
        "evaluation": {
            "stages": ["popularity", "retrieval", "rerank-zeroshot", "rerank-notext", "rerank-bilinear"]
        },
    }
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def fitted(shop_dir, tiny_bert_dir, tmp_path_factory, single_torch_thread):
    tmp = tmp_path_factory.mktemp("fit")
    raw = shop_config(tmp, shop_dir, tiny_bert_dir)
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    config = load_config(path)
    return path, config, fit(config)


def test_fit_writes_a_complete_bundle(fitted):
    _, config, bundle = fitted
    folder = config.output_path / "model"
    assert bundle.path == folder
    for part in ("manifest.json", "workflow", "retriever", "popularity", "reranker"):
        assert (folder / part).exists(), part
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["ids"] == {"user": "str", "item": "str"}
    rows = manifest["data"]["rows"]
    assert rows["interactions"] > 0 and rows["users"] > 0 and rows["items"] > 0
    assert manifest["config"]["stages"]["llm_rerank"]["top_k"] == 5
    assert "train" in manifest["training"] and "zeroshot" in manifest["training"]
    assert manifest["version"]


def test_recommend_excludes_history_and_keeps_string_ids(fitted, shop_dir):
    _, config, _ = fitted
    bundle = Bundle.load(config.output_path / "model", config)
    frame = bundle.recommend(k=4)
    assert list(frame.columns[:5]) == ["user_id", "item_id", "rank", "score", "because"]
    assert {"aspect", "retrieval_score"} <= set(frame.columns)
    users = set(bundle.users)
    assert set(frame["user_id"]) == users
    assert all(isinstance(u, str) and u.startswith("C") for u in frame["user_id"])
    assert all(isinstance(i, str) and i.startswith("P") for i in frame["item_id"])
    assert (frame.groupby("user_id").size() <= 4).all()
    assert not frame.duplicated(["user_id", "item_id"]).any()
    logs = pd.read_parquet(shop_dir / "interactions.parquet")
    seen = set(zip(logs["customer"], logs["product"], strict=True))
    assert not any((u, i) in seen for u, i in zip(frame["user_id"], frame["item_id"], strict=True))
    by_user = frame.sort_values(["user_id", "rank"]).groupby("user_id")["score"]
    assert by_user.apply(lambda s: bool((np.diff(s.to_numpy()) <= 1e-6).all())).all()


def test_unknown_user_gets_the_cold_path(fitted):
    _, config, _ = fitted
    bundle = Bundle.load(config.output_path / "model", config)
    frame = bundle.recommend(["C-never-seen"], k=3)
    assert len(frame) == 3 and set(frame["user_id"]) == {"C-never-seen"}
    popular = bundle.popularity.recommend(np.asarray([None], dtype=object), k=3).item_ids[0]
    assert set(frame["item_id"]) == set(popular.tolist())


def test_fit_refuses_to_overwrite_without_force(fitted):
    _, config, _ = fitted
    with pytest.raises(BundleExistsError, match="--force"):
        fit(config)


def test_a_config_with_other_model_settings_cannot_use_the_bundle(fitted, tiny_bert_dir_b):
    _, config, _ = fitted
    other = config.model_copy(deep=True)
    other.stages["llm_rerank"]["model"] = str(tiny_bert_dir_b)
    with pytest.raises(BundleError, match="model"):
        Bundle.load(config.output_path / "model", other)


def test_missing_bundle_names_the_command(tmp_path):
    with pytest.raises(BundleError, match="llm-rerank fit"):
        Bundle.load(tmp_path / "model")


def test_cli_recommend_writes_the_contract_file(fitted, tmp_path):
    path, config, bundle = fitted
    users = tmp_path / "users.txt"
    chosen = bundle.users[:3]
    users.write_text("\n".join(chosen) + "\n")
    result = CliRunner().invoke(app, ["recommend", "--config", str(path), "--users", str(users), "--k", "2"])
    assert result.exit_code == 0, result.output
    frame = pd.read_parquet(config.output_path / "recommendations.parquet")
    assert sorted(frame["user_id"].unique()) == sorted(chosen)
    assert (frame.groupby("user_id").size() == 2).all()
    assert list(frame.columns[:5]) == ["user_id", "item_id", "rank", "score", "because"]


def test_cli_fit_without_force_is_one_clear_line(fitted):
    path, _, _ = fitted
    result = CliRunner().invoke(app, ["fit", "--config", str(path)])
    assert result.exit_code == 1
    assert "already exists" in result.output and "--force" in result.output
    assert "Traceback" not in result.output


def test_cli_bad_k_is_a_config_error(fitted):
    path, _, _ = fitted
    result = CliRunner().invoke(app, ["recommend", "--config", str(path), "--k", "0"])
    assert result.exit_code == 2 and "--k = 0" in result.output


def test_evaluate_fits_on_the_training_part_and_writes_results(shop_dir, tiny_bert_dir, tmp_path):
    from llm_rerank_plugin.evaluation.evaluate import evaluate

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(shop_config(tmp_path, shop_dir, tiny_bert_dir)))
    config = load_config(path)
    result = evaluate(config)
    results = json.loads((config.output_path / "results.json").read_text())
    assert set(results["stages"]) == {
        "popularity",
        "als",
        "rerank-zeroshot",
        "rerank-notext",
        "rerank-bilinear",
    }
    users = results["stages"]["als"]["users"]
    assert all(stage["users"] == users for stage in results["stages"].values())
    assert results["source"]["kind"] == "files"
    # The evaluation bundle never saw a test event: its logs are the split's training part.
    manifest = json.loads((config.output_path / "evaluation" / "model" / "manifest.json").read_text())
    logs = pd.read_parquet(shop_dir / "interactions.parquet")
    assert manifest["data"]["rows"]["interactions"] == len(logs) - users
    # The text model starts from the best of the zero-shot fusion, the ablation's log-only fusion and the
    # fusion of every feature, so on the validation users it never ends below that start; the ablation goes
    # on from the log-only fusion.
    text, ablation = manifest["training"]["train"], manifest["training"]["notext"]
    starts = text["valid_ndcg@10_of_starts"]
    assert set(starts) == {"zeroshot", "log_fusion", "text_fusion"}
    assert text["started_from"] == max(starts, key=lambda name: (starts[name], name == "zeroshot"))
    assert text["valid_ndcg@10_in_candidates"]["full_scorer"] >= max(starts.values())
    assert (
        ablation["valid_ndcg@10_in_candidates"]["full_scorer"]
        >= (ablation["valid_ndcg@10_in_candidates"]["feature_weights_only"])
    )
    rankings = pd.read_parquet(config.output_path / "rankings.parquet")
    assert set(rankings["stage"]) == set(results["stages"])
    assert result.metrics["als"]["ndcg@10"] == results["stages"]["als"]["ndcg@10"]
    # What the language model adds: the text scorer against its no-text ablation, paired over users.
    text_vs_none = results["comparisons"]["rerank-bilinear vs rerank-notext"]
    assert text_vs_none["ci_low"] <= text_vs_none["mean_diff"] <= text_vs_none["ci_high"]
    assert text_vs_none["users"] == users
    assert {"rerank-bilinear vs als", "rerank-notext vs als"} <= set(results["comparisons"])
    # The ablation reads no text: other item vectors (whole and aspect texts) leave its ranking unchanged.
    bundle = Bundle.load(config.output_path / "evaluation" / "model", config)
    test_users = rankings["user_id"].unique()[:20].tolist()
    before = [r.item_ids.tolist() for r in bundle.rank(test_users, k=10, method="notext")]
    items = bundle.reranker.items
    rng = np.random.default_rng(1)
    items.vectors = rng.normal(size=items.vectors.shape).astype(np.float32)
    items.field_vectors = rng.normal(size=items.field_vectors.shape).astype(np.float32)
    for user in test_users:
        bundle.reranker.forget(user)
    after = [r.item_ids.tolist() for r in bundle.rank(test_users, k=10, method="notext")]
    assert before == after


def test_dask_recommend_equals_one_process(fitted, tmp_path):
    """LocalCluster with 2 worker processes, users in 3 partitions: the same rows as one process."""
    from llm_rerank_plugin.pipeline.distributed import recommend_distributed

    _, config, _ = fitted
    bundle = Bundle.load(config.output_path / "model", config)
    users = bundle.users
    local = bundle.recommend(users, k=4, chunk=16)
    target = tmp_path / "recommendations.parquet"
    summary = recommend_distributed(
        bundle, users, target, "local:2", k=4, partition_users=32, chunk=16, progress=False
    )
    assert summary["workers"] == 2 and summary["parts"] == -(-len(users) // 32)
    spread = pd.read_parquet(target)
    assert summary["rows"] == len(spread) == len(local)
    pd.testing.assert_frame_equal(spread.reset_index(drop=True), local.reset_index(drop=True))


def test_scheduler_must_be_local_n_or_an_address(fitted, tmp_path):
    from llm_rerank_plugin.config import ConfigError
    from llm_rerank_plugin.pipeline.distributed import recommend_distributed

    _, config, bundle = fitted
    with pytest.raises(ConfigError, match="local:N"):
        recommend_distributed(bundle, bundle.users, tmp_path / "r", "local:zero", progress=False)


def test_a_bundle_fitted_with_the_int8_encoder_reloads_with_it(shop_dir, tiny_bert_dir, tmp_path):
    raw = shop_config(tmp_path, shop_dir, tiny_bert_dir)
    raw["stages"]["llm_rerank"]["encoder_backend"] = "onnx-int8"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    config = load_config(path)
    fit(config)
    bundle = Bundle.load(config.output_path / "model", config)
    assert bundle.reranker.encoder.backend == "onnx-int8"
    frame = bundle.recommend(bundle.users[:5] + ["C-new"], k=3)
    assert frame["user_id"].nunique() == 6
    torch_config = config.model_copy(deep=True)
    torch_config.stages["llm_rerank"]["encoder_backend"] = "torch"
    with pytest.raises(BundleError, match="encoder_backend"):
        Bundle.load(config.output_path / "model", torch_config)


def test_bench_times_the_fitted_bundle_on_its_retrieval_candidates(fitted):
    from llm_rerank_plugin.evaluation.bench import run_bench

    _, config, _ = fitted
    result = run_bench(config, n_requests=3, cross_requests=1, threads=1)
    assert "fitted bundle" in result["candidates"]
    for row in ("warm", "cold", "online_warm"):
        assert result[row]["requests"] == 3 and result[row]["p50_ms"] > 0
    assert (config.output_path / "bench.json").is_file()


def test_scale_bench_runs_at_small_factors(tiny_bert_dir, tmp_path):
    from llm_rerank_plugin.config import PipelineConfig

    config = PipelineConfig.model_validate(
        {
            "output_dir": str(tmp_path / "out"),
            "retrieval": {"k": 20, "factors": 8, "iterations": 3},
            "stages": {"llm_rerank": {"model": str(tiny_bert_dir), "rank": 4,
                                      "train": {"epochs": 1, "max_minutes": 1, "max_users": 40}}},
        }
    )  # fmt: skip
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    result = CliRunner().invoke(
        app, ["scale-bench", "--config", str(path), "--factors", "0.02,0.04", "--workers", "2"]
    )
    assert result.exit_code == 0, result.output
    scale = json.loads((tmp_path / "out" / "scale.json").read_text())
    rows = scale["rows"]
    assert [r["factor"] for r in rows] == [0.02, 0.04]
    assert rows[1]["users"] > rows[0]["users"] and rows[1]["interactions"] > rows[0]["interactions"]
    for row in rows:
        assert set(row["recommend_users_per_s"]) == {"2"}
        assert row["fit_seconds"] > 0 and row["encode_items_per_s"] > 0 and row["peak_rss_mb"] > 0
        assert row["environment"]["path"]["torch_cpu_capability"]  # measured in the factor's own process
    assert set(scale["slopes_vs_interactions"]) >= {"fit_seconds", "peak_rss_mb"}


def test_a_loaded_bundle_reads_its_own_vocabulary(fitted):
    """The workflow's schema keeps the fit-time staging path; the vocabulary comes from the loaded copy."""
    _, config, _ = fitted
    bundle = Bundle.load(config.output_path / "model", config)
    users = bundle.preprocessor.vocabulary("user_id")
    assert set(bundle.users) <= set(u for u in users.tolist() if u is not None)


def test_cli_export_writes_the_triton_repository(fitted, tmp_path):
    path, _, _ = fitted
    result = CliRunner().invoke(app, ["export", "--config", str(path), "--to", str(tmp_path / "repo")])
    assert result.exit_code == 0, result.output
    for model in ("recommend", "feedback"):
        config = (tmp_path / "repo" / model / "config.pbtxt").read_text()
        assert f'name: "{model}"' in config
    assert "TYPE_STRING" in (tmp_path / "repo" / "recommend" / "config.pbtxt").read_text()  # string user ids
    again = CliRunner().invoke(app, ["export", "--config", str(path), "--to", str(tmp_path / "repo")])
    assert again.exit_code == 1 and "--force" in again.output
    bad = CliRunner().invoke(
        app, ["export", "--config", str(path), "--to", str(tmp_path / "r2"), "--executor", "x"]
    )
    assert bad.exit_code == 2 and "merlin or direct" in bad.output


def test_a_user_who_has_seen_everything_gets_no_rows_not_an_error(fitted):
    _, config, _ = fitted
    bundle = Bundle.load(config.output_path / "model", config)
    user = bundle.users[0]
    everything = bundle.reranker.items.item_ids
    bundle.retriever.seen[bundle.retriever.user_map.encode([user])[0], :] = 1.0  # as if all were in the logs
    frame = bundle.recommend([user, bundle.users[1]], k=3)
    assert set(frame["user_id"]) == {bundle.users[1]} and len(everything) > 3


def test_run_serves_every_user_through_the_plugin_manager(fitted):
    from llm_rerank_plugin.platform.pipeline import run_pipeline

    _, config, _ = fitted
    bundle = Bundle.load(config.output_path / "model", config)
    summary = run_pipeline(config, progress=False, bundle=bundle, users=bundle.users[:7])
    assert summary["final_stage"] == "llm_rerank" and summary["users"] == 7
    recs = pd.read_parquet(config.output_path / "recommendations.parquet")
    assert list(recs.columns[:5]) == ["user_id", "item_id", "rank", "score", "because"]
    assert sorted(recs["user_id"].unique()) == sorted(bundle.users[:7])
    assert (recs.groupby("user_id").size() == 5).all()


def test_training_lists_are_scored_from_the_events_before_each_target(shop_dir, tiny_bert_dir, tmp_path):
    """Each held-out target's candidates come from the fit-part retriever with every event before that target
    folded in: those events are excluded from its list, the target and later events are not."""
    from llm_rerank_plugin.data import load_data
    from llm_rerank_plugin.data.split import hold_out_last, with_sequence_position
    from llm_rerank_plugin.pipeline.chain import Chain
    from llm_rerank_plugin.pipeline.train import RerankerTrainer
    from llm_rerank_plugin.rerank.text import HistoryIndex

    raw = shop_config(tmp_path, shop_dir, tiny_bert_dir)
    raw["retrieval"]["sequential"] = {"weight": 0.5}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    config = load_config(path)
    data = load_data(config.data)
    history = with_sequence_position(data.interactions)
    trainer = RerankerTrainer(Chain(config, data, history, tmp_path / "work"), seed=0)
    lists = trainer.training_lists()
    _, held = hold_out_last(trainer.inner, config.llm_rerank().train.holdout)
    index = HistoryIndex(trainer.inner)
    assert len(lists.users) == len(held)
    for i, (user, position, target) in enumerate(held[["user_id", "position", "item_id"]].itertuples(False)):
        before = set(index.recent(user, before_position=int(position), n=int(position)))
        assert not set(lists.item_ids[i].tolist()) & before, f"list {i} holds items the user had before it"
        if lists.target_col[i] >= 0:
            assert lists.item_ids[i, lists.target_col[i]] == target
    assert (lists.target_col >= 0).any()
    # A user's targets have different histories before them, so (nearly always) different lists; one
    # fit-time list per user would repeat itself for each of their targets.
    users = lists.users.tolist()
    repeated = [u for u in set(users) if users.count(u) > 1]
    assert repeated
    differing = sum(
        len({tuple(lists.item_ids[i].tolist()) for i in np.flatnonzero(lists.users == u)}) > 1
        for u in repeated
    )
    assert differing > 0.9 * len(repeated)
