"""``llm-rerank evaluate --seed`` and ``llm-rerank summarize``: two real evaluate runs of the tiny shop
(seeds 0 and 1) summarised, and the ways runs that do not belong together are refused."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from llm_rerank_plugin.cli import app
from llm_rerank_plugin.config import load_config
from llm_rerank_plugin.data import leave_last_out, load_data
from llm_rerank_plugin.evaluation.metrics import paired_bootstrap
from llm_rerank_plugin.evaluation.summary import summarize_runs
from tests.test_lifecycle import shop_config

runner = CliRunner()


@pytest.fixture(scope="module")
def two_seeds(shop_dir, tiny_bert_dir, tmp_path_factory, single_torch_thread):
    """(config path, [run folder of seed 0, of seed 1]) from `llm-rerank evaluate --seed`."""
    tmp = tmp_path_factory.mktemp("seeds")
    raw = shop_config(tmp, shop_dir, tiny_bert_dir)
    raw["evaluation"] = {
        "stages": ["popularity", "retrieval", "rerank-notext", "rerank-bilinear"],
        "cold_items": 0.3,
        "cold_users": 0.1,
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    runs = []
    for seed in (0, 1):
        out = tmp / f"seed-{seed}"
        args = ["evaluate", "--config", str(path), "--seed", str(seed), "--output-dir", str(out)]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        runs.append(out)
    return path, runs


def _results(folder):
    return json.loads((folder / "results.json").read_text())


def _per_user_ndcg(folder, stage, test):
    """Each test user's NDCG@10 for ``stage``, read straight from rankings.parquet."""
    rankings = pd.read_parquet(folder / "rankings.parquet")
    ranked = rankings[rankings["stage"] == stage]
    rank_of = dict(zip(zip(ranked["user_id"], ranked["item_id"], strict=True), ranked["rank"], strict=True))
    ranks = np.array([rank_of.get((u, i), 0) for u, i in zip(test["user_id"], test["item_id"], strict=True)])
    return np.where((ranks > 0) & (ranks <= 10), 1 / np.log2(np.maximum(ranks, 1) + 1.0), 0.0)


def test_seed_overrides_the_config_and_changes_the_training(two_seeds):
    _, (run0, run1) = two_seeds
    first, second = _results(run0), _results(run1)
    assert (first["config"]["seed"], second["config"]["seed"]) == (0, 1)
    assert first["config"]["output_dir"] == str(run0)
    # The seed moves ALS's initialisation: its lists differ, the popularity order does not.
    rankings = [pd.read_parquet(run / "rankings.parquet") for run in (run0, run1)]
    als = [r[r["stage"] == "als"]["item_id"].tolist() for r in rankings]
    popular = [r[r["stage"] == "popularity"]["item_id"].tolist() for r in rankings]
    assert als[0] != als[1] and popular[0] == popular[1]


def test_summarize_reports_each_run_their_mean_and_the_pooled_comparison(two_seeds, tmp_path):
    path, runs = two_seeds
    target = tmp_path / "deep" / "summary.json"
    result = runner.invoke(app, ["summarize", *map(str, runs), "--output", str(target)])
    assert result.exit_code == 0, result.output
    assert "pooled over the runs" in result.output and "rerank-bilinear vs rerank-notext" in result.output
    summary = json.loads(target.read_text())
    results = [_results(run) for run in runs]
    assert summary["seeds"] == [0, 1] and summary["runs"] == [str(run) for run in runs]
    assert set(summary["stages"]) == {"popularity", "als", "rerank-notext", "rerank-bilinear"}
    for stage, metrics in summary["stages"].items():
        values = [r["stages"][stage]["ndcg@10"] for r in results]
        assert metrics["ndcg@10"]["runs"] == values
        assert metrics["ndcg@10"]["mean"] == pytest.approx(np.mean(values))
        assert metrics["ndcg@10"]["spread"] == pytest.approx(max(values) - min(values))
    # Pooled: each user's difference averaged over the two runs, users resampled as evaluate does.
    config = load_config(path)
    test = leave_last_out(load_data(config.data).interactions).test
    assert summary["users"] == len(test) == results[0]["stages"]["als"]["users"]
    pair = summary["comparisons"]["rerank-bilinear vs rerank-notext"]
    text, notext = (
        [_per_user_ndcg(run, stage, test) for run in runs] for stage in ("rerank-bilinear", "rerank-notext")
    )
    diffs = [a - b for a, b in zip(text, notext, strict=True)]
    expected = paired_bootstrap(np.mean(diffs, axis=0), np.zeros(len(test)), seed=0)
    assert pair["pooled"]["mean_diff"] == pytest.approx(expected["mean_diff"])
    assert pair["pooled"]["ci_low"] == pytest.approx(expected["ci_low"])
    assert pair["pooled"]["ci_high"] == pytest.approx(expected["ci_high"])
    runs_ci = [r["comparisons"]["rerank-bilinear vs rerank-notext"] for r in results]
    assert [c["mean_diff"] for c in pair["runs"]] == [c["mean_diff"] for c in runs_ci]
    assert pair["ci_low_above_zero_in_every_run"] == all(c["ci_low"] > 0 for c in runs_ci)
    # The cold-start protocol ran in both: its rankers' metrics per run and their mean.
    cold = summary["cold"]["cold_items"]["text-cosine"]["ndcg@10"]
    assert cold["runs"] == [r["cold"]["cold_items"]["rankers"]["text-cosine"]["ndcg@10"] for r in results]
    assert "0" in summary["cold"]["cold_users"] and "notes" not in summary


