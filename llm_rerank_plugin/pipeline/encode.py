"""Catalogue encoding spread over Dask workers, into the vector cache that ``fit`` reads.

``encode_catalogue`` renders every item text the reranker's item table needs with ``item_cache_texts``, as
``ItemTable.build`` does (kind ``item``: the whole item text; ``aspect-<name>``: one per templated aspect),
asks the configured cache (``<data.cache_dir>/item-vectors/<kind>``, the folder ``fit`` uses) which are
missing, and encodes those in chunks on the workers. Each worker builds the encoder once and writes each
finished chunk as a part file into the cache folder, so ``data.cache_dir`` must be a folder every worker
can reach. A crash loses only the chunks in flight: finished parts stay and count as cached next time.
At the end the driver loads the cache once, which folds the parts into its main file.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from llm_rerank_plugin.config import ConfigError, LLMRerankConfig, PipelineConfig
from llm_rerank_plugin.rerank.encoder import DEFAULT_CHUNK_SIZE, ItemVectorCache, TextEncoder

__all__ = ["catalogue_texts", "encode_catalogue"]

# Chunks per worker when the caller gives no chunk size: enough to balance uneven workers and move the bar.
_CHUNKS_PER_WORKER = 4

_WORKER_ENCODERS: dict[str, TextEncoder] = {}


def catalogue_texts(items: Any, cfg: LLMRerankConfig) -> tuple[list[str], dict[str, list[str]]]:
    """Item keys (``str(item_id)``) and, per cache kind, each item's text: ``item_cache_texts`` with the
    config's item template and aspects, the texts ``fit`` encodes."""
    from llm_rerank_plugin.rerank.reranker import item_cache_texts

    return item_cache_texts(items, cfg.templates.item, cfg.aspects)


def vector_cache_dir(config: PipelineConfig) -> Path:
    """The item-vector cache folder ``fit`` uses; a distributed encode needs it set explicitly."""
    if config.data.cache_dir is None:
        raise ConfigError(
            "data.cache_dir is not set: the distributed encode writes item vectors into "
            "<data.cache_dir>/item-vectors, where fit reads them, and every worker must reach that folder; "
            "set data.cache_dir to a folder the workers share"
        )
    return Path(config.data.cache_dir) / "item-vectors"


def _worker_encoder(cfg_json: str) -> TextEncoder:
    if cfg_json not in _WORKER_ENCODERS:
        import torch

        from llm_rerank_plugin.pipeline.train import build_encoder

        torch.set_num_threads(1)  # one single-threaded worker per core, as for recommend
        _WORKER_ENCODERS[cfg_json] = build_encoder(LLMRerankConfig.model_validate_json(cfg_json))
    return _WORKER_ENCODERS[cfg_json]


def _encode_chunk(cfg_json: str, folder: str, key_groups: list[list[str]], texts: list[str]) -> str:
    """Encode distinct ``texts`` and store each vector under every key of its group (items sharing a text)."""
    encoder = _worker_encoder(cfg_json)
    cache = ItemVectorCache(folder, encoder)
    vectors = encoder.encode(texts, show_progress=False)
    sizes = [len(group) for group in key_groups]
    keys = [k for group in key_groups for k in group]
    expanded = [t for t, n in zip(texts, sizes, strict=True) for _ in range(n)]
    return str(cache.write_part(keys, expanded, np.repeat(vectors, sizes, axis=0)))


def _unique(keys: list[str], texts: list[str], kind: str) -> tuple[list[str], list[str]]:
    seen: dict[str, str] = {}
    for k, t in zip(keys, texts, strict=True):
        if seen.setdefault(k, t) != t:
            raise ValueError(f"item id {k!r} appears twice in the items with different {kind} texts")
    return list(seen), list(seen.values())


