"""Metrics against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from llm_rerank_plugin.evaluation.metrics import ranking_metrics, target_ranks


def test_hand_computed_metrics():
    ranked = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9], [1, 3, 5]])
    targets = np.array([1, 6, 42, 5])  # ranks 1, 3, absent, 3
    assert target_ranks(ranked, targets).tolist() == [1, 3, 0, 3]
    m = ranking_metrics(ranked, targets, cutoffs=(1, 2, 3))
    assert m["ndcg@10"] == pytest.approx((1 + 2 * (1 / math.log2(4))) / 4)
    assert m["recall@1"] == pytest.approx(0.25)
    assert m["recall@2"] == pytest.approx(0.25)
    assert m["recall@3"] == pytest.approx(0.75)
    assert m["mrr@10"] == pytest.approx((1 + 1 / 3 + 1 / 3) / 4)
    assert m["users"] == 4


def test_rank_beyond_ten_counts_for_recall_only():
    ranked = np.arange(100)[None, :]
    m = ranking_metrics(ranked, np.array([10]), cutoffs=(10, 20))  # rank 11
    assert m["ndcg@10"] == 0 and m["mrr@10"] == 0 and m["recall@10"] == 0 and m["recall@20"] == 1


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="one row per target"):
        ranking_metrics(np.zeros((2, 3)), np.zeros(3))


def test_paired_bootstrap_interval():
    import numpy as np

    from llm_rerank_plugin.evaluation.metrics import ndcg_per_user, paired_bootstrap

    same = paired_bootstrap(np.ones(50), np.ones(50))
    assert same["mean_diff"] == same["ci_low"] == same["ci_high"] == 0.0
    rng = np.random.default_rng(0)
    b = rng.random(400)
    better = paired_bootstrap(b + 0.1 + rng.normal(0, 0.05, 400), b, seed=3)
    assert 0 < better["ci_low"] < better["mean_diff"] < better["ci_high"]
    assert paired_bootstrap(b, b + 0.1, seed=3)["ci_high"] < 0
    assert ndcg_per_user(np.array([1, 0, 3, 11])).tolist() == [1.0, 0.0, 0.5, 0.0]
