"""Item factors read from text, for items the retrieval model has no event of.

A matrix-factorisation retriever (Merlin ALS / BPR) knows only the items in its training logs: a new item
cannot be a candidate at all, however well its text matches a user. ``TextAdapter`` is a ridge map from an
item's text vectors (its aspect vectors side by side, the whole text among them) to the retriever's item
factor, fitted on the items with enough events; the factor it predicts for an item without events stands
in for the missing one, so the item is scored like any other (``user factor . predicted factor``) and can
enter the candidates the reranker reorders. Plain numpy: the fit is one linear solve per penalty tried.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

RIDGE_LAMBDAS = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
RIDGE_VALID_SHARE = 0.2
MIN_ITEMS = 10
# The validation fifth is drawn from its own seeded stream (the cold-start protocol draws from others).
RIDGE_STREAM = 4


@dataclass
class TextAdapter:
    """``predict(text) = [text, 1] @ weights``: (N, D) text matrix -> (N, F) item factors."""

    weights: np.ndarray  # (D + 1, F): the last row is the intercept
    ridge: float
    items: int  # items it was fitted on
    valid_r2: float  # share of the factors' variance explained on the held-out fifth (chosen penalty)

    def predict(self, text: np.ndarray) -> np.ndarray:
        text = np.asarray(text, dtype=np.float64)
        if text.ndim != 2 or text.shape[1] != self.weights.shape[0] - 1:
            raise ValueError(
                f"the text adapter reads (N, {self.weights.shape[0] - 1}) text matrices, got shape "
                f"{text.shape}"
            )
        return np.hstack([text, np.ones((len(text), 1))]) @ self.weights

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        np.save(path / "weights.npy", self.weights)
        info = {"ridge": self.ridge, "items": self.items, "valid_r2": self.valid_r2}
        (path / "text_adapter.json").write_text(json.dumps(info))

    @classmethod
    def load(cls, path: str | Path) -> TextAdapter:
        path = Path(path)
        info = json.loads((path / "text_adapter.json").read_text())
        return cls(np.load(path / "weights.npy"), float(info["ridge"]), int(info["items"]), info["valid_r2"])

    @property
    def info(self) -> dict[str, float | int]:
        return {"ridge": self.ridge, "fitted_on_items": self.items, "valid_r2": round(self.valid_r2, 4)}


def fit_text_adapter(text: np.ndarray, factors: np.ndarray, seed: int) -> TextAdapter:
    """Ridge regression ``text -> factors`` (one row per item). The penalty is chosen by the squared error
    on a seeded fifth of the items, then the map is refitted on all of them."""
    x = np.asarray(text, dtype=np.float64)
    y = np.asarray(factors, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
        raise ValueError(
            f"expected (N, D) text and (N, F) factors for the same items, got {x.shape} and {y.shape}"
        )
    if len(x) < MIN_ITEMS:
        raise ValueError(f"only {len(x)} items to fit the text adapter on; expected >= {MIN_ITEMS}")
    order = np.random.default_rng([seed, RIDGE_STREAM]).permutation(len(x))
    cut = max(1, int(len(order) * RIDGE_VALID_SHARE))
    valid, train = order[:cut], order[cut:]
    errors = {lam: _ridge_error(x[train], y[train], x[valid], y[valid], lam) for lam in RIDGE_LAMBDAS}
    best = min(errors, key=errors.get)
    spread = float(((y[valid] - y[train].mean(axis=0)) ** 2).mean())
    r2 = 1.0 - errors[best] / spread if spread > 0 else 0.0
    return TextAdapter(_ridge(x, y, best), best, int(len(x)), float(r2))


def _ridge(x: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
    xa = np.hstack([x, np.ones((len(x), 1))])
    penalty = lam * np.eye(xa.shape[1])
    penalty[-1, -1] = 0.0  # the intercept is not shrunk
    return np.linalg.solve(xa.T @ xa + penalty, xa.T @ y)


def _ridge_error(x: np.ndarray, y: np.ndarray, xv: np.ndarray, yv: np.ndarray, lam: float) -> float:
    w = _ridge(x, y, lam)
    return float(((np.hstack([xv, np.ones((len(xv), 1))]) @ w - yv) ** 2).mean())
