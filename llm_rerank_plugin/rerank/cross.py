"""A cross-encoder that scores (user text, item text) pairs, with a small listwise fine-tuning loop.

Built on ``AutoModelForSequenceClassification(num_labels=1)``. Starting from a plain encoder such as
the packaged all-MiniLM-L6-v2 the scoring head is freshly (and seed-deterministically) initialised,
so scores mean nothing until :meth:`CrossEncoder.fit` has run; a folder written by
:meth:`CrossEncoder.save` loads back with its trained head.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .encoder import model_fingerprint, resolve_device, resolve_model, write_json_atomic

__all__ = ["CrossEncoder", "SETTINGS_FILE"]

logger = logging.getLogger(__name__)

SETTINGS_FILE = "cross_encoder.json"
_SETTINGS_FORMAT = 1
_PROGRESS_MIN_BATCHES = 4

Group = tuple[str, Sequence[str], int]


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


@contextlib.contextmanager
def _quiet_transformers_load() -> Iterator[None]:
    # transformers 5 logs a "LOAD REPORT" warning table for the freshly initialised head, which is
    # expected here; _load_model reports missing keys itself. A filter rather than a higher logger
    # level: transformers 5.24 runs an extra tensor-parallel check (and warns "layers were not
    # sharded") whenever that logger's level is WARNING or above.
    lg = logging.getLogger("transformers.modeling_utils")
    drop = _DropLoadReport()
    lg.addFilter(drop)
    try:
        yield
    finally:
        lg.removeFilter(drop)


def _check_pairs(pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    out = []
    for i, pair in enumerate(pairs):
        if (
            not isinstance(pair, tuple | list)
            or len(pair) != 2
            or not isinstance(pair[0], str)
            or not isinstance(pair[1], str)
        ):
            raise TypeError(f"pairs[{i}] must be a (user_text: str, item_text: str) pair, got {pair!r:.120}")
        out.append((pair[0], pair[1]))
    return out


def _check_groups(groups: Sequence[Group]) -> list[tuple[str, list[str], int]]:
    out = []
    for i, group in enumerate(groups):
        try:
            user, items, pos = group
        except (TypeError, ValueError):
            raise TypeError(
                f"groups[{i}] must be (user_text, [item texts], positive_index), got {group!r:.120}"
            ) from None
        items = list(items)
        if not isinstance(user, str) or not all(isinstance(t, str) for t in items):
            raise TypeError(f"groups[{i}]: user_text and item texts must be str")
        if len(items) < 2:
            raise ValueError(
                f"groups[{i}] has {len(items)} item text(s); "
                "a listwise loss needs at least 2 (the positive + negatives)"
            )
        if isinstance(pos, bool) or not isinstance(pos, int | np.integer) or not 0 <= pos < len(items):
            raise ValueError(f"groups[{i}]: positive_index must be an int in [0, {len(items)}), got {pos!r}")
        out.append((user, items, int(pos)))
    return out


class CrossEncoder:
    """Score (user text, item text) pairs with a transformer + one-logit head.

    The tokenizer truncates only the first text (the user's profile + history, whose oldest end is
    least useful) so the item text is kept whole; only an item text that alone overflows
    ``max_length`` gets truncated too.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        device: str = "auto",
        max_length: int = 256,
        allow_download: bool = False,
        seed: int = 0,
    ) -> None:
        if max_length < 8:
            raise ValueError(f"max_length must be >= 8 tokens to fit a pair, got {max_length}")
        from transformers import AutoTokenizer

        self.model_path = resolve_model(model, allow_download=allow_download)
        self.device = resolve_device(device)
        self.seed = int(seed)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, local_files_only=True)
        self.model = self._load_model(self.model_path, self.seed).to(self.device).eval()
        limit = getattr(self.model.config, "max_position_embeddings", None) or max_length
        self.max_length = int(min(max_length, limit))
        self._pair_special = self.tokenizer.num_special_tokens_to_add(pair=True)
        self._model_id = model_fingerprint(self.model_path)
        # bf16 autocast on GPUs that have it: ~2x faster, and unlike fp16 it needs no loss scaling in fit()
        self._amp_dtype = (
            torch.bfloat16 if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else None
        )

    @staticmethod
    def _load_model(path: str, seed: int) -> torch.nn.Module:
        from transformers import AutoModelForSequenceClassification

        # The fresh head is drawn from the global torch RNG: seed it, without disturbing the caller's RNG.
        with torch.random.fork_rng(devices=[]), _quiet_transformers_load():
            torch.manual_seed(seed)
            model, info = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=1, local_files_only=True, output_loading_info=True
            )
        missing = sorted(info.get("missing_keys") or [])
        if missing:
            heads = [k for k in missing if k.startswith(("classifier", "score", "pre_classifier"))]
            others = [k for k in missing if k not in heads]
            logger.info("cross-encoder %s: new scoring head %s (expected before fine-tuning)", path, heads)
            if others:
                logger.warning("cross-encoder %s: freshly initialised body weights %s", path, others)
        if info.get("mismatched_keys"):
            logger.warning(
                "cross-encoder %s: re-initialised mismatched weights %s", path, info["mismatched_keys"]
            )
        return model

    @property
    def model_id(self) -> str:
        """Stable id of the loaded weights (path + hash of config and weight files)."""
        return self._model_id

    def __repr__(self) -> str:
        return f"CrossEncoder(model={self.model_path!r}, device={self.device}, max_length={self.max_length})"

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self._amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self._amp_dtype)

    def _tokenize(self, pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
        users = [u for u, _ in pairs]
        items = [t for _, t in pairs]
        common = {"max_length": self.max_length, "padding": True, "return_tensors": "pt"}
        try:
            return dict(self.tokenizer(users, items, truncation="only_first", **common))
        except Exception:
            # "only_first" raises when an item text alone overflows max_length. Let those pairs
            # (only those) truncate both sides; every other pair keeps its item text whole.
            pass
        item_lens = [len(ids) for ids in self.tokenizer(items, add_special_tokens=False)["input_ids"]]
        budget = self.max_length - self._pair_special
        features = []
        for (u, t), n in zip(pairs, item_lens, strict=True):
            strategy = "only_first" if n < budget else "longest_first"
            features.append(dict(self.tokenizer(u, t, truncation=strategy, max_length=self.max_length)))
        return dict(self.tokenizer.pad(features, padding=True, return_tensors="pt"))

    def _logits(self, pairs: list[tuple[str, str]]) -> torch.Tensor:
        enc = {k: v.to(self.device) for k, v in self._tokenize(pairs).items()}
        with self._autocast():
            logits = self.model(**enc).logits
        return logits[:, 0].float()

    def predict(
        self, pairs: Sequence[tuple[str, str]], batch_size: int = 64, show_progress: bool | None = None
    ) -> np.ndarray:
        """Score ``(user_text, item_text)`` pairs: float32 logits of shape ``(len(pairs),)``, input order.

        Higher means more relevant; logits are comparable within one model only.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        pairs = _check_pairs(pairs)
        out = np.zeros(len(pairs), dtype=np.float32)
        if not pairs:
            return out
        order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]), reverse=True)
        spans = [(s, min(s + batch_size, len(order))) for s in range(0, len(order), batch_size)]
        show = show_progress if show_progress is not None else len(spans) > _PROGRESS_MIN_BATCHES
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                for s, e in tqdm(spans, desc="Scoring pairs", unit="batch", disable=not show, leave=False):
                    idx = order[s:e]
                    out[idx] = self._logits([pairs[i] for i in idx]).cpu().numpy()
        finally:
            self.model.train(was_training)
        return out

    def rank(
        self, query: str, documents: Sequence[str], top_k: int | None = None, batch_size: int = 64
    ) -> list[dict[str, Any]]:
        """Score every document against ``query``; returns ``[{"corpus_id": int, "score": float}, ...]``
        sorted by score, highest first (ties keep document order), cut to ``top_k`` when given."""
        if not isinstance(query, str):
            raise TypeError(f"query must be a str, got {type(query).__name__}")
        if isinstance(documents, str):
            raise TypeError("documents must be a sequence of str, not a single str")
        scores = self.predict([(query, d) for d in documents], batch_size=batch_size)
        order = np.argsort(-scores, kind="stable")
        if top_k is not None:
            order = order[: max(0, int(top_k))]
        return [{"corpus_id": int(i), "score": float(scores[i])} for i in order]

    def fit(
        self,
        groups: Sequence[Group],
        *,
        max_steps: int | None = None,
        max_minutes: float | None = None,
        lr: float = 3e-5,
        batch_groups: int = 4,
        seed: int = 0,
        weight_decay: float = 0.01,
        max_grad_norm: float = 1.0,
        show_progress: bool | None = None,
    ) -> dict[str, Any]:
        """Fine-tune with a listwise softmax cross-entropy over each group's logits.

        ``groups``: ``(user_text, [item texts], positive_index)`` triples, at least 2 items each
        (groups may differ in size). Each step takes ``batch_groups`` groups (cycling over the data in
        a seeded shuffled order, reshuffled each pass). Stops after ``max_steps`` steps or
        ``max_minutes`` minutes, whichever comes first; at least one must be given. Shuffling and
        dropout are seeded, so the same inputs give the same weights on the same hardware.

        Returns ``{"steps", "first_loss", "last_loss", "mean_loss", "seconds", "stopped_by",
        "groups", "epochs"}`` where losses are per-step means over the step's groups and
        ``mean_loss`` averages the last (up to) 10 steps.
        """
        if max_steps is None and max_minutes is None:
            raise ValueError(
                "fit needs a budget: give max_steps and/or max_minutes (whichever is hit first stops)"
            )
        if max_steps is not None and max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {max_steps}")
        if max_minutes is not None and not max_minutes >= 0:
            raise ValueError(f"max_minutes must be >= 0, got {max_minutes}")
        if batch_groups < 1:
            raise ValueError(f"batch_groups must be >= 1, got {batch_groups}")
        data = _check_groups(groups)
        if not data:
            raise ValueError(
                "groups is empty; expected at least one (user_text, [item texts], positive_index)"
            )

        start = time.monotonic()
        deadline = start + 60.0 * max_minutes if max_minutes is not None else math.inf
        step_cap = max_steps if max_steps is not None else None
        rng = np.random.default_rng(seed)
        optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay
        )
        show = (
            show_progress
            if show_progress is not None
            else (step_cap is None or step_cap > _PROGRESS_MIN_BATCHES)
        )
        losses: list[float] = []
        stopped_by = "max_steps"
        order = rng.permutation(len(data))
        cursor = 0
        seen = 0
        bar = tqdm(
            total=step_cap, desc="Fine-tuning cross-encoder", unit="step", disable=not show, leave=False
        )
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        self.model.train()
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                while step_cap is None or len(losses) < step_cap:
                    if time.monotonic() >= deadline:
                        stopped_by = "max_minutes"
                        break
                    batch = []
                    for _ in range(min(batch_groups, len(data))):
                        if cursor == len(order):
                            order, cursor = rng.permutation(len(data)), 0
                        batch.append(data[order[cursor]])
                        cursor += 1
                    seen += len(batch)
                    loss = self._listwise_loss(batch)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if max_grad_norm and max_grad_norm > 0:
                        torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_grad_norm)
                    optimizer.step()
                    losses.append(float(loss.detach()))
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
        finally:
            bar.close()
            self.model.eval()
            optimizer.zero_grad(set_to_none=True)
        tail = losses[-10:]
        return {
            "steps": len(losses),
            "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None,
            "mean_loss": float(np.mean(tail)) if tail else None,
            "seconds": time.monotonic() - start,
            "stopped_by": stopped_by,
            "groups": len(data),
            "epochs": seen / len(data),
        }

    def _listwise_loss(self, batch: list[tuple[str, list[str], int]]) -> torch.Tensor:
        pairs = [(user, item) for user, items, _ in batch for item in items]
        flat = self._logits(pairs)
        sizes = [len(items) for _, items, _ in batch]
        # Pad ragged groups to one (groups, max_size) matrix; -inf padding gets zero softmax mass.
        matrix = torch.full((len(batch), max(sizes)), float("-inf"), device=flat.device, dtype=flat.dtype)
        row = torch.repeat_interleave(
            torch.arange(len(batch), device=flat.device), torch.tensor(sizes, device=flat.device)
        )
        col = torch.cat([torch.arange(n, device=flat.device) for n in sizes])
        matrix = matrix.index_put((row, col), flat)
        target = torch.tensor([pos for _, _, pos in batch], device=flat.device)
        return torch.nn.functional.cross_entropy(matrix, target)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write model, tokenizer and ``cross_encoder.json`` settings to folder ``path``; returns it."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        write_json_atomic(
            out / SETTINGS_FILE,
            {
                "format": _SETTINGS_FORMAT,
                "max_length": self.max_length,
                "seed": self.seed,
                "num_labels": 1,
                "base_model": self.model_id,
            },
        )
        return out

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str = "auto") -> CrossEncoder:
        """Load a folder written by :meth:`save` (same settings, trained head)."""
        folder = Path(path).expanduser()
        settings_file = folder / SETTINGS_FILE
        if not settings_file.is_file():
            raise FileNotFoundError(
                f"{str(folder)!r} has no {SETTINGS_FILE}; expected a folder written by CrossEncoder.save "
                "(to start from a plain model folder use CrossEncoder(model=...))"
            )
        settings = json.loads(settings_file.read_text(encoding="utf-8"))
        if settings.get("format") != _SETTINGS_FORMAT:
            raise ValueError(
                f"{settings_file} has format {settings.get('format')!r}; "
                f"this version reads format {_SETTINGS_FORMAT}"
            )
        return cls(
            model=str(folder),
            device=device,
            max_length=int(settings["max_length"]),
            seed=int(settings.get("seed", 0)),
        )
