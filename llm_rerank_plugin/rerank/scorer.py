"""Personalized multi-aspect bilinear scorer: the learned part of the LLM rerank stage.

A user vector ``u`` (d,) and an item vector ``v`` (d,) come from a pretrained text encoder (L2-normalised;
d=384 for MiniLM). Each aspect ``j`` (named, e.g. "overall", "title", "genres", "era") has a low-rank matrix
``M_j = A_j B_jᵀ`` (A_j, B_j ∈ R^{d×r}) and scores

    s_j = uᵀ M_j v_j / ‖M_j‖_F

where ``v_j = v`` for plain learned aspects, or the encoding of aspect j's own text field when the scorer is
built with ``tied_fields=True``. A gate MLP over ``u ⊕ v`` gives per-aspect logits; an optional per-user
additive gate bias (online feedback) is added to the logits, then

    mode "max":     w = softplus(logits),  r = max_j w_j s_j      (gradient flows through the argmax)
    mode "softmax": w = softmax(logits),   r = Σ_j w_j s_j

and the final score fuses extra per-candidate features (retrieval score z-normalised per user, log popularity,
...) and a text-derived item prior:

    score = α·r + βᵀ·features + item_prior(v)

``precompute_items`` + ``score_fast`` give a numpy serving path: everything that depends on the item alone is
cached, so a request costs one small mat-vec for the user plus a few dot products per candidate.
"""

from __future__ import annotations

import math
import os
import tempfile
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MODES = ("max", "softmax")
CHECKPOINT_FORMAT = "llm_rerank_plugin.rerank.MultiAspectScorer"
CHECKPOINT_VERSION = 1
# Guards ‖M_j‖_F (a collapsed aspect matrix) and the share denominator (all aspect contributions zero).
_EPS = 1e-12


@dataclass(frozen=True)
class ItemProjections:
    """Item-side cache for :meth:`MultiAspectScorer.score_fast`, plus a numpy snapshot of user-side weights.

    The snapshot is taken together with the item caches so the two halves always come from the same weights;
    ``score_fast`` refuses projections whose scorer has been modified since (re-run ``precompute_items``).

    Item caches (N = number of items, J = aspects, r = rank, H = gate hidden size), all float32:
        item_right: (N, J, r)  B_jᵀ v_j for every aspect.
        gate_item:  (N, H)     W_v v, the item half of the gate's first layer (no bias).
        item_bias:  (N,)       the text-derived item prior.
    User-side snapshot, float32:
        user_proj:  (d, J·r + H)  [A_j / ‖M_j‖_F for all j | W_uᵀ], so one mat-vec projects the user.
        user_bias:  (J·r + H,)    zeros for the aspect part, the gate's first-layer bias for the rest.
        gate_out_wt: (H, J), gate_out_b: (J,), beta: (F,), alpha: float.
    """

    item_right: np.ndarray
    gate_item: np.ndarray
    item_bias: np.ndarray
    user_proj: np.ndarray
    user_bias: np.ndarray
    gate_out_wt: np.ndarray
    gate_out_b: np.ndarray
    beta: np.ndarray
    alpha: float
    mode: str
    # The scorer (weakly, so a cache does not keep a discarded model alive) and each of its parameters with
    # its version counter at precompute time — see MultiAspectScorer._check_fresh.
    owner: weakref.ref[MultiAspectScorer] = field(repr=False, compare=False)
    param_versions: tuple[tuple[torch.Tensor, int], ...] = field(repr=False, compare=False)

    @property
    def n_items(self) -> int:
        return int(self.item_right.shape[0])


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in x.shape)


