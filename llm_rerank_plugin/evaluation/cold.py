"""Cold start as a protocol: items and users the fitted chain has never seen an event of.

``run_cold_protocol(config, data)``:

- **Split.** ``evaluation.cold_items`` of the items with at least ``evaluation.cold_min_interactions`` events
  and ``evaluation.cold_users`` of the users are drawn (seeded by ``seed``); every event of a cold item or
  of a cold user is removed from the logs. What is left (the warm logs) is all one bundle is fitted on.
  The catalogue (``data.items``) and the user profiles keep every row: a cold item has its text, a cold
  user their profile, and nothing else.
- **Cold items.** Every warm user with an event on a cold item (and at least one warm event) ranks the
  whole cold-item set; their warm events are the history, the cold items they interacted with are the
  relevant ones (several per user: binary NDCG@10 = DCG/IDCG, Recall@10 = hits / min(relevant, 10)).
- **Cold users.** Every cold user, for each n in ``evaluation.cold_user_events`` they have more than n
  events for: the history is their first n events (by time, ties by row order), the target their
  (n+1)-th; ranking over the catalogue minus those n items.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from llm_rerank_plugin.config import PipelineConfig
from llm_rerank_plugin.data import InteractionData
from llm_rerank_plugin.data.split import with_sequence_position
from llm_rerank_plugin.pipeline.bundle import Bundle, fit
from llm_rerank_plugin.pipeline.text_items import factor_model, fit_item_text_adapter, item_text_matrix
from llm_rerank_plugin.pipeline.train import host_frame
from llm_rerank_plugin.retrieve.base import PAD_ITEM

CUTOFF = 10
COLD_MODEL_DIR = "cold-model"
# Separate seeded streams, so drawing users never changes which items are drawn (and the other way round).
# (text_adapter.RIDGE_STREAM is 4.)
ITEM_STREAM, USER_STREAM, RANDOM_STREAM = 1, 2, 3

COLD_ITEM_RANKERS = (
    "reranker", "reranker+text-adapter", "text-adapter", "text-adapter-mean-user", "text-cosine"
)  # fmt: skip
COLD_PROTOCOL = {
    "split": "evaluation.cold_items of the items with >= evaluation.cold_min_interactions events and "
    "evaluation.cold_users of the users are drawn with seed; every event of a cold item or a cold user is "
    "removed from the logs; one bundle is fitted on the rest (the warm logs) by `llm-rerank fit`'s code; the "
    "catalogue texts and user profiles keep every row",
    "cold_items": "every warm user with an event on a cold item ranks the whole cold-item set; history = "
    "their warm events; relevant = the cold items they interacted with",
    "cold_item_rankers": "reranker: the trained scorer with every retrieval score 0 (text and what log "
    "features remain); reranker+text-adapter: the same scorer with the text adapter's score as retrieval "
    "score; text-adapter: user factor . (ridge map from item text vectors to the retriever's item factors, "
    "fitted on warm items: the bundle's own, retrieval.text_items, else one fitted on items with >= "
    "cold_min_interactions warm events); text-adapter-mean-user: the same map "
    "scored with the mean warm user factor (one order for all: the text's guess of popularity); "
    "text-cosine: cosine of each item's text vector with the mean vector of the user's last "
    "templates.max_history items; random: a seeded permutation",
    "cold_users": "every cold user, per n in evaluation.cold_user_events with > n events: history = their "
    "first n events (time, then row order), target = the (n+1)-th; ranking over the catalogue minus those "
    "n items; reranker: the bundle's cold path (for n = 0 the popularity top retrieval.k; for n >= 1 the "
    "retriever's top retrieval.k from the n items: ALS's factor folded in, merged with the successors of "
    "the newest; reranked with the profile text and the n titles); popularity: the warm logs' counts; "
    "for n >= 1 with ALS retrieval, als-fold-in: the "
    "user's ALS factor solved from their n items with the item factors fixed (popularity order when none "
    "of them has a factor, counted in fold_in_on_popularity), reranker+fold-in: the reranker over its top "
    "retrieval.k",
    "served": "with retrieval.text_items: what the bundle serves each cold-item user over the whole "
    "catalogue (cold items with text-predicted factors competing with every warm item, a "
    "retrieval.text_items.share of the places kept for items without events): the share of their cold "
    "items in the top retrieval.k candidates (hits / min(relevant, k)) and in the reranked top 10 "
    "(stages.llm_rerank.new_item_slots places kept there), and the share of users with at least one",
    "metrics": "NDCG@10 (binary relevance, DCG/IDCG) and Recall@10 (hits in the top 10 / min(relevant, 10)), "
    "averaged over the users; random-expected: the exact mean of a uniformly random order",
}


@dataclass
class ColdSplit:
    """Cold item and user ids (sorted), every event (``events``, with ``event_order``) and the warm logs:
    the events without any of a cold item or a cold user."""

    items: np.ndarray
    users: np.ndarray
    events: pd.DataFrame
    warm: pd.DataFrame
    eligible_items: int


def cold_split(
    interactions: Any, item_share: float, user_share: float, min_interactions: int, seed: int
) -> ColdSplit:
    """Draw the cold items (among those with ``>= min_interactions`` events) and users, seeded; the warm
    logs keep the original columns plus ``event_order`` (the row position in ``interactions``)."""
    frame = with_sequence_position(host_frame(interactions)).drop(columns=["position", "from_end"])
    counts = frame["item_id"].value_counts()
    eligible = np.sort(counts.index[counts.to_numpy() >= min_interactions].to_numpy())
    items = _draw(eligible, item_share, seed, ITEM_STREAM, "evaluation.cold_items", min_interactions)
    users = _draw(np.sort(frame["user_id"].unique()), user_share, seed, USER_STREAM, "evaluation.cold_users")
    cold = frame["item_id"].isin(items.tolist()) | frame["user_id"].isin(users.tolist())
    warm = frame[~cold].reset_index(drop=True)
    if len(warm) == 0:
        raise ValueError(
            "evaluation.cold_items / evaluation.cold_users leave no warm interaction to fit on; expected "
            "smaller shares"
        )
    return ColdSplit(items, users, frame, warm, int(len(eligible)))


def _draw(
    pool: np.ndarray, share: float, seed: int, stream: int, key: str, min_interactions: int | None = None
) -> np.ndarray:
    if share == 0:
        return pool[:0]
    n = int(round(share * len(pool)))
    if n == 0:
        among = f" with >= {min_interactions} events" if min_interactions is not None else ""
        raise ValueError(
            f"{key} = {share} of {len(pool)} candidates{among} rounds to 0; expected a share that leaves at "
            "least one (or 0 to turn the protocol off)"
        )
    chosen = np.random.default_rng([seed, stream]).choice(len(pool), size=n, replace=False)
    return pool[np.sort(chosen)]


# ---------------------------------------------------------------------------------------------- metrics
def ndcg_recall_at(ranked: np.ndarray | list, relevant: set, k: int = CUTOFF) -> tuple[float, float]:
    """Binary-relevance NDCG@k (DCG / ideal DCG) and Recall@k (hits / min(|relevant|, k)) of one list."""
    if not relevant:
        raise ValueError("a user with no relevant item cannot be scored")
    top = list(ranked[:k])
    gains = np.array([item in relevant for item in top], dtype=float)
    discounts = 1.0 / np.log2(np.arange(2, len(top) + 2))
    ideal = (1.0 / np.log2(np.arange(2, min(len(relevant), k) + 2))).sum()
    return float((gains * discounts).sum() / ideal), float(gains.sum() / min(len(relevant), k))


def random_expectation(n_items: int, n_relevant: int, k: int = CUTOFF) -> tuple[float, float]:
    """The exact expected NDCG@k and Recall@k of a uniformly random order of ``n_items`` with
    ``n_relevant`` relevant: every position holds a relevant item with probability n_relevant / n_items."""
    depth = min(k, n_items)
    p = n_relevant / n_items
    ideal = (1.0 / np.log2(np.arange(2, min(n_relevant, k) + 2))).sum()
    dcg = p * (1.0 / np.log2(np.arange(2, depth + 2))).sum()
    return float(dcg / ideal), float(p * depth / min(n_relevant, k))


def _mean_metrics(pairs: list[tuple[float, float]]) -> dict[str, float]:
    values = np.asarray(pairs, dtype=float)
    return {"ndcg@10": float(values[:, 0].mean()), "recall@10": float(values[:, 1].mean())}


# ---------------------------------------------------------------------------------------------- rankers
def _order(item_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
    return item_ids[np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")]


# ---------------------------------------------------------------------------------------------- protocol
def evaluate_cold_items(bundle: Bundle, split: ColdSplit, seed: int, min_interactions: int) -> dict[str, Any]:
    """Every warm user with an event on a cold item ranks the whole cold-item set."""
    reranker = bundle.reranker
    events = split.events
    on_cold = events[
        events["item_id"].isin(split.items.tolist()) & ~events["user_id"].isin(split.users.tolist())
    ]
    relevant = on_cold.groupby("user_id")["item_id"].apply(set).to_dict()
    users = [u for u in sorted(relevant) if reranker.histories.get(u)]
    if not users:
        raise ValueError(
            "evaluation.cold_items: no warm user with an event on a cold item is left to rank them; expected "
            "a larger share"
        )
    items = split.items
    rows = reranker.items.rows(items)
    vectors = reranker.items.vectors
    max_history = reranker.user_template.max_history
    zeros = np.zeros(len(items), np.float32)
    rng = np.random.default_rng([seed, RANDOM_STREAM])

    adapter, adapter_scores, adapter_info = None, None, None
    model = factor_model(bundle.retriever)
    if model is not None:
        # The bundle's own map (retrieval.text_items), else the same fit for the protocol alone.
        adapter = bundle.text_adapter or fit_item_text_adapter(
            bundle.retriever, reranker.items, split.warm, min_interactions, seed
        )
        predicted = adapter.predict(item_text_matrix(reranker.items, rows))
        adapter_info = {**adapter.info, "in_bundle": bundle.text_adapter is not None}
        # The same map scored for the average user: how much of the adapter is a popularity guess from text.
        warm_users = model.user_map.encode(sorted(reranker.histories))
        unpersonalised = predicted @ model.user_factors[warm_users].astype(np.float64).mean(axis=0)

    reranker.prime(users)
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in (*COLD_ITEM_RANKERS, "random")}
    expected = []
    for user in users:
        rel = relevant[user]
        ranked = reranker.rerank(user, items, zeros, top_k=None).item_ids
        results["reranker"].append(ndcg_recall_at(ranked, rel))
        if adapter is not None:
            if user not in model.user_map:
                raise RuntimeError(f"warm user {user!r} has no factor in the bundle's retriever")
            known = model.user_map.encode([user])[0]
            adapter_scores = (predicted @ model.user_factors[known].astype(np.float64)).astype(np.float32)
            results["text-adapter"].append(ndcg_recall_at(_order(items, adapter_scores), rel))
            fused = reranker.rerank(user, items, adapter_scores, top_k=None).item_ids
            results["reranker+text-adapter"].append(ndcg_recall_at(fused, rel))
            results["text-adapter-mean-user"].append(ndcg_recall_at(_order(items, unpersonalised), rel))
        history = reranker.items.rows(reranker.histories[user][:max_history], strict=False)
        history = history[history >= 0]
        mean = vectors[history].mean(axis=0)
        cosine = vectors[rows] @ (mean / max(float(np.linalg.norm(mean)), 1e-12))
        results["text-cosine"].append(ndcg_recall_at(_order(items, cosine), rel))
        results["random"].append(ndcg_recall_at(items[rng.permutation(len(items))], rel))
        expected.append(random_expectation(len(items), len(rel)))
    rankers = {name: _mean_metrics(pairs) for name, pairs in results.items() if pairs}
    rankers["random-expected"] = _mean_metrics(expected)
    out = {
        "items": int(len(items)),
        "eligible_items": split.eligible_items,
        "users": len(users),
        "relevant_per_user": float(np.mean([len(relevant[u]) for u in users])),
        "rankers": rankers,
    }
    if adapter_info is not None:
        out["text_adapter"] = adapter_info
    if bundle.text_adapter is not None:
        out["served"] = served_cold_items(bundle, users, relevant)
    return out


def served_cold_items(bundle: Bundle, users: list[Any], relevant: dict[Any, set]) -> dict[str, Any]:
    """What the bundle serves the cold-item users over the whole catalogue (cold items compete with every
    warm one, their factors predicted from text, a ``retrieval.text_items.share`` of the places kept for
    them): the share of each user's cold items in their top ``retrieval.k`` candidates and in the reranked
    top 10."""
    k = int(bundle.config.retrieval.k)
    candidates = bundle.candidates(users, k=k)
    served = bundle.rank(users, k=CUTOFF)

    def recall(lists: list[np.ndarray], cutoff: int) -> tuple[float, float]:
        hits = [len(relevant[u] & set(row.tolist())) for u, row in zip(users, lists, strict=True)]
        share = [h / min(len(relevant[u]), cutoff) for u, h in zip(users, hits, strict=True)]
        return float(np.mean(share)), float(np.mean([h > 0 for h in hits]))

    in_candidates = recall(list(candidates.item_ids), k)
    in_top = recall([r.item_ids for r in served], CUTOFF)
    return {
        "k": k,
        "kept_places": bundle.config.retrieval.text_items.places(k),
        "new_item_slots": int(bundle.reranker.new_item_slots),
        f"candidates_recall@{k}": in_candidates[0],
        "users_with_one_in_candidates": in_candidates[1],
        f"reranked_recall@{CUTOFF}": in_top[0],
        "users_with_one_in_reranked_top": in_top[1],
    }


def evaluate_cold_users(bundle: Bundle, split: ColdSplit, n_events: list[int]) -> dict[str, Any]:
    """Every cold user ranks the catalogue knowing their profile and first n events, per n."""
    reranker = bundle.reranker
    k = int(bundle.config.retrieval.k)
    events = split.events
    mine = events[events["user_id"].isin(split.users.tolist())].sort_values(
        ["user_id", "timestamp", "event_order"], kind="stable"
    )
    sequences = {
        u: (g["item_id"].to_numpy(), g["timestamp"].to_numpy(dtype=float)) for u, g in mine.groupby("user_id")
    }
    known = [u for u in sequences if bundle.retriever.known_user(u) or bundle.popularity.known_user(u)]
    if known or any(u in reranker.histories for u in sequences):
        raise RuntimeError(f"cold users known to the fitted bundle, e.g. {known[:5]}: the split leaked")
    by_events: dict[str, dict[str, Any]] = {}
    popular = bundle.popularity.recommend(np.asarray([None], dtype=object), k=k + max(n_events, default=0))
    popular_items = popular.item_ids[0][popular.item_ids[0] != PAD_ITEM]
    model = factor_model(bundle.retriever)
    fold_in = model if getattr(model, "algorithm", None) == "als" else None
    for n in n_events:
        users = [u for u, (items, _) in sequences.items() if len(items) > n]
        if not users:
            by_events[str(n)] = {"users": 0}
            continue
        histories = {u: sequences[u][0][:n][::-1].tolist() for u in users}  # newest first
        saved_clock = {u: reranker.last_seen.pop(u, None) for u in users}
        reranker.set_users(histories)
        for u in users:
            if n > 0:  # the time of their latest known event stands for "now", as for every user
                reranker.last_seen[u] = float(sequences[u][1][n - 1])
        try:
            reranker.prime(users)
            candidates = bundle.candidates(users, k=k + n)
            names = ["reranker", "popularity"]
            if fold_in is not None and n > 0:
                names += ["als-fold-in", "reranker+fold-in"]
            pairs: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
            without_factors = 0
            for i, user in enumerate(users):
                seen = set(histories[user])
                target = {sequences[user][0][n]}
                row, scores = candidates.item_ids[i], candidates.scores[i]
                keep = np.flatnonzero((row != PAD_ITEM) & ~np.isin(row, list(seen)))[:k]
                ranked = reranker.rerank(user, row[keep], scores[keep], top_k=CUTOFF).item_ids
                pairs["reranker"].append(ndcg_recall_at(ranked, target))
                floor = popular_items[~np.isin(popular_items, list(seen))]
                pairs["popularity"].append(ndcg_recall_at(floor, target))
                if "als-fold-in" in pairs:
                    if fold_in.knows_any_item(histories[user]):
                        alone = fold_in.recommend_for_histories([user], [histories[user]], k=k)
                        real = alone.item_ids[0] != PAD_ITEM
                        found = (alone.item_ids[0][real], alone.scores[0][real])
                    else:  # every history item is a cold item: popularity is all there is
                        without_factors += 1
                        found = (row[keep], scores[keep])
                    pairs["als-fold-in"].append(ndcg_recall_at(found[0], target))
                    folded = reranker.rerank(user, found[0], found[1], top_k=CUTOFF).item_ids
                    pairs["reranker+fold-in"].append(ndcg_recall_at(folded, target))
        finally:  # the bundle's own users are untouched: cold users leave no state behind
            for u in users:
                reranker.histories.pop(u, None)
                reranker.forget(u)
                reranker.last_seen.pop(u, None)
                if saved_clock[u] is not None:
                    reranker.last_seen[u] = saved_clock[u]
        by_events[str(n)] = {"users": len(users), **{name: _mean_metrics(p) for name, p in pairs.items()}}
        if "als-fold-in" in pairs:
            by_events[str(n)]["fold_in_on_popularity"] = without_factors
    return {"by_events": by_events}


def run_cold_protocol(config: PipelineConfig, data: InteractionData) -> dict[str, Any]:
    """Cold items and cold users under ``COLD_PROTOCOL``; a JSON-ready dict (see the module docstring).
    The warm bundle goes to ``<output_dir>/evaluation/cold-model``."""
    e = config.evaluation
    if e.cold_items == 0 and e.cold_users == 0:
        raise ValueError(
            "evaluation.cold_items and evaluation.cold_users are both 0: the cold-start protocol has nothing "
            "to evaluate; expected a share > 0 in at least one"
        )
    if e.cold_users > 0 and not e.cold_user_events:
        raise ValueError("evaluation.cold_user_events is empty; expected event counts such as [0, 1, 3]")
    if any(n < 0 for n in e.cold_user_events):
        raise ValueError(f"evaluation.cold_user_events must be >= 0, got {e.cold_user_events}")
    started = time.perf_counter()
    split = cold_split(data.interactions, e.cold_items, e.cold_users, e.cold_min_interactions, config.seed)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    bundle = fit(
        config,
        data=data,
        history=split.warm,
        path=config.output_path / "evaluation" / COLD_MODEL_DIR,
        force=True,
    )
    seconds["fit"] = time.perf_counter() - t0
    out: dict[str, Any] = {}
    if e.cold_items > 0:
        t0 = time.perf_counter()
        out["cold_items"] = {
            "share": e.cold_items,
            **evaluate_cold_items(bundle, split, config.seed, e.cold_min_interactions),
        }
        seconds["cold_items"] = time.perf_counter() - t0
    if e.cold_users > 0:
        t0 = time.perf_counter()
        out["cold_users"] = {
            "share": e.cold_users,
            "users": int(len(split.users)),
            **evaluate_cold_users(bundle, split, list(e.cold_user_events)),
        }
        seconds["cold_users"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - started
    out["warm_interactions"] = int(len(split.warm))
    out["bundle"] = str(bundle.path)
    out["protocol"] = dict(COLD_PROTOCOL)
    out["seconds"] = {name: round(value, 2) for name, value in seconds.items()}
    return out
