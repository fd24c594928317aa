"""Training the reranker on a history, without leaks, and the list helpers its stages share.

Given all the events a fit may see (``history``):

- a **validation slice**: each user's latest event is the target of a list retrieved by a retriever fitted
  on everything before it (early stopping, the zero-shot fusion weight, the text model's start; with
  ``train.valid_train_fraction`` above 0, that share of these users also trains);
- **held-out training targets**: the last ``train.holdout`` events before the validation slice are held out
  of a separate retrieval fit; that retriever's top-K, scored from all of the user's events before each
  target (the held-out ones before it folded in, as serving folds in events since the fit), are the
  candidate lists and the held-out events the targets, so the scorer never learns from scores of a
  retriever that saw its target. A user's text for a target uses only that user's events before it.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from merlin.core.dispatch import is_cpu_object

from llm_rerank_plugin.config import LLMRerankConfig
from llm_rerank_plugin.data import InteractionData
from llm_rerank_plugin.data.split import hold_out_last
from llm_rerank_plugin.pipeline.chain import Chain
from llm_rerank_plugin.rerank.encoder import TextEncoder
from llm_rerank_plugin.rerank.reranker import FEATURE_NAMES, ItemTable, LLMReranker, UserContext, zscore
from llm_rerank_plugin.rerank.scorer import MultiAspectScorer
from llm_rerank_plugin.rerank.text import HistoryIndex, UserTemplate
from llm_rerank_plugin.rerank.train import (
    RankingExamples,
    TrainConfig,
    TrainResult,
    evaluate_ndcg,
    train_feature_weights,
    train_scorer,
)
from llm_rerank_plugin.retrieve.base import PAD_ITEM, Candidates

ZEROSHOT_WEIGHTS = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 8.0)
# The fusion features computed from text vectors; the no-text ablation zeroes them (and every vector).
TEXT_FEATURES = tuple(FEATURE_NAMES.index(n) for n in ("recent_similarity", "last_similarity"))


def without_text(examples: RankingExamples) -> RankingExamples:
    """The same lists with every text-derived input removed: zero user vectors, zero text features."""
    features = examples.features.copy()
    features[..., list(TEXT_FEATURES)] = 0.0
    return RankingExamples(
        np.zeros_like(examples.user_vectors), examples.candidates, features, examples.target, examples.mask
    )


def host_frame(frame: Any) -> Any:
    """Text rendering and the catalogue table are host-side: a cuDF frame is copied once, explicitly."""
    return frame if is_cpu_object(frame) else frame.to_pandas()


def build_encoder(cfg: LLMRerankConfig) -> TextEncoder:
    return TextEncoder(
        cfg.model,
        device=cfg.device,
        batch_size=cfg.batch_size,
        max_length=cfg.max_length,
        allow_download=cfg.allow_download,
        backend=cfg.encoder_backend,
    )


def build_reranker(data: InteractionData, cfg: LLMRerankConfig, cache_dir: Any = None) -> LLMReranker:
    """Encoder, item table (vectors cached on disk) and an untrained scorer, from the stage config."""
    from llm_rerank_plugin.data.movielens import default_cache_dir

    encoder = build_encoder(cfg)
    cache_dir = cache_dir or default_cache_dir() / "item-vectors"
    table = ItemTable.build(
        host_frame(data.items),
        encoder,
        cfg.templates.item,
        cfg.aspects,
        cache_dir=cache_dir,
        title_template=cfg.templates.item_title,
    )
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
    reranker.profiles = {row["user_id"]: row for row in host_frame(data.users).to_dict("records")}
    reranker.new_item_slots = cfg.new_item_slots
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


def candidate_lists(
    reranker: LLMReranker,
    candidates: Candidates,
    users: np.ndarray,
    histories: list[list[Any]],
    now: list[float],
    targets: np.ndarray,
    other_positives: list[set] | None = None,
    aligned: bool = False,
) -> ListBatch:
    """The lists of ``users`` (rows of ``candidates``, or its i-th row for the i-th entry of ``users`` when
    ``aligned``: one list per target, a user may repeat) with contexts built from the given histories."""
    if aligned:
        take = np.arange(len(users))
    else:
        by_user = {u: i for i, u in enumerate(candidates.user_ids.tolist())}
        take = np.array([by_user[u] for u in users.tolist()], dtype=np.int64)
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


def score_lists(
    lists: ListBatch, scorer_fn: Callable[[int, np.ndarray, np.ndarray], np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
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


def zeroshot_scores(reranker: LLMReranker, context: UserContext, rows: np.ndarray, retrieval: np.ndarray,
                    weight: float) -> np.ndarray:  # fmt: skip
    """Retrieval score fused with the cosine of the user's recent-history vector (no training)."""
    cosine = reranker.items.vectors[rows] @ context.recent_vector
    return zscore(retrieval) + weight * zscore(cosine)