def test_runs_of_different_configs_are_refused_by_name(two_seeds, tmp_path):
    _, (run0, run1) = two_seeds
    other = tmp_path / "other"
    shutil.copytree(run1, other)
    results = _results(other)
    results["config"]["retrieval"]["k"] += 1
    (other / "results.json").write_text(json.dumps(results))
    result = runner.invoke(app, ["summarize", str(run0), str(other), "-o", str(tmp_path / "s.json")])
    assert result.exit_code == 1
    assert "retrieval.k" in result.output and "seed" in result.output
    assert not (tmp_path / "s.json").exists()


def test_rankings_that_disagree_with_their_results_are_refused(two_seeds, tmp_path):
    _, (run0, run1) = two_seeds
    other = tmp_path / "other"
    shutil.copytree(run1, other)
    rankings = pd.read_parquet(other / "rankings.parquet")
    hits = _results(other)["stages"]["rerank-bilinear"]["ndcg@10"]
    assert hits > 0  # the tiny shop's reranker finds some test items, so dropping its top rows shows
    kept = rankings[~((rankings["stage"] == "rerank-bilinear") & (rankings["rank"] <= 3))]
    kept.to_parquet(other / "rankings.parquet", index=False)
    with pytest.raises(ValueError, match="'rerank-bilinear'.*rankings.parquet.*results.json"):
        summarize_runs([run0, other])


def test_runs_without_the_cold_protocol_say_so(two_seeds, tmp_path):
    _, (run0, run1) = two_seeds
    other = tmp_path / "other"
    shutil.copytree(run1, other)
    results = _results(other)
    del results["cold"]
    (other / "results.json").write_text(json.dumps(results))
    summary = summarize_runs([run0, other])
    assert summary["cold"] == {}
    assert summary["notes"] == [f"no cold-start summary: {[str(other)]} ran without the cold-start protocol"]


def test_one_run_or_a_folder_without_results_is_refused(two_seeds, tmp_path):
    _, (run0, _) = two_seeds
    result = runner.invoke(app, ["summarize", str(run0)])
    assert result.exit_code == 1 and "at least two" in result.output
    result = runner.invoke(app, ["summarize", str(run0), str(tmp_path)])
    assert result.exit_code == 1
    assert str(tmp_path) in result.output and "results.json and rankings.parquet" in result.output


def test_a_data_config_this_version_cannot_read_is_named(two_seeds, tmp_path):
    runs = []
    for run in two_seeds[1]:
        copy = tmp_path / run.name
        shutil.copytree(run, copy)
        results = _results(copy)
        results["config"]["data"]["format"] = "old"
        (copy / "results.json").write_text(json.dumps(results))
        runs.append(copy)
    with pytest.raises(ValueError, match=r"seed-0/results.json: its config.data .*format"):
        summarize_runs(runs)


def test_a_cold_user_row_one_run_lacks_is_left_out_with_a_note(two_seeds, tmp_path):
    run0, run1 = two_seeds[1]
    other = tmp_path / "other"
    shutil.copytree(run1, other)
    results = _results(other)
    by_events = results["cold"]["cold_users"]["by_events"]
    last = list(by_events)[-1]
    by_events[last] = {"users": 0}  # what evaluate writes when no cold user has that many events
    (other / "results.json").write_text(json.dumps(results))
    summary = summarize_runs([run0, other])
    assert last not in summary["cold"]["cold_users"] and "0" in summary["cold"]["cold_users"]
    assert summary["notes"] == [f"cold users with {last} events left out: no such user in {[str(other)]}"]


def test_runs_that_took_other_numeric_paths_get_a_note(two_seeds, tmp_path):
    run0, run1 = two_seeds[1]
    path = _results(run0)["environment"]["path"]
    # What this process runs on, recorded by evaluate: the torch kernels and numpy's dispatch targets.
    assert path["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert path["numpy_dispatch"] and _results(run1)["environment"]["path"] == path
    other = tmp_path / "other"
    shutil.copytree(run1, other)
    results = _results(other)
    results["environment"]["path"] = {**path, "torch_cpu_capability": "OTHER", "blas": ["openblas x Haswell"]}
    (other / "results.json").write_text(json.dumps(results))
    summary = summarize_runs([run0, other])
    assert summary["numeric_paths"] == [path, results["environment"]["path"]]
    (note,) = summary["notes"]
    assert note.startswith("the runs took 2 numeric paths") and "torch OTHER" in note and str(other) in note
    del results["environment"]
    (other / "results.json").write_text(json.dumps(results))
    (note,) = summarize_runs([run0, other])["notes"]
    assert "not recorded" in note and str(other) in note
