"""Training loop for :class:`MultiAspectScorer` on precomputed encoder vectors.

Each training example is one user's candidate list (from the retrieval stage) with exactly one positive:
the scorer learns to put it first, with a listwise softmax cross-entropy or a pairwise BPR loss. Early
stopping watches NDCG@10 of the positive within the validation candidate lists.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .scorer import MultiAspectScorer

CHECKPOINT_NAME = "best_scorer.pt"
LOSSES = ("softmax", "bpr")


@dataclass
class RankingExamples:
    """N candidate lists of C candidates each, with one positive per list.

    Attributes:
        user_vectors: (N, d) float32 user vectors.
        candidates: (N, C) int64 row indices into the item matrix; padded slots (mask False) may hold any
            value, e.g. -1.
        features: (N, C, F) float32 extra per-candidate features (F may be 0); column 0 is by convention the
            retrieval score z-normalised per user.
        target: (N,) int64 column of the positive within ``candidates`` (not a padded slot).
        mask: optional (N, C) bool, True for real candidates; None means all are real.

    Inputs are converted to these dtypes (any float / integer / bool arrays are accepted); shapes and values
    are checked, with errors that name the offending field.
    """

    user_vectors: np.ndarray
    candidates: np.ndarray
    features: np.ndarray
    target: np.ndarray
    mask: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.user_vectors = _as_dtype("user_vectors", self.user_vectors, np.float32, np.floating)
        self.candidates = _as_dtype("candidates", self.candidates, np.int64, np.integer)
        self.features = _as_dtype("features", self.features, np.float32, np.floating)
        self.target = _as_dtype("target", self.target, np.int64, np.integer)
        if self.user_vectors.ndim != 2:
            raise ValueError(f"user_vectors must have shape (N, d); got {self.user_vectors.shape}")
        n = self.user_vectors.shape[0]
        if self.candidates.ndim != 2 or self.candidates.shape[0] != n or self.candidates.shape[1] < 1:
            raise ValueError(f"candidates must have shape (N, C) = ({n}, C>=1); got {self.candidates.shape}")
        c = self.candidates.shape[1]
        if self.features.ndim != 3 or self.features.shape[:2] != (n, c):
            raise ValueError(f"features must have shape (N, C, F) = ({n}, {c}, F); got {self.features.shape}")
        if self.target.shape != (n,):
            raise ValueError(f"target must have shape (N,) = ({n},); got {self.target.shape}")
        if n and (self.target.min() < 0 or self.target.max() >= c):
            raise ValueError(
                f"target must be candidate columns in [0, {c}); got min {self.target.min()}, "
                f"max {self.target.max()}"
            )
        if self.mask is not None:
            self.mask = np.asarray(self.mask)
            if self.mask.dtype != np.bool_ or self.mask.shape != (n, c):
                raise ValueError(
                    f"mask must be a bool array of shape (N, C) = ({n}, {c}); "
                    f"got {self.mask.dtype} {self.mask.shape}"
                )
            bad = np.flatnonzero(~self.mask[np.arange(n), self.target])
            if bad.size:
                raise ValueError(
                    f"target points at a masked (padded) candidate in examples {bad[:10].tolist()}"
                )
        real = self.candidates if self.mask is None else self.candidates[self.mask]
        if real.size and real.min() < 0:
            raise ValueError(f"candidates must be >= 0 where not masked; got min {real.min()}")
        for name in ("user_vectors", "features"):
            if not np.isfinite(getattr(self, name)).all():
                raise ValueError(f"{name} contains NaN or inf")

    def __len__(self) -> int:
        return int(self.user_vectors.shape[0])

    @property
    def n_candidates(self) -> int:
        return int(self.candidates.shape[1])

    @property
    def n_features(self) -> int:
        return int(self.features.shape[2])

    def subset(self, index: np.ndarray) -> RankingExamples:
        """The examples at ``index`` (int array or bool mask over N), as a new RankingExamples."""
        return RankingExamples(
            user_vectors=self.user_vectors[index],
            candidates=self.candidates[index],
            features=self.features[index],
            target=self.target[index],
            mask=None if self.mask is None else self.mask[index],
        )


def _as_dtype(name: str, x: np.ndarray, dtype: type, kind: type) -> np.ndarray:
    arr = np.asarray(x)
    if not np.issubdtype(arr.dtype, kind) or arr.dtype == np.bool_:
        word = "a floating-point" if kind is np.floating else "an integer"
        raise TypeError(f"{name} must be {word} array (converted to {dtype.__name__}); got {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=dtype)


@dataclass
class TrainConfig:
    """Training hyper-parameters.

    loss: "softmax" (listwise cross-entropy of the positive against its list) or "bpr" (mean −log σ(s⁺ − s⁻)
    over every real negative). Early stopping: stop after ``patience`` epochs without valid NDCG@k improving
    by more than ``min_delta``; ``max_minutes`` also stops training (checked after every batch; the partial
    epoch is still validated). The untrained model's validation NDCG is the baseline to beat.
    """

    loss: Literal["softmax", "bpr"] = "softmax"
    epochs: int = 20
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-5
    patience: int = 3
    seed: int = 0
    max_minutes: float | None = None
    device: str = "cpu"
    k: int = 10
    min_delta: float = 0.0
    eval_batch_size: int = 1024
    progress: bool = True

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}; got {self.loss!r}")
        for name in ("epochs", "batch_size", "patience", "k", "eval_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0; got {self.lr!r}")
        if not self.weight_decay >= 0 or not self.min_delta >= 0:
            raise ValueError(
                f"weight_decay and min_delta must be >= 0; got {self.weight_decay!r}, {self.min_delta!r}"
            )
        if self.max_minutes is not None and not self.max_minutes >= 0:
            raise ValueError(f"max_minutes must be None or >= 0; got {self.max_minutes!r}")


@dataclass
class TrainResult:
    """Outcome of :func:`train_scorer`.

    history: one dict per epoch run: epoch (1-based), loss (mean training loss), valid_ndcg (NDCG@k),
        seconds (since training started), batches (run in that epoch).
    best_epoch: epoch whose weights the scorer holds now; 0 means no epoch beat the untrained model, whose
        weights were restored.
    best_ndcg: validation NDCG@k of those weights; initial_ndcg: of the untrained model.
    stop_reason: "epochs", "patience" or "max_minutes".
    checkpoint_path: where the best weights were saved, if a checkpoint_dir was given.
    """

    history: list[dict[str, float]]
    best_epoch: int
    best_ndcg: float
    seconds: float
    initial_ndcg: float = float("nan")
    stop_reason: str = "epochs"
    checkpoint_path: Path | None = None
    config: TrainConfig = field(default_factory=TrainConfig)


def ndcg_at_k_from_scores(
    scores: np.ndarray, target: np.ndarray, k: int = 10, mask: np.ndarray | None = None
) -> float:
    """Mean NDCG@k of one relevant candidate per row, ranked by score within its row.

    Args:
        scores: (N, C) float scores.
        target: (N,) int column of the relevant candidate in each row.
        k: cut-off; a target ranked at 0-based position p < k gains 1/log2(p + 2) (the ideal DCG is 1).
        mask: optional (N, C) bool, False for padded candidates, which are ignored.
    Ties count against the target (it ranks after every other candidate with an equal score), so constant
    scores earn the worst rank rather than a lucky first place.
    """
    scores = np.asarray(scores, dtype=np.float64)
    target = np.asarray(target)
    if scores.ndim != 2:
        raise ValueError(f"scores must have shape (N, C); got {scores.shape}")
    n, c = scores.shape
    if n == 0:
        raise ValueError("scores has no rows; NDCG of an empty set is undefined")
    if target.shape != (n,) or not np.issubdtype(target.dtype, np.integer):
        raise ValueError(f"target must be an int array of shape ({n},); got {target.dtype} {target.shape}")
    if target.min() < 0 or target.max() >= c:
        raise ValueError(f"target must lie in [0, {c}); got min {target.min()}, max {target.max()}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int; got {k!r}")
    rows = np.arange(n)
    if mask is None:
        mask = np.ones((n, c), dtype=bool)
    else:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (n, c):
            raise ValueError(f"mask must have shape ({n}, {c}); got {mask.shape}")
        if not mask[rows, target].all():
            raise ValueError("target points at a masked candidate in some rows")
    if np.isnan(scores[mask]).any():
        raise ValueError("scores contain NaN at unmasked candidates")
    pos = scores[rows, target][:, None]
    ahead = (scores >= pos) & mask
    ahead[rows, target] = False
    rank = ahead.sum(axis=1)
    gains = np.where(rank < k, 1.0 / np.log2(rank + 2.0), 0.0)
    return float(gains.mean())


# ---------------------------------------------------------------------------------------------- helpers
def _check_item_matrix(
    scorer: MultiAspectScorer, item_matrix: np.ndarray, gate_matrix: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None]:
    items = np.asarray(item_matrix)
    want = (scorer.n_aspects, scorer.dim) if scorer.tied_fields else (scorer.dim,)
    if items.ndim != len(want) + 1 or items.shape[1:] != want or not np.issubdtype(items.dtype, np.floating):
        layout = f"(n_items, {', '.join(map(str, want))})"
        raise ValueError(
            f"item_matrix must be a float array of shape {layout} for this scorer "
            f"(tied_fields={scorer.tied_fields}); got {items.dtype} {items.shape}"
        )
    if gate_matrix is not None:
        if not scorer.tied_fields:
            raise ValueError("gate_matrix (full-text item vectors) only applies to a tied_fields scorer")
        gate_matrix = np.asarray(gate_matrix)
        if gate_matrix.shape != (items.shape[0], scorer.dim):
            raise ValueError(
                f"gate_matrix must have shape ({items.shape[0]}, {scorer.dim}); got {gate_matrix.shape}"
            )
    return items, gate_matrix


def _check_examples(name: str, ex: RankingExamples, scorer: MultiAspectScorer, n_items: int) -> None:
    if len(ex) == 0:
        raise ValueError(f"{name} has no examples")
    if ex.user_vectors.shape[1] != scorer.dim:
        raise ValueError(f"{name}.user_vectors must have d={scorer.dim} columns; got {ex.user_vectors.shape}")
    if ex.n_features != scorer.n_features:
        raise ValueError(
            f"{name}.features has F={ex.n_features} features but the scorer was built with "
            f"n_features={scorer.n_features}"
        )
    real = ex.candidates if ex.mask is None else ex.candidates[ex.mask]
    if real.size and real.max() >= n_items:
        raise ValueError(f"{name}.candidates must index the {n_items}-row item matrix; got max {real.max()}")


class _Tensors:
    """One split's arrays as tensors on the training device (moved once, not per batch)."""

    def __init__(self, ex: RankingExamples, device: torch.device) -> None:
        self.users = torch.as_tensor(ex.user_vectors, device=device)
        mask = np.ones(ex.candidates.shape, dtype=bool) if ex.mask is None else ex.mask
        # Padded slots may hold -1 or garbage; point them at row 0 so the gather is valid; masked later.
        self.cands = torch.as_tensor(np.where(mask, ex.candidates, 0), device=device)
        self.mask = torch.as_tensor(mask, device=device)
        self.features = torch.as_tensor(ex.features, device=device)
        self.target = torch.as_tensor(ex.target, device=device)
        self.n = len(ex)


