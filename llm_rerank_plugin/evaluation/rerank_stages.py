"""The rerank stages of ``llm-rerank evaluate``: zero-shot, trained bilinear, cross-encoder cascade.

Training protocol (no leak from retrieval scores): the last ``train.holdout`` training events of each user
are held out of a separate retrieval fit; that retriever's top-K for the user are the candidate lists, and
the held-out events are the targets. So the reranker never learns from scores of a retriever that saw the
target. User text for a target uses only that user's events before it. Early stopping and the zero-shot
fusion weight use the validation phase; the test phase is touched once, at the end.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from merlin.core.dispatch import is_cpu_object

from llm_rerank_plugin.config import LLMRerankConfig
from llm_rerank_plugin.data.base import InteractionData
from llm_rerank_plugin.data.movielens import default_cache_dir
from llm_rerank_plugin.data.split import hold_out_last
from llm_rerank_plugin.evaluation.protocol import Phase, Protocol
from llm_rerank_plugin.rerank.encoder import TextEncoder
from llm_rerank_plugin.rerank.reranker import FEATURE_NAMES, ItemTable, LLMReranker, UserContext, zscore
from llm_rerank_plugin.rerank.scorer import MultiAspectScorer
from llm_rerank_plugin.rerank.text import HistoryIndex, UserTemplate
from llm_rerank_plugin.rerank.train import RankingExamples, TrainConfig, train_feature_weights, train_scorer
from llm_rerank_plugin.retrieve.base import PAD_ITEM, Candidates

ZEROSHOT_WEIGHTS = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 8.0)


def build_reranker(data: InteractionData, cfg: LLMRerankConfig, cache_dir: Any = None) -> LLMReranker:
    """Encoder, item table (vectors cached on disk) and an untrained scorer, from the stage config."""
    encoder = TextEncoder(
        cfg.model,
        device=cfg.device,
        batch_size=cfg.batch_size,
        max_length=cfg.max_length,
        allow_download=cfg.allow_download,
    )
    cache_dir = cache_dir or default_cache_dir() / "item-vectors"
    # Text rendering and the catalogue table are host-side; a cuDF catalogue is copied once, explicitly.
    items = data.items if is_cpu_object(data.items) else data.items.to_pandas()
    table = ItemTable.build(items, encoder, cfg.templates.item, cfg.aspects, cache_dir=cache_dir)
    scorer = MultiAspectScorer(
        encoder.dim,
        list(cfg.aspects),
        rank=cfg.rank,
        mode=cfg.aspect_mode,
        n_features=len(FEATURE_NAMES),
        tied_fields=True,
    )
    t = cfg.templates
    template = UserTemplate(t.user_profile, t.history_prefix, t.max_history)
    reranker = LLMReranker(encoder, scorer, table, template)
    users = data.users if is_cpu_object(data.users) else data.users.to_pandas()
    reranker.profiles = {row["user_id"]: row for row in users.to_dict("records")}
    return reranker


@dataclass
class ListBatch:
    """Candidate lists in item-table rows with their user contexts, ready for scoring or training."""

    users: np.ndarray
    contexts: list[UserContext]
    rows: np.ndarray  # (U, K) item-table rows, -1 for padding
    retrieval: np.ndarray  # (U, K)
    item_ids: np.ndarray  # (U, K)
    target_col: np.ndarray  # (U,) column of the target, -1 if absent

    def examples(self, reranker: LLMReranker) -> RankingExamples:
        """Training examples from the lists that contain their target."""
        keep = np.flatnonzero(self.target_col >= 0)
        mask = self.rows[keep] >= 0
        feats = np.stack(
            [_features(reranker, self.contexts[i], self.rows[i], self.retrieval[i]) for i in keep]
        )
        return RankingExamples(
            user_vectors=np.stack([self.contexts[i].text_vector for i in keep]),
            candidates=np.where(mask, self.rows[keep], 0),
            features=feats,
            target=self.target_col[keep],
            mask=mask,
        )


def concat_examples(a: RankingExamples, b: RankingExamples) -> RankingExamples:
    def cat(name: str) -> np.ndarray:
        return np.concatenate([getattr(a, name), getattr(b, name)])

    def full_mask(e: RankingExamples) -> np.ndarray:
        return np.ones(e.candidates.shape, bool) if e.mask is None else e.mask

    mask = None if a.mask is None and b.mask is None else np.concatenate([full_mask(a), full_mask(b)])
    return RankingExamples(cat("user_vectors"), cat("candidates"), cat("features"), cat("target"), mask)


def _features(
    reranker: LLMReranker, context: UserContext, rows: np.ndarray, retrieval: np.ndarray
) -> np.ndarray:
    real = rows >= 0
    out = np.zeros((len(rows), len(FEATURE_NAMES)), np.float32)
    out[real] = reranker.features(context, rows[real], retrieval[real])
    return out


def _lists(
    reranker: LLMReranker,
    candidates: Candidates,
    users: np.ndarray,
    histories: list[list[Any]],
    now: list[float],
    targets: np.ndarray,
    other_positives: list[set] | None = None,
) -> ListBatch:
    by_user = {u: i for i, u in enumerate(candidates.user_ids.tolist())}
    take = np.array([by_user[u] for u in users.tolist()])
    item_ids = candidates.item_ids[take]
    retrieval = candidates.scores[take]
    rows = reranker.items.rows(item_ids.ravel(), strict=False).reshape(item_ids.shape)
    rows[item_ids == PAD_ITEM] = -1
    if other_positives is not None:  # later held-out events of the same user are not negatives
        for i, others in enumerate(other_positives):
            rows[i, np.isin(item_ids[i], list(others))] = -1
    hits = (item_ids == targets[:, None]) & (rows >= 0)
    target_col = np.where(hits.any(axis=1), hits.argmax(axis=1), -1)
    contexts = reranker.contexts(users.tolist(), histories, now)
    return ListBatch(users, contexts, rows, retrieval, item_ids, target_col)


def set_serving_state(reranker: LLMReranker, history: Any, max_history: int) -> None:
    """Give the reranker what serving needs from ``history`` (all events so far): each user's recent items
    (newest first), the time of their latest event, and the popularity / trending / co-watch statistics."""
    index = HistoryIndex(history)
    users = history["user_id"].unique().tolist()
    reranker.set_users({u: index.recent(u, n=max_history) for u in users})
    reranker.last_seen.update(history.groupby("user_id")["timestamp"].max().astype(float).to_dict())
    reranker.items.set_popularity(history)
    reranker.refresh()


class RerankExperiment:
    """Builds, trains and evaluates the rerank stages once per ``evaluate`` run (shared by the stages)."""

    def __init__(self, protocol: Protocol) -> None:
        self.protocol = protocol
        self.config = protocol.config.llm_rerank()
        torch.manual_seed(protocol.config.seed)
        self.reranker = build_reranker(protocol.data, self.config)
        self._phase_lists: dict[str, ListBatch] = {}
        self._training_lists: ListBatch | None = None
        self.train_info: dict[str, Any] | None = None
        self.zeroshot_weight: float | None = None
        self.bilinear_ranking: tuple[np.ndarray, np.ndarray] | None = None

    # -------------------------------------------------------------- data for each phase
    def phase_lists(self, name: str) -> ListBatch:
        if name not in self._phase_lists:
            phase: Phase = self.protocol.phase(name)
            self.reranker.items.set_popularity(phase.history)
            max_h = self.config.templates.max_history
            index = HistoryIndex(phase.history)
            histories = [index.recent(u, n=max_h) for u in phase.users.tolist()]
            last = phase.history.groupby("user_id")["timestamp"].max()
            now = last.reindex(phase.users).to_numpy(dtype=float).tolist()
            self._phase_lists[name] = _lists(
                self.reranker, phase.candidates, phase.users, histories, now, phase.target_items
            )
        return self._phase_lists[name]

    def training_lists(self) -> ListBatch:
        """Held-out training events, candidates from a retriever fitted without them (built once)."""
        split = self.protocol.split
        fit_part, held = hold_out_last(split.train, self.config.train.holdout)
        if self._training_lists is not None:
            self.reranker.items.set_popularity(fit_part)
            return self._training_lists
        retriever = self.protocol.fit_retriever(fit_part)
        self.reranker.items.set_popularity(fit_part)
        held_users = held["user_id"].to_numpy()
        candidates = retriever.recommend(np.unique(held_users), k=self.protocol.config.retrieval.k)
        # hold_out_last numbers positions within each user's training sequence, the order HistoryIndex
        # uses too (timestamp, then row order), so `position` is the count of events before the target.
        index = HistoryIndex(split.train)
        max_h = self.config.templates.max_history
        positions = held
        histories = [
            index.recent(u, before_position=int(p), n=max_h)
            for u, p in zip(positions["user_id"].tolist(), positions["position"].tolist(), strict=True)
        ]
        targets = positions["item_id"].to_numpy()
        # The latest event before each target: the request time a served ranking would have had.
        times = split.train["timestamp"].to_numpy(dtype=float)
        starts = split.train.groupby("user_id").cumcount().to_numpy()
        first_row = np.flatnonzero(starts == 0)
        user_first = dict(
            zip(split.train["user_id"].to_numpy()[first_row].tolist(), first_row.tolist(), strict=True)
        )
        now = [
            times[user_first[u] + int(p) - 1]
            for u, p in zip(positions["user_id"].tolist(), positions["position"].tolist(), strict=True)
        ]
        per_user = positions.groupby("user_id")["item_id"].apply(set).to_dict()
        pairs = zip(positions["user_id"].tolist(), targets.tolist(), strict=True)
        others = [per_user[u] - {t} for u, t in pairs]
        self._training_lists = _lists(
            self.reranker, candidates, positions["user_id"].to_numpy(), histories, now, targets, others
        )
        return self._training_lists

    # -------------------------------------------------------------- stages
    def score_lists(self, lists: ListBatch, scorer_fn) -> tuple[np.ndarray, np.ndarray]:
        """Reorder every list by ``scorer_fn(i, rows, retrieval) -> scores``; padding stays last."""
        order_items = np.full_like(lists.item_ids, PAD_ITEM)
        order_scores = np.full(lists.item_ids.shape, -np.inf, np.float32)
        for i in range(len(lists.users)):
            real = np.flatnonzero(lists.rows[i] >= 0)
            scores = scorer_fn(i, lists.rows[i, real], lists.retrieval[i, real])
            order = real[np.argsort(-scores, kind="stable")]
            order_items[i, : len(order)] = lists.item_ids[i, order]
            order_scores[i, : len(order)] = np.sort(scores)[::-1]
        return order_items, order_scores

    def zeroshot(self) -> tuple[np.ndarray, np.ndarray, dict]:
        """Retrieval score fused with the cosine of the recent-history vector; weight chosen on validation."""
        from llm_rerank_plugin.evaluation.metrics import ranking_metrics

        def fused(lists: ListBatch, weight: float):
            def score(i, rows, retrieval):
                cos = self.reranker.items.vectors[rows] @ lists.contexts[i].recent_vector
                return zscore(retrieval) + weight * zscore(cos)

            return score

        valid = self.phase_lists("valid")
        targets = self.protocol.phase("valid").target_items
        by_weight = {
            w: ranking_metrics(self.score_lists(valid, fused(valid, w))[0], targets)["ndcg@10"]
            for w in ZEROSHOT_WEIGHTS
        }
        self.zeroshot_weight = max(by_weight, key=by_weight.get)
        test = self.phase_lists("test")
        items, scores = self.score_lists(test, fused(test, self.zeroshot_weight))
        return items, scores, {"weight": self.zeroshot_weight, "valid_ndcg@10_by_weight": by_weight}

    def train(self) -> dict[str, Any]:
        if self.train_info is None:
            if self.zeroshot_weight is None:
                self.zeroshot()
            # Start from the zero-shot fusion (retrieval + w * recent similarity), so training only has to
            # learn what the text adds beyond it; early stopping keeps the start if nothing is learned.
            init = [1.0, self.zeroshot_weight] + [0.0] * (len(FEATURE_NAMES) - 2)
            old = self.reranker.scorer
            self.reranker.scorer = MultiAspectScorer(
                old.dim,
                old.aspect_names,
                rank=old.rank,
                mode=old.mode,
                n_features=len(FEATURE_NAMES),
                tied_fields=True,
                dropout=old.dropout,
                feature_init=init,
            )
            self.reranker.refresh()
            t0 = time.perf_counter()
            # Features use popularity, trending and co-watch counts from each list's own history.
            train_examples = self.training_lists().examples(self.reranker)
            self.reranker.items.set_popularity(self.protocol.phase("valid").history)
            valid_examples = self.phase_lists("valid").examples(self.reranker)
            # Validation lists are the closest to the test situation (a retriever fitted on everything
            # before the target): a share of the users trains, the rest early-stops.
            share = self.config.train.valid_train_fraction
            if share > 0:
                order = np.random.default_rng(self.protocol.config.seed).permutation(len(valid_examples))
                cut = int(len(order) * share)
                train_examples = concat_examples(train_examples, valid_examples.subset(order[:cut]))
                valid_examples = valid_examples.subset(order[cut:])
            prep = time.perf_counter() - t0
            c = self.config.train
            config = TrainConfig(
                loss=c.loss,
                epochs=c.epochs,
                batch_size=c.batch_size,
                lr=c.lr,
                weight_decay=c.weight_decay,
                patience=c.patience,
                seed=self.protocol.config.seed,
                max_minutes=c.max_minutes,
            )
            features = train_feature_weights(
                self.reranker.scorer,
                self.reranker.items.field_vectors,
                train_examples,
                valid_examples,
                TrainConfig(epochs=20, lr=c.feature_lr, weight_decay=0.0, patience=3, seed=config.seed),
                gate_matrix=self.reranker.items.vectors,
            )
            result = train_scorer(
                self.reranker.scorer,
                self.reranker.items.field_vectors,
                train_examples,
                valid_examples,
                config,
                self.protocol.artifacts / "scorer",
                gate_matrix=self.reranker.items.vectors,
            )
            self.reranker.scorer.eval()
            self.reranker.refresh()
            self.train_info = {
                "train_lists": int(len(train_examples.target)),
                "valid_lists": int(len(valid_examples.target)),
                "valid_ndcg@10_in_candidates": {
                    "zero_shot_start": features.initial_ndcg,
                    "feature_weights_only": features.best_ndcg,
                    "full_scorer": result.best_ndcg,
                },
                "feature_weights": dict(
                    zip(FEATURE_NAMES, self.reranker.scorer.beta.detach().tolist(), strict=True)
                ),
                "best_epoch": result.best_epoch,
                "epochs_run": len(result.history),
                "stop_reason": result.stop_reason,
                "train_seconds": round(features.seconds + result.seconds, 1),
                "example_seconds": round(prep, 1),
            }
        return self.train_info

    def bilinear(self) -> tuple[np.ndarray, np.ndarray, dict]:
        info = self.train()
        test = self.phase_lists("test")
        self.reranker.items.set_popularity(self.protocol.phase("test").history)
        self.reranker.refresh()

        def score(i, rows, retrieval):
            return self.reranker.score_candidates(test.contexts[i], rows, retrieval)[0]

        items, scores = self.score_lists(test, score)
        self.bilinear_ranking = (items, scores)
        # Saved as a serving process would hold it: every user's history up to now.
        set_serving_state(
            self.reranker, self.protocol.phase("test").history, self.config.templates.max_history
        )
        self.reranker.save(self.protocol.artifacts / "reranker")
        return items, scores, info

    def cross(self) -> tuple[np.ndarray, np.ndarray, dict]:
        """The cross-encoder reorders the bilinear top ``cross.top_m``; fine-tuned within its budget."""
        from llm_rerank_plugin.rerank.cross import CrossEncoder

        if self.bilinear_ranking is None:
            self.bilinear()
        cc = self.config.cross
        encoder = CrossEncoder(
            cc.model or self.config.model,
            device=self.config.device,
            max_length=cc.max_length,
            allow_download=self.config.allow_download,
            seed=self.protocol.config.seed,
        )
        lists = self.training_lists()
        rng = np.random.default_rng(self.protocol.config.seed)
        have = np.flatnonzero(lists.target_col >= 0)
        chosen = rng.choice(have, size=min(cc.train_users, len(have)), replace=False)
        texts = self.reranker.items.texts
        groups = []
        for i in chosen:
            real = np.flatnonzero(
                (lists.rows[i] >= 0) & (np.arange(lists.rows.shape[1]) != lists.target_col[i])
            )
            negatives = rng.choice(real, size=min(cc.negatives, len(real)), replace=False)
            cols = [lists.target_col[i], *negatives.tolist()]
            groups.append((lists.contexts[i].text, [texts[lists.rows[i, c]] for c in cols], 0))
        t0 = time.perf_counter()
        fit = encoder.fit(
            groups,
            max_steps=cc.max_steps,
            max_minutes=cc.max_minutes,
            lr=cc.lr,
            seed=self.protocol.config.seed,
        )
        fit_seconds = time.perf_counter() - t0
        encoder.save(self.protocol.artifacts / "cross-encoder")
        items, scores = (a.copy() for a in self.bilinear_ranking)
        test = self.phase_lists("test")
        m = cc.top_m
        pairs, where = [], []
        for i in range(len(test.users)):
            top = items[i, :m]
            top = top[top != PAD_ITEM]
            rows = self.reranker.items.rows(top)
            pairs += [(test.contexts[i].text, texts[r]) for r in rows]
            where.append(len(top))
        t1 = time.perf_counter()
        logits = encoder.predict(pairs)
        predict_seconds = time.perf_counter() - t1
        start = 0
        for i, n in enumerate(where):
            block = logits[start : start + n]
            order = np.argsort(-block, kind="stable")
            items[i, :n] = items[i, :n][order]
            # Shift the logits above the untouched tail so that sorting by score still gives the ranks.
            tail = scores[i, n:][np.isfinite(scores[i, n:])]
            floor = float(tail.max()) + 1.0 if len(tail) else 0.0
            scores[i, :n] = block[order] - block.min() + floor
            start += n
        return (
            items,
            scores,
            {
                **fit,
                "top_m": m,
                "fit_seconds": round(fit_seconds, 1),
                "predict_seconds": round(predict_seconds, 1),
                "pairs": len(pairs),
            },
        )


def _experiment(protocol: Protocol) -> RerankExperiment:
    if not hasattr(protocol, "_rerank_experiment"):
        protocol._rerank_experiment = RerankExperiment(protocol)
    return protocol._rerank_experiment


def _stage(method: str):
    def run(protocol: Protocol):
        from llm_rerank_plugin.evaluation.evaluate import StageRanking

        items, scores, info = getattr(_experiment(protocol), method)()
        return StageRanking(items, scores, info)

    return run


RERANK_STAGES = {
    "rerank-zeroshot": _stage("zeroshot"),
    "rerank-bilinear": _stage("bilinear"),
    "rerank-cross": _stage("cross"),
}
