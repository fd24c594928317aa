"""``llm-rerank stream-eval``: does real-time feedback help? A replay of each user's latest interactions.

Protocol:

- The stream: each user's last ``n_events`` interactions (``evaluation.stream_events``) over train +
  valid + test, in time order; at least one earlier interaction per user stays outside it.
- One retriever (the configured kind) is fitted on everything *before* the streams (all interactions
  minus every user's stream) and shared by all arms; a user's candidates are its top ``retrieval.k``
  items not seen before the stream. The reranker's user histories and popularity prior are reset to the
  same pre-stream data for the replay (and restored afterwards).
- For each stream event in order: rank the candidates minus the items already consumed in the stream,
  record the rank of the event's item (NDCG@10 and Recall@10; 0 when it is not in the top 10), then:
    - ``on``: feed the event back through ``OnlineReranker.record`` as a ``rating`` event with its star
      value (>= 4 positive, <= 2 negative, 3 neutral), so it steers the next ranking;
    - ``off``: nothing changes: the user state is the static pre-stream one;
    - ``retrieval``: the retrieval order alone, for context;
    - ``live`` (a second replay from the same pre-stream state, with a feedback log of its own): as
      ``on``, and after each event the user's candidates are fetched again from the bundle, which scores
      a user with events since the fit from their moved history (ALS's factor folded in, the successors
      of their newest items): the candidates follow the feedback too, as they do in serving;
      ``retrieval-live``: those candidates in their own order.
  ``on`` and ``off`` use the same trained reranker, candidates and events; on a user's first stream
  event they rank identically (no feedback yet). A user's clock (``UserContext.now``, which the trending
  feature counts back from) starts at their last pre-stream event; in the ``on`` arm each recorded event
  moves it to that event's time, as serving would, while the ``off`` arm's stays put.

Cost: the ``off`` arm encodes each user's text once (then cached). The ``on`` arm deliberately keeps that
text vector fixed and lets the fusion state and the moved history (the recent- and last-item features,
computed from precomputed item vectors) carry the feedback, which is the real-time serving design of
OnlineReranker: no transformer pass per event. What remains per event is two ~1 ms reranks and one
fsync'd append to a throwaway SQLite log (the state snapshot is skipped: ``persist_state=False``), so
ML-100k (943 users x 10 events) took 70 s to 4 min on 2 shared CPU cores (the spread: other load).
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from llm_rerank_plugin.config import PipelineConfig
from llm_rerank_plugin.data import InteractionData, load_data
from llm_rerank_plugin.evaluation.bench import torch_threads
from llm_rerank_plugin.evaluation.environment import numeric_environment
from llm_rerank_plugin.evaluation.metrics import metrics_from_ranks, ndcg_per_user, paired_bootstrap
from llm_rerank_plugin.feedback.online import OnlineReranker, fusion_params
from llm_rerank_plugin.feedback.store import SQLiteUserStateStore
from llm_rerank_plugin.pipeline import Bundle, fit

if TYPE_CHECKING:
    from llm_rerank_plugin.rerank.reranker import LLMReranker
    from llm_rerank_plugin.retrieve.base import Candidates

log = logging.getLogger(__name__)

METRIC_K = 10
ARMS = ("on", "off", "retrieval")
LIVE_ARMS = ("live", "retrieval-live")  # replay_live: the candidates follow the feedback as well
COMPARISONS = (("on", "off"), ("live", "on"), ("retrieval-live", "retrieval"), ("live", "retrieval-live"))


def split_streams(interactions: pd.DataFrame, n_events: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(everything before the streams, the streams): each user's last ``n_events`` interactions, keeping
    at least one earlier interaction per user out of the stream. Both sorted by (user, time, file order)."""
    from llm_rerank_plugin.data.split import hold_out_last

    if n_events < 1:
        raise ValueError(f"n_events must be >= 1, got {n_events}")
    before, stream = hold_out_last(interactions, n_events)
    return before, stream


def _pandas(frame: Any) -> pd.DataFrame:
    return frame if isinstance(frame, pd.DataFrame) else frame.to_pandas()  # cuDF on a GPU machine


@contextlib.contextmanager
def _pre_stream_users(reranker: LLMReranker, before: pd.DataFrame, users: list[Any]) -> Iterator[None]:
    """Reset the reranker's histories, clocks and popularity to the pre-stream data; restore afterwards.

    A user's clock (``last_seen``, the request time of their context) is their last pre-stream event, as
    for an offline evaluation; the on arm's feedback moves it forward, the off arm's stays.
    """
    from llm_rerank_plugin.pipeline.train import set_serving_state

    saved_histories = {u: list(h) for u, h in reranker.histories.items()}
    saved_clock = dict(reranker.last_seen)
    saved_stats = reranker.items.history_stats()
    set_serving_state(reranker, before, reranker.user_template.max_history)
    try:
        yield
    finally:
        reranker.items.restore_history_stats(saved_stats)
        reranker.last_seen.clear()
        reranker.last_seen.update(saved_clock)
        reranker.histories.clear()
        reranker.set_users(saved_histories)
        for u in users:  # their contexts were built from pre-stream histories
            reranker.forget(u)


