"""Ranking metrics for leave-one-out evaluation: one held-out item per user, full ranking.

A user whose held-out item is not in their ranked list scores 0 on every metric; every user counts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_CUTOFFS = (10, 20, 50, 100)


def target_ranks(ranked_items: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """1-based rank of each user's target in their ranked list (U, K); 0 where it is absent."""
    ranked_items = np.asarray(ranked_items)
    targets = np.asarray(targets)
    if ranked_items.ndim != 2 or len(ranked_items) != len(targets):
        raise ValueError(
            f"ranked_items must be (users, K) with one row per target; got {ranked_items.shape} for "
            f"{len(targets)} targets"
        )
    hits = ranked_items == targets[:, None]
    found = hits.any(axis=1)
    return np.where(found, hits.argmax(axis=1) + 1, 0)


def ranking_metrics(
    ranked_items: np.ndarray, targets: np.ndarray, cutoffs: Sequence[int] = DEFAULT_CUTOFFS
) -> dict[str, float]:
    """NDCG@10, Recall@k for each cutoff, MRR@10, averaged over all users.

    With one relevant item per user, Recall@k is the hit rate at k, NDCG@k = 1/log2(rank + 1) when
    rank <= k, and MRR@k = 1/rank when rank <= k.
    """
    ranks = target_ranks(ranked_items, targets)
    return metrics_from_ranks(ranks, cutoffs)


def metrics_from_ranks(ranks: np.ndarray, cutoffs: Sequence[int] = DEFAULT_CUTOFFS) -> dict[str, float]:
    """The metrics of ``ranking_metrics`` from 1-based target ranks (0 = not ranked)."""
    ranks = np.asarray(ranks)
    if len(ranks) == 0:
        raise ValueError("no users to evaluate")
    hit = ranks > 0
    safe = np.where(hit, ranks, 1)
    out = {"ndcg@10": float(np.mean(np.where(hit & (ranks <= 10), 1.0 / np.log2(safe + 1), 0.0)))}
    for k in cutoffs:
        out[f"recall@{k}"] = float(np.mean(hit & (ranks <= k)))
    out["mrr@10"] = float(np.mean(np.where(hit & (ranks <= 10), 1.0 / safe, 0.0)))
    out["users"] = int(len(ranks))
    return out


def ndcg_per_user(ranks: np.ndarray, k: int = 10) -> np.ndarray:
    """Each user's NDCG@k from the 1-based rank of their one target (0 = not ranked)."""
    ranks = np.asarray(ranks)
    return np.where((ranks > 0) & (ranks <= k), 1.0 / np.log2(np.maximum(ranks, 1) + 1), 0.0)


def paired_bootstrap(
    a: np.ndarray, b: np.ndarray, n_resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> dict[str, float]:
    """Mean of the per-user difference ``a - b`` and its percentile bootstrap CI (users resampled with
    replacement, the same users for both: a paired comparison)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"expected two equal-length 1-D arrays of per-user values; got {a.shape}, {b.shape}")
    diff = a - b
    rng = np.random.default_rng(seed)
    means = np.array([diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(n_resamples)])
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return {"mean_diff": float(diff.mean()), "ci_low": float(low), "ci_high": float(high), "level": level,
            "resamples": n_resamples, "users": int(len(diff))}  # fmt: skip