def _batch_scores(
    scorer: MultiAspectScorer,
    items: torch.Tensor,
    gate: torch.Tensor | None,
    t: _Tensors,
    idx: torch.Tensor | slice,
) -> torch.Tensor:
    cands = t.cands[idx]
    return scorer(
        t.users[idx], items[cands], t.features[idx], gate_items=None if gate is None else gate[cands]
    )


def _scores_all(
    scorer: MultiAspectScorer, items: torch.Tensor, gate: torch.Tensor | None, t: _Tensors, batch_size: int
) -> np.ndarray:
    was_training = scorer.training
    scorer.eval()
    out = []
    with torch.no_grad():
        for start in range(0, t.n, batch_size):
            sl = slice(start, start + batch_size)
            s = _batch_scores(scorer, items, gate, t, sl).masked_fill(~t.mask[sl], float("-inf"))
            out.append(s.float().cpu().numpy())
    scorer.train(was_training)
    return np.concatenate(out)


def _loss(kind: str, scores: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if kind == "softmax":
        # -inf logits drop padded candidates from the softmax; the target is never padded, so no row is empty.
        return F.cross_entropy(scores.masked_fill(~mask, float("-inf")), target)
    rows = torch.arange(scores.shape[0], device=scores.device)
    pos = scores[rows, target][:, None]
    negatives = mask.clone()
    negatives[rows, target] = False
    pair_loss = -F.logsigmoid(pos - scores)
    # A list with no real negative carries no pairwise signal; clamp avoids 0/0 for an all-such batch.
    return (pair_loss * negatives).sum() / negatives.sum().clamp_min(1)


def score_examples(
    scorer: MultiAspectScorer,
    item_matrix: np.ndarray,
    examples: RankingExamples,
    *,
    gate_matrix: np.ndarray | None = None,
    batch_size: int = 1024,
) -> np.ndarray:
    """Eval-mode scores (N, C) float32 for every candidate list; padded candidates get -inf.

    item_matrix: (n_items, d) or (n_items, J, d) float (the scorer's layout); gate_matrix: optional
    (n_items, d) full-text vectors for a tied_fields scorer.
    """
    items_np, gate_np = _check_item_matrix(scorer, item_matrix, gate_matrix)
    _check_examples("examples", examples, scorer, items_np.shape[0])
    device = scorer.alpha.device
    items = torch.as_tensor(items_np, device=device, dtype=torch.float32)
    gate = None if gate_np is None else torch.as_tensor(gate_np, device=device, dtype=torch.float32)
    return _scores_all(scorer, items, gate, _Tensors(examples, device), batch_size)


def evaluate_ndcg(
    scorer: MultiAspectScorer,
    item_matrix: np.ndarray,
    examples: RankingExamples,
    k: int = 10,
    *,
    gate_matrix: np.ndarray | None = None,
    batch_size: int = 1024,
) -> float:
    """NDCG@k of the scorer's eval-mode ranking of each candidate list (see ndcg_at_k_from_scores)."""
    scores = score_examples(scorer, item_matrix, examples, gate_matrix=gate_matrix, batch_size=batch_size)
    return ndcg_at_k_from_scores(scores, examples.target, k=k, mask=examples.mask)


# ---------------------------------------------------------------------------------------------- training
def train_scorer(
    scorer: MultiAspectScorer,
    item_matrix: np.ndarray,
    train: RankingExamples,
    valid: RankingExamples,
    config: TrainConfig | None = None,
    checkpoint_dir: Path | None = None,
    *,
    gate_matrix: np.ndarray | None = None,
) -> TrainResult:
    """Train ``scorer`` in place; on return it holds the best-validation weights and is in eval mode.

    Args:
        scorer: the model to train (its current weights are the "epoch 0" baseline).
        item_matrix: (n_items, d) float item vectors, or (n_items, J, d) for a tied_fields scorer; candidate
            indices in ``train`` / ``valid`` are rows of it.
        train, valid: candidate lists with one positive each.
        config: hyper-parameters; TrainConfig() if None.
        checkpoint_dir: if given, the best weights are saved there as ``best_scorer.pt`` (scorer.save) each
            time validation improves and once more at the end.
        gate_matrix: optional (n_items, d) full-text vectors for a tied_fields scorer's gate and item prior.

    Runs are deterministic for a given seed, data, starting weights and device: torch's and numpy's RNGs are
    seeded inside (the caller's global torch RNG state is restored afterwards).
    """
    cfg = config if config is not None else TrainConfig()
    items_np, gate_np = _check_item_matrix(scorer, item_matrix, gate_matrix)
    _check_examples("train", train, scorer, items_np.shape[0])
    _check_examples("valid", valid, scorer, items_np.shape[0])

    start = time.monotonic()
    deadline = None if cfg.max_minutes is None else start + 60.0 * cfg.max_minutes
    device = torch.device(cfg.device)
    scorer.to(device)
    items = torch.as_tensor(items_np, device=device, dtype=torch.float32)
    gate = None if gate_np is None else torch.as_tensor(gate_np, device=device, dtype=torch.float32)
    tr, va = _Tensors(train, device), _Tensors(valid, device)
    ckpt_path = None
    if checkpoint_dir is not None:
        ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME
        ckpt_path.parent.mkdir(parents=True, exist_ok=True)

    def validate() -> float:
        scores = _scores_all(scorer, items, gate, va, cfg.eval_batch_size)
        return ndcg_at_k_from_scores(scores, valid.target, k=cfg.k, mask=valid.mask)

    fork_devices = [device.index or 0] if device.type == "cuda" else []
    history: list[dict[str, float]] = []
    stop_reason = "epochs"
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(cfg.seed)
        rng = np.random.default_rng(cfg.seed)
        optimizer = torch.optim.AdamW(scorer.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        initial_ndcg = validate()
        best_ndcg, best_epoch = initial_ndcg, 0
        best_state = copy.deepcopy(scorer.state_dict())
        stale = 0
        n_batches = math.ceil(tr.n / cfg.batch_size)
        for epoch in range(1, cfg.epochs + 1):
            scorer.train()
            order = torch.as_tensor(rng.permutation(tr.n), device=device)
            total, seen, out_of_time = 0.0, 0, False
            bar = tqdm(
                range(n_batches), desc=f"epoch {epoch}/{cfg.epochs}", leave=False, disable=not cfg.progress
            )
            for b in bar:
                idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
                scores = _batch_scores(scorer, items, gate, tr, idx)
                loss = _loss(cfg.loss, scores, tr.target[idx], tr.mask[idx])
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"training loss became {loss.item()} at epoch {epoch}, batch {b}; "
                        f"lower lr (now {cfg.lr}) or check the inputs for extreme values"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item() * len(idx)
                seen += len(idx)
                bar.set_postfix(loss=f"{total / seen:.4f}")
                if deadline is not None and time.monotonic() >= deadline:
                    out_of_time = True
                    break
            bar.close()
            ndcg = validate()
            history.append(
                {
                    "epoch": epoch,
                    "loss": total / max(seen, 1),
                    "valid_ndcg": ndcg,
                    "seconds": time.monotonic() - start,
                    "batches": b + 1,
                }
            )
            if ndcg > best_ndcg + cfg.min_delta:
                best_ndcg, best_epoch, stale = ndcg, epoch, 0
                best_state = copy.deepcopy(scorer.state_dict())
                if ckpt_path is not None:
                    scorer.save(ckpt_path)
            else:
                stale += 1
            if out_of_time:
                stop_reason = "max_minutes"
                break
            if stale >= cfg.patience:
                stop_reason = "patience"
                break

    scorer.load_state_dict(best_state)
    scorer.eval()
    if ckpt_path is not None:
        # Also covers best_epoch == 0, when no improvement triggered a save during training.
        scorer.save(ckpt_path)
    return TrainResult(
        history=history,
        best_epoch=best_epoch,
        best_ndcg=best_ndcg,
        seconds=time.monotonic() - start,
        initial_ndcg=initial_ndcg,
        stop_reason=stop_reason,
        checkpoint_path=ckpt_path,
        config=cfg,
    )


def train_feature_weights(
    scorer: MultiAspectScorer,
    item_matrix: np.ndarray,
    train: RankingExamples,
    valid: RankingExamples,
    config: TrainConfig | None = None,
    *,
    gate_matrix: np.ndarray | None = None,
) -> TrainResult:
    """Train only the fusion weights β (everything else frozen), then unfreeze.

    The features are few and strong, the bilinear part is large and overfits quickly: fitting β first, at a
    higher learning rate, lets early stopping of the full model start from the best linear fusion instead
    of stopping before β has moved.
    """
    frozen = [p for name, p in scorer.named_parameters() if name != "beta" and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        return train_scorer(scorer, item_matrix, train, valid, config, gate_matrix=gate_matrix)
    finally:
        for p in frozen:
            p.requires_grad_(True)
