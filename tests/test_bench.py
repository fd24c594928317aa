"""run_bench on the tiny reranker: the structure of bench.json (never timing thresholds)."""

from __future__ import annotations

import json
import math
import sys
import types

import numpy as np
import pandas as pd
import pytest
import torch

from llm_rerank_plugin.config import PipelineConfig
from llm_rerank_plugin.evaluation.bench import (
    MissingArtifactError,
    load_trained_reranker,
    make_requests,
    reranker_artifact,
    run_bench,
    summarize,
    torch_threads,
)

ROW_KEYS = {"p50_ms", "p99_ms", "mean_ms", "requests_per_s", "requests"}


@pytest.fixture(scope="module")
def onnx_home(tmp_path_factory):
    return tmp_path_factory.mktemp("bench-cache")


@pytest.fixture(autouse=True)
def _cache_in_tmp(onnx_home, monkeypatch):
    """The cold_onnx_int8 row exports the tiny BERT under $LLM_RERANK_CACHE/onnx: keep it out of ~."""
    monkeypatch.setenv("LLM_RERANK_CACHE", str(onnx_home))


@pytest.fixture(scope="module")
def tiny_cross(tiny_bert_dir):
    from llm_rerank_plugin.rerank.cross import CrossEncoder

    return CrossEncoder(str(tiny_bert_dir), device="cpu", max_length=64)


def check_row(row, requests):
    assert ROW_KEYS <= set(row), row
    assert row["requests"] == requests
    for key in ROW_KEYS - {"requests"}:
        assert math.isfinite(row[key]) and row[key] > 0, (key, row)
    assert row["p50_ms"] <= row["p99_ms"]


@pytest.fixture
def fake_operator(monkeypatch):
    """Stands in for llm_rerank_plugin.platform.operator.LLMRerank (written elsewhere)."""
    from merlin.dag import BaseOperator

    class LLMRerank(BaseOperator):
        def __init__(self, reranker, top_k=10):
            super().__init__()
            self.reranker, self.top_k = reranker, top_k

        def transform(self, col_selector, df):
            parts = []
            for user, group in df.groupby("user_id", sort=False):
                r = self.reranker.rerank(
                    user, group["item_id"].to_numpy(), group["score"].to_numpy(), self.top_k
                )
                parts.append(pd.DataFrame({"user_id": user, "item_id": r.item_ids, "score": r.scores}))
            return pd.concat(parts, ignore_index=True)

    module = types.ModuleType("llm_rerank_plugin.platform.operator")
    module.LLMRerank = LLMRerank
    monkeypatch.setitem(sys.modules, "llm_rerank_plugin.platform.operator", module)
    return LLMRerank


