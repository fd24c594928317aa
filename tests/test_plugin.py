"""The llm_rerank plugin through the platform contract (entry points off: registered as a built-in)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from hooks import RecsysPluginManager, StageConfigError
from llm_rerank_plugin.platform import plugin
from llm_rerank_plugin.platform.stage import StageRequestError


@pytest.fixture
def manager():
    return RecsysPluginManager(builtins=[("llm_rerank", plugin)], load_entrypoints=False)


def test_registers_the_final_ranking_stage(manager):
    spec = manager.stages()["llm_rerank"]
    assert spec.final and spec.kind == "ranking" and spec.plugin == "llm_rerank"


def test_bad_stage_config_names_key_and_value(manager):
    with pytest.raises(StageConfigError) as err:
        manager.validate_stage_config("llm_rerank", {"top_k": 0, "scorer": "gpt", "modle": "x"})
    message = str(err.value)
    assert "stages.llm_rerank.top_k = 0" in message
    assert "stages.llm_rerank.scorer = 'gpt'" in message
    assert "stages.llm_rerank.modle = 'x': unknown key" in message


def test_build_needs_a_context(manager):
    with pytest.raises(ValueError, match="needs 'reranker'"):
        manager.build_stage("llm_rerank", {}, {})


def test_rank_and_feedback_through_the_manager(manager, tiny_reranker, tmp_path):
    context = {"reranker": tiny_reranker, "store_path": tmp_path / "fb.sqlite"}
    stage = manager.build_stage("llm_rerank", {"top_k": 3}, context)
    candidates = pd.DataFrame({"item_id": [3, 4, 6, 7, 8], "score": [0.9, 0.8, 0.7, 0.6, 0.5]})
    first = manager.run_rank("llm_rerank", {"user_id": 42, "candidates": candidates}, stage.rank)
    assert len(first.item_ids) == 3
    acks = manager.send_feedback(
        "llm_rerank", {"event_id": "e1", "user_id": 42, "kind": "dislike", "item_id": int(first.item_ids[0])}
    )
    assert acks == [True]
    again = manager.run_rank("llm_rerank", {"user_id": 42, "candidates": candidates}, stage.rank)
    assert first.item_ids[0] not in again.item_ids


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        ({"candidates": []}, "must be a dict with 'user_id'"),
        ({"user_id": 1, "candidates": pd.DataFrame({"item": [1]})}, r"lack columns \['item_id', 'score'\]"),
        ({"user_id": 1}, "needs 'candidates'"),
        ({"user_id": 1, "item_ids": np.array([]), "scores": np.array([])}, "has no candidates"),
    ],
)
def test_bad_requests_are_clear(request_, message):
    with pytest.raises(StageRequestError, match=message):
        from llm_rerank_plugin.platform.stage import LLMRerankStage

        LLMRerankStage.parse_request(request_)


def test_cross_scorer_needs_an_encoder_and_reorders_the_top(manager, tiny_reranker, tiny_bert_dir, tmp_path):
    from llm_rerank_plugin.rerank.cross import CrossEncoder

    context = {"reranker": tiny_reranker, "store_path": tmp_path / "fb.sqlite"}
    with pytest.raises(ValueError, match="scorer: cross needs a fine-tuned cross-encoder"):
        manager.build_stage("llm_rerank", {"scorer": "cross"}, context)
    cross = CrossEncoder(str(tiny_bert_dir), device="cpu", max_length=64)
    section = {"scorer": "cross", "top_k": 5, "cross": {"top_m": 3}}
    stage = manager.build_stage("llm_rerank", section, {**context, "cross_encoder": cross})
    request = {"user_id": 42, "item_ids": [3, 4, 6, 7, 8, 9], "scores": [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]}
    bilinear = tiny_reranker.rerank(42, request["item_ids"], request["scores"], top_k=None)
    ranked = stage.rank(request)
    assert len(ranked.item_ids) == 5
    top3 = bilinear.item_ids[:3]
    logits = cross.predict(
        [
            (tiny_reranker.context(42).text, tiny_reranker.items.texts[r])
            for r in tiny_reranker.items.rows(top3)
        ]
    )
    assert list(ranked.item_ids[:3]) == list(top3[np.argsort(-logits, kind="stable")])
    assert list(ranked.item_ids[3:]) == list(bilinear.item_ids[3:5])
    assert (np.diff(ranked.scores) <= 1e-6).all()
