"""``llm-rerank scale-bench``: how fit time, encoding, recommend throughput and memory grow with the data.

For each factor the synthetic shop (``generate_shop(scale=factor)``: 2,000 users, 1,500 items and about
50,000 events per unit) is written, the whole chain is fitted on it in a fresh process (so its peak memory
is that fit's own), the catalogue encoding speed is measured on a sample of item texts, and recommend is
run on a Dask ``LocalCluster`` of 1, 2, ... single-threaded worker processes over a sample of users, with
the bundle loaded on every worker before the clock starts. The config gives the model and training
settings (``retrieval``, ``stages.llm_rerank``: encoder, backend, rank, training budget, ``max_users``);
the data, preprocessing, templates and aspects are the shop's (``SHOP_SETTINGS``).

``<output_dir>/scale.json``: ``{"rows": [{"factor", "users", "items", "interactions", "fit_seconds",
"encode_items_per_s", "recommend_users_per_s": {"1": .., "2": ..}, "peak_rss_mb"}], "slopes": {...}}``
with the log-log slope of each cost against the number of events.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llm_rerank_plugin.config import PipelineConfig
from llm_rerank_plugin.evaluation.environment import numeric_environment

ENCODE_SAMPLE = 2000
RECOMMEND_SAMPLE = 4096
# The shop's own columns (examples/shop.yaml says the same).
SHOP_SETTINGS: dict[str, Any] = {
    "data": {
        "source": "files",
        "columns": {"user_id": "customer", "item_id": "product", "timestamp": "ts"},
        "item_id_column": "sku",
        "user_id_column": "customer",
    },
    "preprocess": {
        "user_features": ["segment", "region"],
        "item_features": ["brand", "category"],
        "text_columns": ["name", "category"],
    },
    "aspects": {
        "overall": None,
        "product": "{name}",
        "category": "{category}. Tags: {tags}",
        "brand": "{brand}",
    },
    "templates": {
        "item": "{name}. {category}. Tags: {tags}. {description}",
        "item_title": "{name}",
        "user_profile": "A {segment} shopper from the {region}.",
        "history_prefix": " Recently bought: ",
    },
}


def shop_config(config: PipelineConfig, data_dir: Path, out_dir: Path) -> PipelineConfig:
    """``config``'s model and training settings on the synthetic shop at ``data_dir``."""
    raw = config.model_dump(mode="json")
    raw["output_dir"] = str(out_dir)
    raw["data"] = {
        **SHOP_SETTINGS["data"],
        "interactions": str(data_dir / "interactions.parquet"),
        "items": str(data_dir / "items.parquet"),
        "users": str(data_dir / "users.parquet"),
        "cache_dir": str(out_dir / "cache"),
    }
    raw["preprocess"] = SHOP_SETTINGS["preprocess"]
    stage = dict(raw["stages"].get("llm_rerank", {}))
    stage["aspects"] = SHOP_SETTINGS["aspects"]
    stage["templates"] = {**stage.get("templates", {}), **SHOP_SETTINGS["templates"]}
    raw["stages"] = {**raw["stages"], "llm_rerank": stage}
    return PipelineConfig.model_validate(raw)


def measure_factor(config: PipelineConfig, factor: float, folder: Path, workers: Sequence[int]) -> dict:
    """One row of scale.json, measured in this process (run it in a fresh one: ``peak_rss_mb``)."""
    from llm_rerank_plugin.data.synthetic import generate_shop
    from llm_rerank_plugin.pipeline import fit
    from llm_rerank_plugin.pipeline.distributed import recommend_distributed

    counts = generate_shop(folder / "data", scale=factor, seed=config.seed)
    cfg = shop_config(config, folder / "data", folder / "out")
    t0 = time.perf_counter()
    bundle = fit(cfg, force=True)
    fit_seconds = time.perf_counter() - t0
    encoder = bundle.reranker.encoder
    texts = bundle.reranker.items.texts[:ENCODE_SAMPLE]
    t0 = time.perf_counter()
    encoder.encode(texts)
    encode_rate = len(texts) / (time.perf_counter() - t0)
    users = bundle.users[:RECOMMEND_SAMPLE]
    rates = {}
    for n in workers:
        timing = recommend_distributed(
            bundle, users, folder / f"recommend-{n}", f"local:{n}", progress=False, partition_users=None,
            chunk=256, warm_workers=True,
        )  # fmt: skip
        rates[str(n)] = round(len(users) / timing["seconds"], 1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    return {
        "factor": factor,
        "users": int(counts["users"]),
        "items": int(counts["items"]),
        "interactions": int(bundle.manifest["data"]["rows"]["interactions"]),
        "fit_seconds": round(fit_seconds, 1),
        "encode_items_per_s": round(encode_rate, 1),
        "recommend_users_per_s": rates,
        "recommend_users_sampled": len(users),
        "peak_rss_mb": round(peak, 1),
        # Each factor runs in its own process: record the kernels that process used, after its work.
        "environment": numeric_environment(),
    }


def log_log_slope(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Slope of log(y) against log(x): 1 = linear growth, 0 = constant."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = (x > 0) & (y > 0)
    if keep.sum() < 2:
        return None
    return float(np.polyfit(np.log(x[keep]), np.log(y[keep]), 1)[0])


def run_scale_bench(
    config: PipelineConfig, factors: Sequence[float], workers: Sequence[int] = (1, 2)
) -> dict[str, Any]:
    """Measure every factor in its own process; write ``<output_dir>/scale.json`` and return it."""
    if not factors or any(not f > 0 for f in factors):
        raise ValueError(f"--factors must be positive numbers, e.g. 1,10; got {list(factors)}")
    if not workers or any(w < 1 for w in workers):
        raise ValueError(f"workers must be >= 1, got {list(workers)}")
    root = config.output_path / "scale"
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for factor in factors:
        folder = root / f"factor-{factor:g}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(config.model_dump_json())
        command = [sys.executable, "-m", "llm_rerank_plugin.evaluation.scale", str(folder), str(factor),
                   ",".join(str(w) for w in workers)]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"scale-bench factor {factor:g} failed:\n{done.stderr.strip()[-2000:]}")
        rows.append(json.loads((folder / "row.json").read_text()))
    events = [r["interactions"] for r in rows]
    slopes = {
        "fit_seconds": log_log_slope(events, [r["fit_seconds"] for r in rows]),
        "peak_rss_mb": log_log_slope(events, [r["peak_rss_mb"] for r in rows]),
        "recommend_users_per_s_1": log_log_slope(events, [r["recommend_users_per_s"]["1"] for r in rows])
        if "1" in rows[0]["recommend_users_per_s"]
        else None,
    }
    result = {"rows": rows, "slopes_vs_interactions": slopes}
    (config.output_path / "scale.json").write_text(json.dumps(result, indent=2))
    return result


def _main(folder: str, factor: str, workers: str) -> None:  # pragma: no cover - runs in the child
    path = Path(folder)
    config = PipelineConfig.model_validate_json((path / "config.json").read_text())
    row = measure_factor(config, float(factor), path, [int(w) for w in workers.split(",")])
    (path / "row.json").write_text(json.dumps(row))


if __name__ == "__main__":  # pragma: no cover
    _main(*sys.argv[1:4])