def _rank_of(ranked: np.ndarray, item: Any) -> int:
    hits = np.flatnonzero(ranked[:METRIC_K] == item)
    return int(hits[0]) + 1 if len(hits) else 0


def replay(
    reranker: LLMReranker,
    online: OnlineReranker,
    candidates: Candidates,
    stream: pd.DataFrame,
    arms: tuple[str, ...] = ARMS,
    keep_lists: bool = False,
) -> pd.DataFrame:
    """Replay the streams; one row per (user, event) with ``rank_<arm>`` (1-based within the top
    ``METRIC_K``, 0 = not there) for each arm, plus ``ranked_<arm>`` top lists when ``keep_lists``.

    ``candidates``: the shared retrieval candidates (original ids, one row per stream user). ``stream``:
    ``user_id``, ``item_id``, ``rating``, ``timestamp`` rows in time order per user; the timestamp is the
    recorded event's time, so the on arm's clock (``UserContext.now``, trending features) follows the
    replay, as it would follow the wall clock in serving. The ``off`` arm runs over every user
    before the ``on`` arm starts, because ``on`` moves the reranker's histories (``observe``) and the
    plain path would then re-encode the moved text.
    """
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ValueError(f"unknown arms {unknown}; expected some of {ARMS}")
    events = _user_events(candidates, stream)
    lists = [_rerankable(reranker, candidates.item_ids[i], candidates.scores[i]) for _, i, _ in events]
    out = _event_rows(events)

    def run(arm: str) -> None:
        ranks, tops = [], []
        for (user, _, pairs), (items, scores) in zip(events, lists, strict=True):
            consumed = np.zeros(len(items), bool)
            for n, (item, rating, timestamp) in enumerate(pairs):
                left = ~consumed
                cand, sc = items[left], scores[left]
                if len(cand) == 0:
                    ranked = cand
                elif arm == "retrieval":
                    ranked = cand[:METRIC_K]
                elif arm == "off":
                    ranked = reranker.rerank(user, cand, sc, top_k=METRIC_K).item_ids
                else:
                    ranked = online.rerank(user, cand, sc, top_k=METRIC_K).item_ids
                ranks.append(_rank_of(ranked, item))
                if keep_lists:
                    tops.append(np.asarray(ranked[:METRIC_K]).tolist())
                if arm == "on":
                    _record(online, user, n, item, rating, timestamp)
                consumed |= items == item
        out[f"rank_{arm}"] = np.asarray(ranks, dtype=np.int64)
        if keep_lists:
            out[f"ranked_{arm}"] = tops

    for arm in sorted(arms, key=lambda a: a == "on"):  # "on" last: it moves the histories
        run(arm)
    return out


def replay_live(
    reranker: LLMReranker,
    online: OnlineReranker,
    candidates: Candidates,
    refresh: Callable[[Any], tuple[np.ndarray, np.ndarray]],
    stream: pd.DataFrame,
) -> pd.DataFrame:
    """The ``on`` arm with candidates that follow the feedback too: after each recorded event the user's
    candidates are fetched again (``refresh(user) -> (item_ids, scores)``: the bundle's ``candidates``,
    which score a user with events since the fit from their moved history). One row per (user, event), as
    ``replay`` gives them, with ``rank_live`` (the online rerank of those candidates) and
    ``rank_retrieval-live`` (their own order). Start from the same pre-stream state and a fresh store:
    this records every event again."""
    events = _user_events(candidates, stream)
    out = _event_rows(events)
    ranks: dict[str, list[int]] = {"live": [], "retrieval-live": []}
    for user, i, pairs in events:
        items, scores = _rerankable(reranker, candidates.item_ids[i], candidates.scores[i])
        consumed: set = set()
        for n, (item, rating, timestamp) in enumerate(pairs):
            left = np.fromiter((x not in consumed for x in items.tolist()), bool, len(items))
            cand, sc = items[left], scores[left]
            reranked = online.rerank(user, cand, sc, top_k=METRIC_K).item_ids if len(cand) else cand
            ranks["live"].append(_rank_of(reranked, item))
            ranks["retrieval-live"].append(_rank_of(cand[:METRIC_K], item))
            _record(online, user, n, item, rating, timestamp)
            consumed.add(item)
            items, scores = _rerankable(reranker, *refresh(user))
    for arm, values in ranks.items():
        out[f"rank_{arm}"] = np.asarray(values, dtype=np.int64)
    return out