def test_run_bench_writes_every_row(
    tiny_reranker, tiny_cross, tmp_path, fake_operator, onnx_home, monkeypatch
):
    from llm_rerank_plugin.rerank.encoder import TextEncoder

    # Every text the encoders actually run (a spy: the real method still encodes).
    embedded: list[str] = []
    embed = TextEncoder._embed

    def counting_embed(self, batch):
        embedded.extend(batch)
        return embed(self, batch)

    monkeypatch.setattr(TextEncoder, "_embed", counting_embed)
    config = PipelineConfig(output_dir=str(tmp_path / "out"))
    threads = torch.get_num_threads()
    histories = {u: list(h) for u, h in tiny_reranker.histories.items()}
    encoder = tiny_reranker.encoder
    result = run_bench(
        config, reranker=tiny_reranker, n_requests=4, cross_encoder=tiny_cross, cross_requests=2, threads=1
    )
    assert torch.get_num_threads() == threads  # the global setting is restored
    written = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert written == json.loads(json.dumps(result))
    for row in ("warm", "cold", "online_warm", "merlin_graph", "cold_torch", "cold_onnx_int8"):
        check_row(result[row], 4)
    assert result["cold_torch"]["backend"] == "torch" and result["cold_onnx_int8"]["backend"] == "onnx-int8"
    assert "own encoder" in result["cold_torch"]["encoder"]  # the tiny reranker's is torch on the CPU
    assert "built for the bench" in result["cold_onnx_int8"]["encoder"]
    speedup = result["cold_onnx_int8_speedup"]
    assert set(speedup) == {"p50", "p99"} and all(math.isfinite(v) and v > 0 for v in speedup.values())
    check_row(result["cross_encoder"], 2)
    assert result["online_warm"]["users_with_feedback"] == result["users"] == 1
    assert result["speedup_vs_cross_encoder"] > 0 and math.isfinite(result["speedup_vs_cross_encoder"])
    machine = result["machine"]
    assert machine["cpu_count"] >= 1 and machine["torch_threads"] == 1 and machine["processor"]
    assert machine["numeric_path"]["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert result["candidates"].startswith("random") and result["candidates_per_request"] == 10
    assert not list((tmp_path / "out").glob("bench-*")), "the throwaway feedback store is removed"
    assert tiny_reranker.histories == histories, "the seeded feedback's history moves are undone"
    assert tiny_reranker.encoder is encoder and encoder.backend == "torch", "the bench swaps encoders back"
    assert list((onnx_home / "onnx").glob("*/model-int8.onnx")), "exported under $LLM_RERANK_CACHE/onnx"
    # The one bench user's text is encoded by every cold request (4 timed per cold row, plus the warm-ups),
    # not answered from the memory of encoded texts.
    user_text = tiny_reranker.context(42).text
    assert embedded.count(user_text) >= 3 * 4


def test_merlin_row_is_skipped_with_a_note_when_the_operator_is_missing(
    tiny_reranker, tiny_cross, tmp_path, monkeypatch
):
    monkeypatch.setitem(sys.modules, "llm_rerank_plugin.platform.operator", None)  # import fails
    config = PipelineConfig(output_dir=str(tmp_path))
    result = run_bench(
        config, reranker=tiny_reranker, n_requests=2, cross_encoder=tiny_cross, cross_requests=1, threads=1
    )
    assert "skipped" in result["merlin_graph"] and "LLMRerank" in result["merlin_graph"]["skipped"]
    check_row(result["warm"], 2)


def test_cold_backend_rows_use_the_configured_cache_and_say_why_they_are_skipped(
    tiny_reranker, tiny_cross, tmp_path, monkeypatch
):
    monkeypatch.setitem(sys.modules, "llm_rerank_plugin.platform.operator", None)
    config = PipelineConfig(output_dir=str(tmp_path / "out"), data={"cache_dir": str(tmp_path / "cache")})
    result = run_bench(
        config, reranker=tiny_reranker, n_requests=2, cross_encoder=tiny_cross, cross_requests=1, threads=1
    )
    check_row(result["cold_onnx_int8"], 2)
    assert list((tmp_path / "cache" / "onnx").glob("*/model-int8.onnx")), "data.cache_dir/onnx is used"

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails: a named skip, not torch
    result = run_bench(
        config, reranker=tiny_reranker, n_requests=2, cross_encoder=tiny_cross, cross_requests=1, threads=1
    )
    assert "onnxruntime" in result["cold_onnx_int8"]["skipped"] and "p50_ms" not in result["cold_onnx_int8"]
    assert "cold_onnx_int8_speedup" not in result
    check_row(result["cold_torch"], 2)


def test_given_online_reranker_is_used_as_is(tiny_reranker, tiny_cross, tmp_path, monkeypatch):
    from llm_rerank_plugin.feedback import FusionParams, SQLiteUserStateStore
    from llm_rerank_plugin.feedback.online import OnlineReranker

    monkeypatch.setitem(sys.modules, "llm_rerank_plugin.platform.operator", None)
    with SQLiteUserStateStore(tmp_path / "mine.sqlite") as store:
        online = OnlineReranker(tiny_reranker, store, FusionParams())
        online.record({"event_id": "mine", "user_id": "42", "kind": "like", "item_id": "3"})
        config = PipelineConfig(output_dir=str(tmp_path / "out"))
        result = run_bench(
            config,
            reranker=tiny_reranker,
            online=online,
            n_requests=2,
            cross_encoder=tiny_cross,
            cross_requests=1,
            threads=1,
        )
        assert [seq for seq, _ in store.events("42")] == [1], "the bench wrote into the caller's store"
    assert result["online_warm"]["users_with_feedback"] == 1


def test_missing_trained_reranker_names_the_command_to_run(tmp_path):
    config = PipelineConfig(output_dir=str(tmp_path))
    with pytest.raises(MissingArtifactError, match="llm-rerank fit"):
        load_trained_reranker(config)
    with pytest.raises(MissingArtifactError):
        run_bench(config, n_requests=1)


def test_the_trained_reranker_lives_in_the_bundle(tmp_path):
    config = PipelineConfig(output_dir=str(tmp_path))
    assert reranker_artifact(config) == tmp_path / "model" / "reranker"


def test_random_requests_without_known_users(tiny_reranker, tmp_path):
    tiny_reranker.histories.clear()
    tiny_reranker.profiles.clear()
    requests, source = make_requests(PipelineConfig(output_dir=str(tmp_path)), tiny_reranker, n_users=3)
    assert source.startswith("random") and len(requests) == 3
    for r in requests:
        assert len(set(r.item_ids.tolist())) == len(r.item_ids) == 10
        assert np.all(np.diff(r.scores) <= 0)


def test_summarize_and_threads():
    row = summarize([0.001, 0.002, 0.003])
    assert row["p50_ms"] == pytest.approx(2.0) and row["requests"] == 3
    assert row["requests_per_s"] == pytest.approx(500.0)
    with pytest.raises(ValueError, match="at least one"):
        summarize([])
    before = torch.get_num_threads()
    with torch_threads(1) as used:
        assert used == torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_merlin_row_with_the_real_operator(tiny_reranker, tiny_cross, tmp_path):
    config = PipelineConfig(output_dir=str(tmp_path))
    result = run_bench(
        config, reranker=tiny_reranker, n_requests=2, cross_encoder=tiny_cross, cross_requests=1, threads=1
    )
    check_row(result["merlin_graph"], 2)
