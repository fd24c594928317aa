"""The rerank stages of ``llm-rerank evaluate``: zero-shot, trained bilinear, cross-encoder cascade.

Each ranks the test users' retrieval candidates with the bundle that ``Protocol`` fitted on the training
part (see ``llm_rerank_plugin.pipeline.train`` for how the reranker is trained without leaks).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from llm_rerank_plugin.config import ConfigError
from llm_rerank_plugin.evaluation.protocol import Protocol
from llm_rerank_plugin.rerank.reranker import Ranking
from llm_rerank_plugin.retrieve.base import PAD_ITEM


def rankings_matrix(rankings: Sequence[Ranking], k: int) -> tuple[np.ndarray, np.ndarray]:
    """(U, k) item ids (padded with PAD_ITEM) and scores (-inf at padding) from per-user rankings."""
    dtype = np.int64 if all(r.item_ids.dtype.kind in "iu" for r in rankings) else object
    items = np.full((len(rankings), k), PAD_ITEM, dtype=dtype)
    scores = np.full((len(rankings), k), -np.inf, dtype=np.float32)
    for i, ranking in enumerate(rankings):
        n = min(k, len(ranking.item_ids))
        items[i, :n], scores[i, :n] = ranking.item_ids[:n], ranking.scores[:n]
    return items, scores


def _ranked(protocol: Protocol, method: str) -> tuple[np.ndarray, np.ndarray, list[Ranking]]:
    k = protocol.config.retrieval.k
    rankings = protocol.bundle.rank(protocol.users, k=k, method=method)
    return (*rankings_matrix(rankings, k), rankings)


def zeroshot(protocol: Protocol) -> tuple[np.ndarray, np.ndarray, dict]:
    """Retrieval score fused with the cosine of the recent-history vector; weight chosen on validation."""
    items, scores, _ = _ranked(protocol, "zeroshot")
    return items, scores, dict(protocol.bundle.manifest["training"].get("zeroshot", {}))


def bilinear(protocol: Protocol) -> tuple[np.ndarray, np.ndarray, dict]:
    items, scores, _ = _ranked(protocol, "bilinear")
    return items, scores, dict(protocol.bundle.manifest["training"].get("train", {}))


def notext(protocol: Protocol) -> tuple[np.ndarray, np.ndarray, dict]:
    """The ablation: the same scorer and fusion trained and applied with every text input removed."""
    if protocol.bundle.notext_scorer is None:
        raise ConfigError(
            "rerank-notext needs the no-text scorer, which fit trains only when the stage is asked for "
            "(evaluation.stages or --stage) before the bundle is fitted"
        )
    items, scores, _ = _ranked(protocol, "notext")
    return items, scores, dict(protocol.bundle.manifest["training"].get("notext", {}))


def cross(protocol: Protocol) -> tuple[np.ndarray, np.ndarray, dict]:
    """The cross-encoder reorders the bilinear top ``cross.top_m``; the rest keep the bilinear order."""
    bundle = protocol.bundle
    if bundle.cross_encoder is None:
        raise ConfigError(
            "evaluation.stages lists rerank-cross, but stages.llm_rerank.cross.enabled is false, so fit "
            "trains "
            "no cross-encoder; enable it or drop the stage"
        )
    items, scores, rankings = _ranked(protocol, "bilinear")
    m = bundle.config.llm_rerank().cross.top_m
    reranker = bundle.reranker
    texts = reranker.items.texts
    pairs, sizes = [], []
    for ranking in rankings:
        top = ranking.item_ids[:m]
        user_text = reranker.context(ranking.user_id).text
        pairs += [(user_text, texts[r]) for r in reranker.items.rows(top)]
        sizes.append(len(top))
    t0 = time.perf_counter()
    logits = bundle.cross_encoder.predict(pairs)
    predict_seconds = time.perf_counter() - t0
    start = 0
    for i, n in enumerate(sizes):
        block = logits[start : start + n]
        order = np.argsort(-block, kind="stable")
        items[i, :n] = items[i, :n][order]
        # Shift the logits above the untouched tail so that sorting by score still gives the ranks.
        tail = scores[i, n:][np.isfinite(scores[i, n:])]
        floor = float(tail.max()) + 1.0 if len(tail) else 0.0
        scores[i, :n] = block[order] - block.min() + floor
        start += n
    info: dict[str, Any] = dict(bundle.manifest["training"].get("cross", {}))
    info.update(top_m=m, predict_seconds=round(predict_seconds, 1), pairs=len(pairs))
    return items, scores, info


def _stage(method):
    def run(protocol: Protocol):
        from llm_rerank_plugin.evaluation.evaluate import StageRanking

        items, scores, info = method(protocol)
        return StageRanking(items, scores, info)

    return run


RERANK_STAGES = {
    "rerank-zeroshot": _stage(zeroshot),
    "rerank-notext": _stage(notext),
    "rerank-bilinear": _stage(bilinear),
    "rerank-cross": _stage(cross),
}