def _user_events(candidates: Candidates, stream: pd.DataFrame) -> list[tuple[Any, int, list[tuple]]]:
    """(user, candidate row, [(item, rating, timestamp), ...]) for each stream user with candidates."""
    by_user = {u: i for i, u in enumerate(candidates.user_ids.tolist())}
    events = []
    for user, group in stream.groupby("user_id", sort=False):
        if user not in by_user:
            continue
        columns = (
            group["item_id"].tolist(),
            group["rating"].astype(float).tolist(),
            group["timestamp"].astype(float).tolist(),
        )
        events.append((user, by_user[user], list(zip(*columns, strict=True))))
    return events


def _event_rows(events: list[tuple[Any, int, list[tuple]]]) -> pd.DataFrame:
    rows: dict[str, list] = {"user_id": [], "item_id": [], "position": [], "rating": []}
    for user, _, pairs in events:
        for position, (item, rating, _) in enumerate(pairs):
            rows["user_id"].append(user)
            rows["item_id"].append(item)
            rows["position"].append(position)
            rows["rating"].append(rating)
    return pd.DataFrame(rows)


def _rerankable(
    reranker: LLMReranker, items: np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Padding and items outside the reranker's catalogue cannot be reranked: dropped for every arm."""
    from llm_rerank_plugin.retrieve.base import PAD_ITEM

    keep = (items != PAD_ITEM) & (reranker.items.rows(items, strict=False) >= 0)
    return items[keep], scores[keep].astype(np.float32)


def _record(online: OnlineReranker, user: Any, n: int, item: Any, rating: float, timestamp: float) -> None:
    online.record(
        {
            "event_id": f"stream-{user}-{n}",
            "user_id": str(user),
            "kind": "rating",
            "item_id": str(item),
            "rating": min(max(rating, 0.5), 5.0),
            "timestamp": timestamp,
        }
    )


def _gain(new: float, old: float) -> float | None:
    """new/old - 1; None only when old is 0 and new is not (an unbounded gain); 0/0 is no gain."""
    return new / old - 1.0 if old > 0 else (0.0 if new == 0 else None)


def compare_arms(
    replayed: pd.DataFrame, pairs: tuple[tuple[str, str], ...], seed: int = 0
) -> dict[str, dict[str, float]]:
    """``"a vs b"`` -> paired-bootstrap 95% CI of the difference of each user's mean NDCG@10 over their
    stream events (users resampled: a user's events are not independent of each other)."""
    per_event = {arm: ndcg_per_user(replayed[f"rank_{arm}"].to_numpy()) for pair in pairs for arm in pair}
    users = replayed["user_id"].to_numpy()
    per_user = {
        arm: pd.Series(values).groupby(users, sort=True).mean().to_numpy()
        for arm, values in per_event.items()
    }
    return {f"{a} vs {b}": paired_bootstrap(per_user[a], per_user[b], seed=seed) for a, b in pairs}


def summarize_arms(replayed: pd.DataFrame, arms: tuple[str, ...] = ARMS) -> dict[str, Any]:
    """Per arm: NDCG@10, Recall@10, MRR@10 and the event count (scalars only, one table row per arm),
    plus ``by_position``: arm -> NDCG@10 at each stream position (does the gain grow with feedback?)."""
    result: dict[str, Any] = {"by_position": {}}
    for arm in arms:
        ranks = replayed[f"rank_{arm}"].to_numpy()
        metrics = metrics_from_ranks(ranks, cutoffs=(METRIC_K,))
        result[arm] = {
            "ndcg@10": metrics["ndcg@10"],
            "recall@10": metrics[f"recall@{METRIC_K}"],
            "mrr@10": metrics["mrr@10"],
            "events": int(len(ranks)),
        }
        by_pos = replayed.groupby("position")[f"rank_{arm}"].apply(
            lambda r: metrics_from_ranks(r.to_numpy(), cutoffs=(METRIC_K,))["ndcg@10"]
        )
        result["by_position"][arm] = [float(v) for v in by_pos.tolist()]
    return result


def run_stream_eval(
    config: PipelineConfig,
    bundle: Bundle | None = None,
    n_events: int | None = None,
    *,
    data: InteractionData | None = None,
    max_users: int | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Run the replay described in the module docstring, write ``stream.json``, return its content.

    Returns ``{"on": {...}, "off": {...}, "retrieval": {...}, "relative_gain": on/off - 1 (NDCG@10),
    "users": U, "n_events": n, "by_position": {arm: [NDCG@10 per stream position]}, ...}``; each arm has
    the scalars ``ndcg@10``, ``recall@10``, ``mrr@10``, ``events``.

    Args:
        bundle: a chain fitted on the pre-stream events; default: fitted here (into
            ``<output_dir>/stream/model``). Its reranker's histories and popularity are reset for the replay
            and restored afterwards.
        data: the data set; default the configured one.
        n_events: stream length per user; default ``evaluation.stream_events``.
        max_users: replay only this many users (a seeded sample), for quick looks.
        threads: torch threads while encoding user texts (restored afterwards); default unchanged.
    """
    started = time.perf_counter()
    n = int(n_events or config.evaluation.stream_events)
    data = data or load_data(config.data)
    interactions = _pandas(data.interactions)
    before, stream = split_streams(interactions, n)
    users = stream["user_id"].drop_duplicates().to_numpy()
    if max_users is not None and max_users < len(users):
        rng = np.random.default_rng(config.seed)
        users = np.sort(rng.choice(users, size=max_users, replace=False))
        stream = stream[stream["user_id"].isin(users)]
    if len(users) == 0:
        raise ValueError(
            f"no user has an interaction stream: every user needs at least 2 interactions (one before the "
            f"stream), got {len(interactions)} interactions"
        )
    if bundle is None:
        # The whole chain is fitted on the pre-stream events only, so nothing of the streams leaks into it.
        bundle = fit(
            config, data=data, history=before, path=config.output_path / "stream" / "model", force=True
        )
    reranker = bundle.reranker
    candidates = bundle.candidates(users, k=config.retrieval.k)
    fit_seconds = time.perf_counter() - started

    out_dir = config.output_path
    out_dir.mkdir(parents=True, exist_ok=True)
    feedback = config.llm_rerank().feedback

    @contextlib.contextmanager
    def pre_stream(name: str) -> Iterator[OnlineReranker]:
        """The pre-stream state and a throwaway feedback log of its own, for one replay."""
        with contextlib.ExitStack() as stack:
            if threads:
                stack.enter_context(torch_threads(threads))
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="stream-", dir=out_dir)))
            store = stack.enter_context(SQLiteUserStateStore(folder / f"feedback-{name}.sqlite"))
            stack.enter_context(_pre_stream_users(reranker, before, users.tolist()))
            params = fusion_params(feedback)
            yield OnlineReranker(reranker, store, params, feedback.weight, persist_state=False)

    def refresh(user: Any) -> tuple[np.ndarray, np.ndarray]:
        found = bundle.candidates([user], k=config.retrieval.k)
        return found.item_ids[0], found.scores[0]

    with pre_stream("on") as online:
        replayed = replay(reranker, online, candidates, stream)
    with pre_stream("live") as online:
        live = replay_live(reranker, online, candidates, refresh, stream)
    for arm in LIVE_ARMS:
        replayed[f"rank_{arm}"] = live[f"rank_{arm}"].to_numpy()

    result: dict[str, Any] = summarize_arms(replayed, ARMS + LIVE_ARMS)
    on, off = result["on"]["ndcg@10"], result["off"]["ndcg@10"]
    result["relative_gain"] = _gain(on, off)
    result["live_gain_over_on"] = _gain(result["live"]["ndcg@10"], on)
    result["comparisons"] = compare_arms(replayed, COMPARISONS, seed=config.seed)
    result.update(
        users=int(len(users)),
        n_events=n,
        candidates=int(config.retrieval.k),
        protocol={
            "stream": f"each user's last {n} interactions (train+valid+test, time order), >= 1 kept before",
            "retriever": f"{config.retrieval.model} fitted once on all pre-stream interactions, shared",
            "reranker": "the whole chain fitted (llm-rerank fit) on the pre-stream interactions only",
            "on": "after each event, OnlineReranker.record(kind='rating', rating=stars)",
            "live": "as on, from the same pre-stream state with a log of its own; after each event the "
            "user's candidates are fetched again (Bundle.candidates: scored from the moved history)",
            "retrieval-live": "the live arm's candidates in their own order",
            "off": "static pre-stream user state",
            "metric": "rank of the event's item among the remaining candidates; NDCG@10, Recall@10",
        },
        feedback={**feedback.model_dump(exclude={"store"})},
        seconds={"fit": round(fit_seconds, 1), "total": round(time.perf_counter() - started, 1)},
        environment=numeric_environment(),
    )
    (out_dir / "stream.json").write_text(json.dumps(result, indent=2))
    return result