def set_serving_state(reranker: LLMReranker, history: Any, max_history: int) -> None:
    """Give the reranker what serving needs from ``history`` (all events so far): each user's recent items
    (newest first), the time of their latest event, and the popularity / trending / co-watch statistics."""
    index = HistoryIndex(history)
    users = history["user_id"].unique().tolist()
    reranker.set_users({u: index.recent(u, n=max_history) for u in users})
    reranker.last_seen.update(history.groupby("user_id")["timestamp"].max().astype(float).to_dict())
    reranker.items.set_popularity(history)
    reranker.refresh()


def _ndcg10(items: np.ndarray, targets: np.ndarray) -> float:
    # Model selection inside fit; the evaluation's metrics module sits above the pipeline, not under it.
    hits = items[:, :10] == targets[:, None]
    ranks = np.where(hits.any(axis=1), hits.argmax(axis=1) + 1, 0)
    return float(np.mean(np.where(ranks > 0, 1.0 / np.log2(np.maximum(ranks, 1) + 1), 0.0)))


class RerankerTrainer:
    """Trains the reranker of a chain on ``chain.history`` (see the module docstring)."""

    def __init__(self, chain: Chain, seed: int = 0) -> None:
        self.chain = chain
        self.seed = seed
        self.config: LLMRerankConfig = chain.config.llm_rerank()
        torch.manual_seed(seed)
        cache = chain.config.data.cache_dir
        self.reranker = build_reranker(chain.data, self.config, cache and Path(cache) / "item-vectors")
        self.inner, self.valid = hold_out_last(chain.history, 1)
        self.sample = self._sample_users()
        if self.sample is not None:
            self.valid = self.valid[self.valid["user_id"].isin(self.sample)].reset_index(drop=True)
        self.zeroshot_weight: float | None = None
        self.info: dict[str, Any] = {}
        self._valid_lists: ListBatch | None = None
        self._training_lists: ListBatch | None = None
        # Set by train(), reused by train_without_text(): the lists and the log-only fusion fitted on them.
        self._examples: tuple[RankingExamples, RankingExamples] | None = None
        self._log_fusion: tuple[MultiAspectScorer, TrainResult] | None = None

    def _sample_users(self) -> set | None:
        """The users whose lists train the scorer when ``train.max_users`` caps them (seeded), else None."""
        cap = self.config.train.max_users
        users = self.chain.history["user_id"].unique()
        if cap is None or len(users) <= cap:
            return None
        chosen = np.random.default_rng(self.seed).choice(len(users), size=cap, replace=False)
        return set(users[np.sort(chosen)].tolist())

    def valid_lists(self) -> ListBatch:
        """Each user's latest event as the target, candidates from a retriever fitted on what came before."""
        if self._valid_lists is None:
            users = self.valid["user_id"].to_numpy()
            retriever, self.info["retrieval"] = self.chain.fit_validation_retriever(
                self.inner, users, self.valid["item_id"].to_numpy()
            )
            candidates = retriever.recommend(users, k=self.chain.config.retrieval.k)
            self.reranker.items.set_popularity(self.inner)
            index = HistoryIndex(self.inner)
            max_h = self.config.templates.max_history
            histories = [index.recent(u, n=max_h) for u in users.tolist()]
            last = self.inner.groupby("user_id")["timestamp"].max()
            now = last.reindex(users).to_numpy(dtype=float).tolist()
            targets = self.valid["item_id"].to_numpy()
            self._valid_lists = candidate_lists(self.reranker, candidates, users, histories, now, targets)
        return self._valid_lists

    def training_lists(self) -> ListBatch:
        """Held-out events before the validation slice, candidates from a retriever fitted without them."""
        fit_part, held = hold_out_last(self.inner, self.config.train.holdout)
        self.reranker.items.set_popularity(fit_part)
        if self._training_lists is not None:
            return self._training_lists
        if self.sample is not None:
            held = held[held["user_id"].isin(self.sample)].reset_index(drop=True)
        retriever = self.chain.fit_retriever(fit_part)
        # hold_out_last numbers positions within each user's sequence, the order HistoryIndex uses too
        # (timestamp, then row order), so `position` is the count of the user's events before the target.
        inner = self.inner
        index = HistoryIndex(inner)
        max_h = self.config.templates.max_history
        users, positions = held["user_id"].tolist(), held["position"].tolist()
        before = [
            index.recent(u, before_position=int(p), n=int(p)) for u, p in zip(users, positions, strict=True)
        ]
        # Each target's candidates come from every event before it (the held-out ones before it folded in,
        # as serving folds in events since the fit): a list from the fit-time history alone would lack the
        # newest items, and the fusion would learn to lean on co-watch to make up for a staleness that
        # served lists do not have.
        candidates = retriever.recommend_for_histories(
            held["user_id"].to_numpy(), before, k=self.chain.config.retrieval.k
        )
        histories = [h[:max_h] for h in before]
        targets = held["item_id"].to_numpy()
        # The latest event before each target: the request time a served ranking would have had.
        times = inner["timestamp"].to_numpy(dtype=float)
        starts = inner.groupby("user_id").cumcount().to_numpy()
        first_row = np.flatnonzero(starts == 0)
        user_first = dict(
            zip(inner["user_id"].to_numpy()[first_row].tolist(), first_row.tolist(), strict=True)
        )
        now = [times[user_first[u] + int(p) - 1] for u, p in zip(users, positions, strict=True)]
        per_user = held.groupby("user_id")["item_id"].apply(set).to_dict()
        others = [per_user[u] - {t} for u, t in zip(users, targets.tolist(), strict=True)]
        self._training_lists = candidate_lists(
            self.reranker,
            candidates,
            held["user_id"].to_numpy(),
            histories,
            now,
            targets,
            others,
            aligned=True,
        )
        return self._training_lists

    def choose_zeroshot_weight(self) -> float:
        valid = self.valid_lists()
        self.reranker.items.set_popularity(self.inner)
        targets = self.valid["item_id"].to_numpy()

        def fused(weight: float):
            return lambda i, rows, retrieval: zeroshot_scores(
                self.reranker, valid.contexts[i], rows, retrieval, weight
            )

        by_weight = {w: _ndcg10(score_lists(valid, fused(w))[0], targets) for w in ZEROSHOT_WEIGHTS}
        self.zeroshot_weight = max(by_weight, key=by_weight.get)
        self.info["zeroshot"] = {"weight": self.zeroshot_weight, "valid_ndcg@10_by_weight": by_weight}
        return self.zeroshot_weight

    def train(self, checkpoint_dir: Path) -> LLMReranker:
        """Fusion weights, then the whole scorer; early stopping on the validation users that do not train.
        Leaves the reranker with the serving state of the whole history."""
        weight = self.choose_zeroshot_weight()
        zeroshot = [1.0, weight] + [0.0] * (len(FEATURE_NAMES) - 2)
        self.reranker.scorer = self._fresh_scorer(zeroshot)
        self.reranker.refresh()
        t0 = time.perf_counter()
        # Features use popularity, trending and co-watch counts from each list's own history.
        train_examples = self.training_lists().examples(self.reranker)
        self.reranker.items.set_popularity(self.inner)
        valid_examples = self.valid_lists().examples(self.reranker)
        # By default every validation list selects (early stopping, the start): the held-out training lists
        # are built as served lists are, and model selection on a few hundred lists is noisy enough as it
        # is; ``valid_train_fraction`` moves a share of them to training.
        share = self.config.train.valid_train_fraction
        if share > 0:
            order = np.random.default_rng(self.seed).permutation(len(valid_examples))
            cut = int(len(order) * share)
            train_examples = concat_examples(train_examples, valid_examples.subset(order[:cut]))
            valid_examples = valid_examples.subset(order[cut:])
        if len(train_examples) == 0 or len(valid_examples) == 0:
            raise ValueError(
                f"too little data to train the reranker: {len(train_examples)} training and "
                f"{len(valid_examples)} validation lists hold their target; expected users with several "
                "events "
                "whose held-out items the retriever ranks in its top retrieval.k"
            )
        prep = time.perf_counter() - t0
        self._examples = (train_examples, valid_examples)
        # Three starts for the text model, the best on validation kept: the zero-shot fusion; the log
        # features' own fitted fusion (text weights at zero: if the text adds nothing, early stopping keeps
        # it, and the text model is the log-only one); every feature's fusion fitted the same way.
        self._log_fusion = self._fit_fusion(train_examples, valid_examples, text=False)
        text_fusion = self._fit_fusion(train_examples, valid_examples, text=True)
        items = self.reranker.items
        starts = {
            "zeroshot": (self.reranker.scorer, None),
            "log_fusion": (
                self._fresh_scorer(self._log_fusion[0].beta.detach().tolist()),
                self._log_fusion[1],
            ),
            "text_fusion": text_fusion,
        }
        start_ndcg = {
            name: evaluate_ndcg(scorer, items.field_vectors, valid_examples, gate_matrix=items.vectors)
            for name, (scorer, _) in starts.items()
        }
        chosen = max(start_ndcg, key=lambda name: (start_ndcg[name], name == "zeroshot"))
        self.reranker.scorer, fusion = starts[chosen]
        if fusion is not None:
            # A fitted start reports what it scored as the text model: the log fusion's own score was
            # measured on the lists without their text inputs.
            fusion = replace(fusion, best_ndcg=start_ndcg[chosen])
        self.info["train"] = {
            **self._fit_scorer(
                self.reranker.scorer, train_examples, valid_examples, checkpoint_dir, text=True, fusion=fusion
            ),
            "started_from": chosen,
            "valid_ndcg@10_of_starts": start_ndcg,
            "example_seconds": round(prep, 1),
        }
        set_serving_state(self.reranker, self.chain.history, self.config.templates.max_history)
        return self.reranker

    def _fresh_scorer(self, feature_init: float | list[float]) -> MultiAspectScorer:
        """An untrained scorer shaped like the reranker's, with the fusion weights starting at
        ``feature_init``."""
        old = self.reranker.scorer
        return MultiAspectScorer(
            old.dim,
            old.aspect_names,
            rank=old.rank,
            mode=old.mode,
            n_features=len(FEATURE_NAMES),
            tied_fields=True,
            dropout=old.dropout,
            feature_init=feature_init,
        )

    def _fit_scorer(
        self,
        scorer: MultiAspectScorer,
        train_examples: RankingExamples,
        valid_examples: RankingExamples,
        checkpoint_dir: Path,
        text: bool,
        fusion: TrainResult | None = None,
    ) -> dict[str, Any]:
        """Fusion weights (unless ``fusion`` says they were fitted already), then the whole scorer,
        early-stopped on ``valid_examples``; returns the metrics."""
        c = self.config.train
        config = TrainConfig(
            loss=c.loss,
            epochs=c.epochs,
            batch_size=c.batch_size,
            lr=c.lr,
            weight_decay=c.weight_decay,
            patience=c.patience,
            seed=self.seed,
            max_minutes=c.max_minutes,
        )
        field_vectors, gate = self._item_inputs(text)
        features = fusion or train_feature_weights(
            scorer, field_vectors, train_examples, valid_examples, self._fusion_config(), gate_matrix=gate
        )
        result = train_scorer(
            scorer, field_vectors, train_examples, valid_examples, config, checkpoint_dir, gate_matrix=gate
        )
        scorer.eval()
        return {
            "train_lists": int(len(train_examples.target)),
            "valid_lists": int(len(valid_examples.target)),
            "valid_ndcg@10_in_candidates": {
                "start": features.initial_ndcg,
                "feature_weights_only": features.best_ndcg,
                "full_scorer": result.best_ndcg,
            },
            "feature_weights": dict(zip(FEATURE_NAMES, scorer.beta.detach().tolist(), strict=True)),
            "best_epoch": result.best_epoch,
            "epochs_run": len(result.history),
            "stop_reason": result.stop_reason,
            "train_seconds": round(features.seconds + result.seconds, 1),
        }

    def _item_inputs(self, text: bool) -> tuple[np.ndarray, np.ndarray]:
        """(per-aspect field vectors, full-text vectors) of the catalogue; zeros without the text."""
        items = self.reranker.items
        if text:
            return items.field_vectors, items.vectors
        return np.zeros_like(items.field_vectors), np.zeros_like(items.vectors)

    def _fusion_config(self) -> TrainConfig:
        return TrainConfig(
            epochs=20, lr=self.config.train.feature_lr, weight_decay=0.0, patience=3, seed=self.seed
        )

    def _fit_fusion(
        self, train_examples: RankingExamples, valid_examples: RankingExamples, text: bool
    ) -> tuple[MultiAspectScorer, TrainResult]:
        """The fusion weights alone fitted from the retrieval order, with the text inputs or without them
        (the log features' best linear fusion: the ablation's first phase and a start of the text model)."""
        torch.manual_seed(self.seed)
        scorer = self._fresh_scorer(1.0)
        field_vectors, gate = self._item_inputs(text)
        if not text:
            train_examples, valid_examples = without_text(train_examples), without_text(valid_examples)
        result = train_feature_weights(
            scorer, field_vectors, train_examples, valid_examples, self._fusion_config(), gate_matrix=gate
        )
        return scorer, result

    def train_without_text(self, checkpoint_dir: Path) -> MultiAspectScorer:
        """The ablation: the same scorer and fusion trained on the same lists with the text removed (zero
        user and item vectors, zero text-similarity features); its fusion weights are the log fusion
        ``train`` fitted first, then the whole scorer is trained as the text model is."""
        if self._examples is None or self._log_fusion is None:
            raise RuntimeError("train_without_text needs the lists of train(): call train() first")
        train_examples, valid_examples = self._examples
        fused, fusion = self._log_fusion
        scorer = copy.deepcopy(fused)
        self.info["notext"] = self._fit_scorer(
            scorer,
            without_text(train_examples),
            without_text(valid_examples),
            checkpoint_dir,
            text=False,
            fusion=fusion,
        )
        return scorer

    def train_cross_encoder(self) -> tuple[Any, dict[str, Any]]:
        """Fine-tune the cross-encoder on the held-out training lists within ``cross.max_*``."""
        from llm_rerank_plugin.rerank.cross import CrossEncoder

        cc = self.config.cross
        encoder = CrossEncoder(
            cc.model or self.config.model,
            device=self.config.device,
            max_length=cc.max_length,
            allow_download=self.config.allow_download,
            seed=self.seed,
        )
        lists = self.training_lists()
        rng = np.random.default_rng(self.seed)
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
            groups, max_steps=cc.max_steps, max_minutes=cc.max_minutes, lr=cc.lr, seed=self.seed
        )
        # training_lists() moved the statistics to its own history: back to the serving state.
        set_serving_state(self.reranker, self.chain.history, self.config.templates.max_history)
        return encoder, {**fit, "fit_seconds": round(time.perf_counter() - t0, 1)}
