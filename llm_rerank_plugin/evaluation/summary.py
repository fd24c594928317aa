"""``llm-rerank summarize``: several ``evaluate`` runs of one protocol (seeds, usually) as one table.

Per stage, each metric's value in every run, their mean, standard deviation and spread (max - min). Per
paired comparison of ``results.json``, each run's difference and 95% CI, and the comparison pooled over the
runs: each user's NDCG@10 difference averaged over the runs, then the users resampled (paired bootstrap).
The runs repeat the same test users, so pooling narrows the training noise between runs, not the
uncertainty of the user sample. Every per-user value is recomputed from the runs' ``rankings.parquet`` and
the data's split, and checked against the run's own ``results.json``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import ValidationError

from llm_rerank_plugin.config import DataConfig
from llm_rerank_plugin.data import leave_last_out, load_data
from llm_rerank_plugin.evaluation.metrics import ndcg_per_user, paired_bootstrap
from llm_rerank_plugin.pipeline.train import host_frame

# Recomputed metrics must equal the run's own to float rounding: anything more means other data.
_TOLERANCE = 1e-9
# Config keys that runs of one protocol may differ in (dotted paths).
_MAY_DIFFER = ("seed", "output_dir", "data.cache_dir")


def summarize_runs(run_dirs: Sequence[str | Path], seed: int = 0, n_resamples: int = 2000) -> dict[str, Any]:
    """Summarise ``evaluate`` output folders (each with ``results.json`` and ``rankings.parquet``) that share
    one dataset and one stage list. Returns the summary (``summary.json``'s content); raises ``ValueError``
    naming the folder and what differs when the runs are not comparable."""
    if len(run_dirs) < 2:
        raise ValueError(f"summarize needs at least two evaluate output folders; got {len(run_dirs)}")
    folders = [Path(d) for d in run_dirs]
    results = [_read_results(folder) for folder in folders]
    first, first_folder = results[0], folders[0]
    for folder, run in zip(folders[1:], results[1:], strict=True):
        differ = _config_differences(run["config"], first["config"])
        if _fingerprint(run) != _fingerprint(first):
            differ.append("the data (fingerprint)")
        if _stage_names(run) != _stage_names(first):
            differ.append(f"the stages ({_stage_names(run)} vs {_stage_names(first)})")
        if differ:
            raise ValueError(
                f"{folder} and {first_folder} are not runs of one config: {', '.join(differ)} differ; "
                f"expected evaluate runs that differ only in {', '.join(_MAY_DIFFER)}"
            )
    try:
        data_config = DataConfig.model_validate(first["config"]["data"])
    except ValidationError as exc:
        raise ValueError(
            f"{first_folder}/results.json: its config.data is not one this version reads "
            f"({exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}); expected the output of this version's "
            "`llm-rerank evaluate`"
        ) from None
    data = load_data(data_config)
    if data.source.get("fingerprint") != _fingerprint(first):
        raise ValueError(
            f"the data the runs were evaluated on (fingerprint {_fingerprint(first)}) is not what their "
            f"config loads now (fingerprint {data.source.get('fingerprint')}); expected the same data files"
        )
    test = leave_last_out(host_frame(data.interactions)).test[["user_id", "item_id"]]
    stages = _stage_names(first)
    per_user = [
        _ndcg_per_user(folder, run, test, stages) for folder, run in zip(folders, results, strict=True)
    ]
    summary_stages = {
        stage: {
            metric: _spread([run["stages"][stage][metric] for run in results])
            for metric in first["stages"][stage]
            if metric != "users"
        }
        for stage in stages
    }
    comparisons = {}
    for pair in first["comparisons"]:
        a, b = pair.split(" vs ")
        pooled = paired_bootstrap(
            np.mean([run[a] for run in per_user], axis=0),
            np.mean([run[b] for run in per_user], axis=0),
            n_resamples=n_resamples,
            seed=seed,
        )
        runs = [run["comparisons"][pair] for run in results]
        comparisons[pair] = {
            "runs": [{k: c[k] for k in ("mean_diff", "ci_low", "ci_high")} for c in runs],
            "ci_low_above_zero_in_every_run": all(c["ci_low"] > 0 for c in runs),
            "pooled": pooled,
        }
    summary = {
        "runs": [str(folder) for folder in folders],
        "seeds": [run["config"]["seed"] for run in results],
        "dataset": first.get("dataset"),
        "users": int(len(test)),
        "stages": summary_stages,
        "comparisons": comparisons,
        "pooling": "per user, the NDCG@10 difference averaged over the runs, then the users resampled "
        f"{n_resamples} times (paired bootstrap, seed {seed}); the runs share their test users, so this "
        "narrows the noise between runs, not the uncertainty of the user sample",
    }
    summary["numeric_paths"] = [(run.get("environment") or {}).get("path") for run in results]
    summary["cold"], notes = _cold_summary(folders, results)
    notes += _path_notes(folders, summary["numeric_paths"])
    if notes:
        summary["notes"] = notes
    return summary


def _read_results(folder: Path) -> dict[str, Any]:
    path = folder / "results.json"
    if not path.is_file() or not (folder / "rankings.parquet").is_file():
        raise ValueError(
            f"{folder} is not an evaluate output folder: expected results.json and rankings.parquet "
            "(written by `llm-rerank evaluate`)"
        )
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); expected evaluate's results.json") from None
    missing = [key for key in ("stages", "comparisons", "config", "source") if key not in results]
    if missing:
        raise ValueError(f"{path} lacks {missing}; expected the results.json of `llm-rerank evaluate`")
    return results


def _config_differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted config keys whose values differ, outside ``_MAY_DIFFER``."""
    out = []
    for key in sorted(set(a) | set(b)):
        path = f"{prefix}{key}"
        if path in _MAY_DIFFER:
            continue
        left, right = a.get(key), b.get(key)
        if isinstance(left, dict) and isinstance(right, dict):
            out += _config_differences(left, right, f"{path}.")
        elif left != right:
            out.append(path)
    return out


def _fingerprint(results: dict[str, Any]) -> str | None:
    return (results.get("source") or {}).get("fingerprint")


def _stage_names(results: dict[str, Any]) -> list[str]:
    return list(results["stages"])


def _ndcg_per_user(
    folder: Path, results: dict[str, Any], test: pd.DataFrame, stages: list[str]
) -> dict[str, np.ndarray]:
    """Each stage's per-user NDCG@10 in the split's test-user order, from the run's rankings."""
    rankings = pd.read_parquet(folder / "rankings.parquet", columns=["user_id", "item_id", "rank", "stage"])
    unknown = set(rankings["user_id"]) - set(test["user_id"])
    if unknown:
        raise ValueError(
            f"{folder}/rankings.parquet ranks {len(unknown)} users that are not test users of the data "
            f"(e.g. {sorted(map(str, unknown))[:3]}); expected the rankings of this data's split"
        )
    out = {}
    for stage in stages:
        ranked = rankings[rankings["stage"] == stage]
        hit = test.merge(ranked, on=["user_id", "item_id"], how="left")
        per_user = ndcg_per_user(hit["rank"].fillna(0).to_numpy(dtype=np.int64))
        recomputed = float(per_user.mean())
        reported = results["stages"][stage]["ndcg@10"]
        if abs(recomputed - reported) > _TOLERANCE:
            raise ValueError(
                f"{folder}: stage {stage!r} scores NDCG@10 {recomputed:.6f} from rankings.parquet but "
                f"{reported:.6f} in results.json; expected the two files of one run on this data"
            )
        out[stage] = per_user
    return out


def _spread(values: list[float]) -> dict[str, Any]:
    array = np.asarray(values, dtype=float)
    return {
        "runs": [float(v) for v in array],
        "mean": float(array.mean()),
        "std": float(array.std(ddof=1)),
        "spread": float(array.max() - array.min()),
    }


def _path_notes(folders: list[Path], paths: list[dict[str, Any] | None]) -> list[str]:
    """A note when the runs did not all take one numeric path (``evaluation.environment``)."""
    unrecorded = [str(f) for f, path in zip(folders, paths, strict=True) if path is None]
    if unrecorded:
        return [
            f"the numeric path (CPU kernels) of {unrecorded} is not recorded: their results.json predates "
            "it, so whether all runs took one path is unknown"
        ]
    groups: dict[str, tuple[str, list[str]]] = {}
    for folder, path in zip(folders, paths, strict=True):
        widest = path["numpy_dispatch"][-1] if path["numpy_dispatch"] else "baseline"
        blas = ", ".join(path["blas"]) or "none loaded"
        label = f"torch {path['torch_cpu_capability']}, numpy {widest}, BLAS {blas}"
        groups.setdefault(json.dumps(path, sort_keys=True), (label, []))[1].append(str(folder))
    if len(groups) == 1:
        return []
    described = "; ".join(f"{label}: {runs}" for label, runs in groups.values())
    return [
        f"the runs took {len(groups)} numeric paths ({described}); their figures differ by how ties and "
        "float rounding fall on each path as well as by seed"
    ]


def _cold_summary(folders: list[Path], results: list[dict[str, Any]]) -> tuple[dict[str, Any], list[str]]:
    """Each cold-start ranker's metrics over the runs (the cold sets are drawn per seed, so each run ranks
    its own), and notes on what was left out: everything unless every run has the protocol, a number of
    events no cold user of some run had."""
    lacking = [str(folder) for folder, run in zip(folders, results, strict=True) if not run.get("cold")]
    if lacking:
        return {}, [f"no cold-start summary: {lacking} ran without the cold-start protocol"]
    out: dict[str, Any] = {}
    colds = [run["cold"] for run in results]
    if all(cold.get("cold_items") for cold in colds):
        rankers = [cold["cold_items"]["rankers"] for cold in colds]
        out["cold_items"] = {
            ranker: {metric: _spread([r[ranker][metric] for r in rankers]) for metric in values}
            for ranker, values in rankers[0].items()
        }
    notes = []
    if all(cold.get("cold_users") for cold in colds):
        by_events = [cold["cold_users"]["by_events"] for cold in colds]
        out["cold_users"] = {}
        for n, row in by_events[0].items():
            empty = [str(f) for f, b in zip(folders, by_events, strict=True) if not b[n].get("users")]
            if empty:
                notes.append(f"cold users with {n} events left out: no such user in {empty}")
                continue
            out["cold_users"][n] = {
                ranker: {metric: _spread([b[n][ranker][metric] for b in by_events]) for metric in values}
                for ranker, values in row.items()
                if isinstance(values, dict)
            }
    return out, notes