class MultiAspectScorer(nn.Module):
    """Personalized multi-aspect scorer ``score(u, items, features, gate_bias) -> (B, C)``.

    Args:
        dim: encoder dimension d (384 for MiniLM).
        aspect_names: J unique, non-empty aspect names; with ``tied_fields`` they are also the text fields
            whose encodings make up the item input's J axis, in this order.
        rank: rank r of each aspect matrix M_j = A_j B_jᵀ.
        gate_hidden: hidden width H of the gate MLP.
        mode: "max" (r = max_j w_j s_j, w = softplus) or "softmax" (r = Σ_j softmax(logits)_j s_j).
        n_features: F, the number of extra per-candidate features; column 0 is by convention the retrieval
            score.
        tied_fields: if True, items are (B, C, J, d), one encoding per aspect field; else (B, C, d).
        dropout: dropout on the gate's hidden layer (training only).
        feature_init: initial β. A float sets β_0 (the retrieval score) and leaves the others at 0, so the
            untrained stage starts close to retrieval order; a sequence of F floats sets all of β.
    """

    def __init__(
        self,
        dim: int,
        aspect_names: Sequence[str],
        rank: int = 64,
        gate_hidden: int = 128,
        mode: str = "max",
        n_features: int = 1,
        tied_fields: bool = False,
        dropout: float = 0.1,
        feature_init: float | Sequence[float] = 0.1,
    ) -> None:
        super().__init__()
        if isinstance(aspect_names, str):
            raise TypeError(f"aspect_names must be a list of strings; got the single string {aspect_names!r}")
        names = list(aspect_names)
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"aspect_names must be a non-empty list of non-empty strings; got {names!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"aspect_names must be unique; got {names!r}")
        for label, value in (("dim", dim), ("rank", rank), ("gate_hidden", gate_hidden)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{label} must be a positive int; got {value!r}")
        if not isinstance(n_features, int) or isinstance(n_features, bool) or n_features < 0:
            raise ValueError(f"n_features must be an int >= 0; got {n_features!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {dropout!r}")
        if isinstance(feature_init, (int, float)):
            beta0 = [0.0] * n_features
            if n_features:
                beta0[0] = float(feature_init)
        else:
            beta0 = [float(b) for b in feature_init]
            if len(beta0) != n_features:
                raise ValueError(
                    f"feature_init must be a float or {n_features} floats (one per feature); got {len(beta0)}"
                )

        self.dim = dim
        self.aspect_names = names
        self.rank = rank
        self.gate_hidden = gate_hidden
        self.mode = mode
        self.n_features = n_features
        self.tied_fields = bool(tied_fields)
        self.dropout = float(dropout)
        self.feature_init: list[float] = beta0

        n_aspects = len(names)
        # s_j is invariant to the scale of A_j and B_j, so this only sets the optimiser's step size relative
        # to the weights; 1/sqrt(d) keeps uᵀA_j entries O(1/sqrt(d)) for unit-norm u.
        self.aspect_a = nn.Parameter(torch.randn(n_aspects, dim, rank) / math.sqrt(dim))
        self.aspect_b = nn.Parameter(torch.randn(n_aspects, dim, rank) / math.sqrt(dim))
        # One Linear over [u; v] (the textbook form); forward and precompute use its two column blocks
        # separately so the user half is computed once per user instead of once per candidate.
        self.gate_in = nn.Linear(2 * dim, gate_hidden)
        self.gate_drop = nn.Dropout(self.dropout)
        self.gate_out = nn.Linear(gate_hidden, n_aspects)
        # No bias: a constant shift changes no ranking within a candidate list.
        self.item_prior = nn.Linear(dim, 1, bias=False)
        nn.init.zeros_(self.item_prior.weight)
        self.alpha = nn.Parameter(torch.tensor(1.0))
        self.beta = nn.Parameter(torch.tensor(beta0, dtype=torch.float32).reshape(n_features))

    # ------------------------------------------------------------------ config / persistence
    @property
    def n_aspects(self) -> int:
        return len(self.aspect_names)

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments (plain Python values) that rebuild this scorer's architecture."""
        return {
            "dim": self.dim,
            "aspect_names": list(self.aspect_names),
            "rank": self.rank,
            "gate_hidden": self.gate_hidden,
            "mode": self.mode,
            "n_features": self.n_features,
            "tied_fields": self.tied_fields,
            "dropout": self.dropout,
            "feature_init": list(self.feature_init),
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``{"format", "version", "config", "state_dict"}`` atomically (torch.save); return the path.

        Contents are tensors and plain Python values only, so ``torch.load(..., weights_only=True)`` reads it.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "config": self.config,
            "state_dict": {k: v.detach().cpu().clone() for k, v in self.state_dict().items()},
        }
        # Write-then-rename so a crash mid-save never leaves a truncated checkpoint where a good one was.
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            torch.save(payload, tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
    ) -> MultiAspectScorer:
        """Rebuild a scorer written by :meth:`save` (loaded with weights_only=True); returned in eval mode."""
        payload = torch.load(Path(path), map_location=map_location, weights_only=True)
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(
                f"{path} is not a MultiAspectScorer checkpoint: expected a dict with "
                f"format={CHECKPOINT_FORMAT!r}"
            )
        if payload.get("version") != CHECKPOINT_VERSION:
            raise ValueError(
                f"{path} has checkpoint version {payload.get('version')!r}; "
                f"this code reads version {CHECKPOINT_VERSION}"
            )
        scorer = cls(**payload["config"])
        scorer.load_state_dict(payload["state_dict"], strict=True)
        return scorer.eval()

    # ------------------------------------------------------------------ scoring
    def aspect_norms(self) -> torch.Tensor:
        """‖A_j B_jᵀ‖_F for every aspect, (J,) — exact, in O(d·r²) instead of forming the d×d matrices.

        ‖A Bᵀ‖_F² = trace(B AᵀA Bᵀ) = trace((AᵀA)(BᵀB)) = Σ (AᵀA) ⊙ (BᵀB), the last step because both Gram
        matrices are symmetric.
        """
        ata = self.aspect_a.transpose(1, 2) @ self.aspect_a
        btb = self.aspect_b.transpose(1, 2) @ self.aspect_b
        return (ata * btb).sum(dim=(1, 2)).clamp_min(_EPS).sqrt()

    def _items_layout(self) -> str:
        n, d = self.n_aspects, self.dim
        if self.tied_fields:
            return f"(B, C, {n}, {d}) for this scorer (tied_fields=True: one vector per aspect field)"
        return (
            f"(B, C, {d}) for this scorer (tied_fields=False; per-field (B, C, {n}, {d}) "
            "needs tied_fields=True)"
        )

    def _as_float(self, name: str, x: Any) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            x = torch.as_tensor(np.asarray(x))
        if not torch.is_floating_point(x):
            raise TypeError(f"{name} must be a floating-point tensor; got dtype {x.dtype}")
        p = self.alpha
        return x.to(device=p.device, dtype=p.dtype)

    def _check_inputs(
        self,
        u: torch.Tensor,
        items: torch.Tensor,
        features: torch.Tensor | None,
        gate_bias: torch.Tensor | None,
        gate_items: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        d, n_asp = self.dim, self.n_aspects
        u = self._as_float("u", u)
        items = self._as_float("items", items)
        if u.ndim != 2 or u.shape[1] != d:
            raise ValueError(f"u must have shape (B, {d}); got {_shape(u)}")
        b = u.shape[0]
        want_ndim = 4 if self.tied_fields else 3
        if (
            items.ndim != want_ndim
            or items.shape[-1] != d
            or (self.tied_fields and items.shape[2] != n_asp)
            or items.shape[0] != b
        ):
            raise ValueError(f"items must have shape {self._items_layout()} with B={b}; got {_shape(items)}")
        c = items.shape[1]
        if features is not None:
            features = self._as_float("features", features)
            if features.shape != (b, c, self.n_features):
                raise ValueError(
                    f"features must have shape (B, C, F) = ({b}, {c}, {self.n_features}); "
                    f"got {_shape(features)}"
                )
        if gate_bias is not None:
            gate_bias = self._as_float("gate_bias", gate_bias)
            if gate_bias.shape != (b, n_asp):
                raise ValueError(
                    f"gate_bias must have shape (B, J) = ({b}, {n_asp}), one bias per aspect "
                    f"{self.aspect_names}; got {_shape(gate_bias)}"
                )
        if gate_items is not None:
            if not self.tied_fields:
                raise ValueError(
                    "gate_items (a separate full-text item vector) only applies with tied_fields=True"
                )
            gate_items = self._as_float("gate_items", gate_items)
            if gate_items.shape != (b, c, d):
                raise ValueError(
                    f"gate_items must have shape (B, C, d) = ({b}, {c}, {d}); got {_shape(gate_items)}"
                )
        return u, items, features, gate_bias, gate_items

    def _compute(
        self,
        u: torch.Tensor,
        items: torch.Tensor,
        features: torch.Tensor | None,
        gate_bias: torch.Tensor | None,
        gate_items: torch.Tensor | None,
        explain: bool,
    ) -> dict[str, torch.Tensor]:
        u, items, features, gate_bias, gate_items = self._check_inputs(
            u, items, features, gate_bias, gate_items
        )
        d = self.dim
        norms = self.aspect_norms()
        # Fold the aspect matrices into the user once: q_j = B_j A_jᵀ u / ‖M_j‖ (B, J, d). Each candidate then
        # costs a d-dot per aspect instead of a d×r projection.
        ua = torch.einsum("bd,jdr->bjr", u, self.aspect_a) / norms[None, :, None]
        q = torch.einsum("bjr,jer->bje", ua, self.aspect_b)
        if self.tied_fields:
            aspect_scores = torch.einsum("bcjd,bjd->bcj", items, q)
            v_gate = gate_items if gate_items is not None else items.mean(dim=2)
        else:
            aspect_scores = torch.bmm(items, q.transpose(1, 2))
            v_gate = items
        w_in = self.gate_in.weight
        hu = F.linear(u, w_in[:, :d], self.gate_in.bias)
        hv = F.linear(v_gate, w_in[:, d:])
        hidden = self.gate_drop(F.relu(hu[:, None, :] + hv))
        logits = self.gate_out(hidden)
        if gate_bias is not None:
            logits = logits + gate_bias[:, None, :]
        # softplus keeps max-mode weights non-negative, so the max picks the strongest positive evidence
        # rather than a product of two negatives; softmax mode is a convex mixture of the aspect scores.
        weights = F.softplus(logits) if self.mode == "max" else torch.softmax(logits, dim=-1)
        contrib = weights * aspect_scores
        if self.mode == "max":
            bilinear, aspect_idx = contrib.max(dim=-1)
        else:
            bilinear = contrib.sum(dim=-1)
            aspect_idx = contrib.argmax(dim=-1)
        item_bias = self.item_prior(v_gate).squeeze(-1)
        feature_term = features @ self.beta if features is not None else torch.zeros_like(bilinear)
        score = self.alpha * bilinear + feature_term + item_bias
        out = {"score": score}
        if explain:
            abs_c = contrib.abs()
            share = abs_c.gather(-1, aspect_idx[..., None]).squeeze(-1) / abs_c.sum(-1).clamp_min(_EPS)
            out.update(
                aspect_scores=aspect_scores,
                gate_logits=logits,
                gate_weights=weights,
                bilinear=bilinear,
                aspect_idx=aspect_idx,
                aspect_share=share,
                item_bias=item_bias,
                feature_term=feature_term,
            )
        return out

    def forward(
        self,
        u: torch.Tensor,
        items: torch.Tensor,
        features: torch.Tensor | None = None,
        gate_bias: torch.Tensor | None = None,
        *,
        gate_items: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Fused scores (B, C), in the parameters' dtype.

        Args:
            u: (B, d) float user vectors.
            items: (B, C, d) float item vectors, or (B, C, J, d) per-aspect field vectors if ``tied_fields``.
            features: (B, C, F) float extra features (column 0: retrieval score z-normalised per user), or
                None to drop the feature term (same as all-zero features).
            gate_bias: (B, J) float per-user additive gate-logit bias (online feedback), or None.
            gate_items: (B, C, d) float full-text item vectors for the gate and the item prior (tied_fields
                only); None uses the mean of the J field vectors.
        """
        return self._compute(u, items, features, gate_bias, gate_items, explain=False)["score"]

    def components(
        self,
        u: torch.Tensor,
        items: torch.Tensor,
        features: torch.Tensor | None = None,
        gate_bias: torch.Tensor | None = None,
        *,
        gate_items: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Everything behind the score, for explanations. Same inputs as :meth:`forward`.

        Returns a dict of tensors:
            aspect_scores (B, C, J) s_j;  gate_logits (B, C, J), gate bias included;
            gate_weights (B, C, J) w;
            bilinear (B, C) r;  score (B, C) the fused score (== forward);  item_bias (B, C);
            feature_term (B, C) βᵀ·features;
            aspect_idx (B, C) int64, the aspect with the largest w_j·s_j (the argmax that "max" mode uses);
            aspect_share (B, C) in [0, 1], |w_i s_i| / Σ_k |w_k s_k| for that aspect i (0 if all are 0).
        """
        return self._compute(u, items, features, gate_bias, gate_items, explain=True)

    # ------------------------------------------------------------------ fast serving path
    def _check_fresh(self, proj: ItemProjections) -> None:
        # Every in-place update (optimizer.step, load_state_dict, no_grad assignment) bumps a tensor's version
        # counter. The parameters are held by the projections rather than re-listed per request because
        # self.parameters() walks the module tree, which would be a large part of a ~100 µs request.
        if proj.owner() is not self or any(p._version != v for p, v in proj.param_versions):
            raise ValueError(
                "ItemProjections are stale: they were computed by another scorer or before this scorer's "
                "weights changed; call precompute_items again"
            )

    @torch.no_grad()
    def precompute_items(
        self, item_matrix: np.ndarray, gate_matrix: np.ndarray | None = None, batch_size: int = 4096
    ) -> ItemProjections:
        """Cache everything item-only for :meth:`score_fast`.

        Args:
            item_matrix: (N, d) float item vectors, or (N, J, d) per-aspect field vectors if ``tied_fields``.
            gate_matrix: (N, d) float full-text vectors for the gate and item prior (tied_fields only), or
                None to use the mean of the field vectors — the same choice as ``gate_items`` in forward.
            batch_size: items per chunk, to bound peak memory on large catalogues.
        """
        d, n_asp = self.dim, self.n_aspects
        items = np.asarray(item_matrix)
        want = (n_asp, d) if self.tied_fields else (d,)
        if (
            items.ndim != len(want) + 1
            or items.shape[1:] != want
            or not np.issubdtype(items.dtype, np.floating)
        ):
            layout = f"(N, {n_asp}, {d})" if self.tied_fields else f"(N, {d})"
            raise ValueError(
                f"item_matrix must be a float array of shape {layout} (tied_fields={self.tied_fields}); "
                f"got {items.dtype} {items.shape}"
            )
        if gate_matrix is not None:
            if not self.tied_fields:
                raise ValueError("gate_matrix (full-text item vectors) only applies with tied_fields=True")
            gate_matrix = np.asarray(gate_matrix)
            if gate_matrix.shape != (items.shape[0], d):
                raise ValueError(
                    f"gate_matrix must have shape ({items.shape[0]}, {d}); got {gate_matrix.shape}"
                )
        param_versions = tuple((p, int(p._version)) for p in self.parameters())
        dev, dt = self.alpha.device, self.alpha.dtype
        w_in = self.gate_in.weight
        rights, gates, biases = [], [], []
        for start in range(0, items.shape[0], batch_size):
            v = torch.as_tensor(items[start : start + batch_size], device=dev, dtype=dt)
            if self.tied_fields:
                rights.append(torch.einsum("njd,jdr->njr", v, self.aspect_b))
                if gate_matrix is not None:
                    vg = torch.as_tensor(gate_matrix[start : start + batch_size], device=dev, dtype=dt)
                else:
                    vg = v.mean(dim=1)
            else:
                rights.append(torch.einsum("nd,jdr->njr", v, self.aspect_b))
                vg = v
            gates.append(F.linear(vg, w_in[:, d:]))
            biases.append(self.item_prior(vg).squeeze(-1))

        def cat(parts: list[torch.Tensor], empty_shape: tuple[int, ...]) -> np.ndarray:
            if not parts:
                return np.zeros(empty_shape, dtype=np.float32)
            return np.ascontiguousarray(torch.cat(parts).cpu().numpy(), dtype=np.float32)

        left = (self.aspect_a / self.aspect_norms()[:, None, None]).permute(1, 0, 2).reshape(d, -1)
        user_proj = torch.cat([left, w_in[:, :d].T], dim=1)
        user_bias = torch.cat([torch.zeros(left.shape[1], device=dev, dtype=dt), self.gate_in.bias])

        def np32(t: torch.Tensor) -> np.ndarray:
            return np.ascontiguousarray(t.detach().cpu().numpy(), dtype=np.float32)

        return ItemProjections(
            item_right=cat(rights, (0, n_asp, self.rank)),
            gate_item=cat(gates, (0, self.gate_hidden)),
            item_bias=cat(biases, (0,)),
            user_proj=np32(user_proj),
            user_bias=np32(user_bias),
            gate_out_wt=np32(self.gate_out.weight.T),
            gate_out_b=np32(self.gate_out.bias),
            beta=np32(self.beta),
            alpha=float(self.alpha),
            mode=self.mode,
            owner=weakref.ref(self),
            param_versions=param_versions,
        )

    def score_fast(
        self,
        u: np.ndarray,
        item_idx: np.ndarray,
        proj: ItemProjections,
        features: np.ndarray | None = None,
        gate_bias: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Score one user's candidates in numpy; equals forward() in eval mode up to float32 rounding.

        Args:
            u: (d,) float user vector.
            item_idx: (C,) int row indices into the matrix given to :meth:`precompute_items`.
            proj: projections from :meth:`precompute_items` on this scorer, with unchanged weights since.
            features: (C, F) float extra features, or None for no feature term.
            gate_bias: (J,) float additive gate-logit bias, or None.
        Returns:
            scores (C,) float32, aspect_idx (C,) int64 (the winning aspect), share (C,) float32 (its share of
            Σ_k |w_k s_k|) — the same as components()'s score, aspect_idx and aspect_share.
        """
        self._check_fresh(proj)
        d, n_asp, rank = self.dim, self.n_aspects, self.rank
        u = np.asarray(u, dtype=np.float32)
        if u.shape != (d,):
            raise ValueError(f"u must have shape ({d},); got {u.shape}")
        idx = np.asarray(item_idx)
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"item_idx must be a 1-D integer array (C,); got {idx.dtype} {idx.shape}")
        c = idx.shape[0]
        # Negative indices would silently wrap around in numpy fancy indexing.
        if c and (idx.min() < 0 or idx.max() >= proj.n_items):
            raise ValueError(
                f"item_idx must lie in [0, {proj.n_items}); got min {idx.min()}, max {idx.max()}"
            )

        z = u @ proj.user_proj + proj.user_bias
        split = n_asp * rank
        aspect_scores = np.einsum("cjr,jr->cj", proj.item_right[idx], z[:split].reshape(n_asp, rank))
        hidden = np.maximum(proj.gate_item[idx] + z[split:], 0.0)
        logits = hidden @ proj.gate_out_wt + proj.gate_out_b
        if gate_bias is not None:
            gate_bias = np.asarray(gate_bias, dtype=np.float32)
            if gate_bias.shape != (n_asp,):
                raise ValueError(
                    f"gate_bias must have shape ({n_asp},), one per aspect {self.aspect_names}; "
                    f"got {gate_bias.shape}"
                )
            logits = logits + gate_bias
        if proj.mode == "max":
            weights = np.logaddexp(np.float32(0.0), logits)
        else:
            e = np.exp(logits - logits.max(axis=1, keepdims=True))
            weights = e / e.sum(axis=1, keepdims=True)
        contrib = weights * aspect_scores
        aspect_idx = contrib.argmax(axis=1)
        picked = contrib[np.arange(c), aspect_idx]
        bilinear = picked if proj.mode == "max" else contrib.sum(axis=1)
        share = np.abs(picked) / np.maximum(np.abs(contrib).sum(axis=1), _EPS)
        scores = proj.alpha * bilinear + proj.item_bias[idx]
        if features is not None:
            features = np.asarray(features, dtype=np.float32)
            if features.shape != (c, self.n_features):
                raise ValueError(
                    f"features must have shape (C, F) = ({c}, {self.n_features}); got {features.shape}"
                )
            scores = scores + features @ proj.beta
        return (
            scores.astype(np.float32, copy=False),
            aspect_idx.astype(np.int64, copy=False),
            share.astype(np.float32, copy=False),
        )