def encode_catalogue(
    config: PipelineConfig, scheduler: str, chunk_size: int | None = None, progress: bool | None = None
) -> dict[str, Any]:
    """Encode the catalogue texts the vector cache lacks on the Dask cluster ``scheduler`` (``local:N`` or
    an address, see :func:`~llm_rerank_plugin.pipeline.distributed.dask_client`).

    ``chunk_size``: texts per task and per part file (default: about four chunks per worker, between the
    encoder's batch size and 1024). ``progress``: a bar over chunks (None: when stderr is a terminal).
    Returns ``{"items", "texts", "encoded", "distinct_texts_encoded", "already_cached", "chunks", "workers",
    "seconds"}`` (items sharing a text cost one encode: ``encoded`` counts item texts filled);
    ``workers`` is 0 when nothing was missing (no cluster is started then).
    """
    from llm_rerank_plugin.data import load_data
    from llm_rerank_plugin.data.columns import check_columns
    from llm_rerank_plugin.pipeline.distributed import dask_client
    from llm_rerank_plugin.pipeline.train import build_encoder, host_frame

    if chunk_size is not None and chunk_size < 1:
        raise ConfigError(f"--chunk-size {chunk_size}: expected a whole number of texts >= 1")
    root = vector_cache_dir(config)
    started = time.perf_counter()
    cfg = config.llm_rerank()
    data = load_data(config.data)
    check_columns(data, config)
    keys, texts = catalogue_texts(host_frame(data.items), cfg)
    # The driver's encoder names the cache files (its vector_key); it also checks that the model loads.
    encoder = build_encoder(cfg)
    caches: dict[str, ItemVectorCache] = {}
    # (kind, the keys of each distinct text, the distinct texts) still to encode: items sharing a text
    # (an aspect such as a brand) cost one encode, as in ItemVectorCache.get.
    todo: list[tuple[str, list[list[str]], list[str]]] = []
    total = 0
    for kind, kind_texts in texts.items():
        k_keys, k_texts = _unique(keys, kind_texts, kind)
        total += len(k_keys)
        caches[kind] = cache = ItemVectorCache(root / kind, encoder)
        groups: dict[str, list[str]] = {}
        for i in cache.missing(k_keys, k_texts):
            groups.setdefault(k_texts[i], []).append(k_keys[i])
        # Longest first across chunks too: each chunk then pads little inside the encoder's batches.
        distinct = sorted(groups, key=len, reverse=True)
        todo.append((kind, [groups[t] for t in distinct], distinct))
    n_missing = sum(len(keys) for _, key_groups, _ in todo for keys in key_groups)
    n_distinct = sum(len(t) for _, _, t in todo)
    chunks = workers = 0
    if n_missing:
        with dask_client(scheduler) as client:
            workers = len(client.scheduler_info()["workers"])
            size = chunk_size or min(
                DEFAULT_CHUNK_SIZE,
                max(cfg.batch_size, math.ceil(n_distinct / (_CHUNKS_PER_WORKER * max(workers, 1)))),
            )
            cfg_json = cfg.model_dump_json()
            futures = {}
            for kind, k_keys, k_texts in todo:
                for s in range(0, len(k_keys), size):
                    future = client.submit(
                        _encode_chunk,
                        cfg_json,
                        str(root / kind),
                        k_keys[s : s + size],
                        k_texts[s : s + size],
                        pure=False,
                    )
                    futures[future] = caches[kind]
            chunks = len(futures)
            from distributed import as_completed

            # disable=None: tqdm shows the bar only when its stream is a terminal
            disable = None if progress is None else not progress
            with tqdm(total=chunks, desc="encode catalogue", unit="chunk", disable=disable) as bar:
                for future in as_completed(futures):
                    part = Path(future.result())
                    expected = futures[future].path
                    if part.parent != expected.parent or not part.name.startswith(expected.name + ".part-"):
                        raise RuntimeError(
                            f"a worker wrote {part}, not a part of {expected}: the workers resolve the model "
                            "or data.cache_dir differently from this process (same model folder and a "
                            "shared cache folder expected on every worker)"
                        )
                    bar.update(1)
    for kind in caches:
        # A fresh cache object reads the main file and every part; get() then rewrites the main file.
        folded = ItemVectorCache(root / kind, encoder)
        k_keys, k_texts = _unique(keys, texts[kind], kind)
        left = folded.missing(k_keys, k_texts)
        if left:
            raise RuntimeError(
                f"{len(left)} {kind} texts are still missing from {folded.path} after the workers finished "
                f"(e.g. item {k_keys[left[0]]!r}); a part file may be unreadable, see the warnings above"
            )
        folded.get(k_keys, k_texts)
    return {
        "items": len(set(keys)),
        "texts": total,
        "encoded": n_missing,
        "distinct_texts_encoded": n_distinct,
        "already_cached": total - n_missing,
        "chunks": chunks,
        "workers": workers,
        "seconds": time.perf_counter() - started,
    }
