"""``llm-rerank bench``: request latency of the rerank stage, one process, one request at a time.

Each request reranks 100 candidates for one user and keeps the top 10. Rows of ``bench.json``:

- ``warm``: ``LLMReranker.rerank`` for a user whose context (encoded text) is cached: the serving path.
- ``cold``: the same after ``forget_user_text``: the user's context and the process's memory of encoded
  texts are dropped, so the request pays for encoding the user's text.
- ``cold_torch`` / ``cold_onnx_int8``: the cold request with the user text encoded by the torch fp32
  encoder and by the ONNX Runtime dynamic-int8 one (same model, CPU), timed in the same run with their
  requests interleaved so that load on a shared machine hits both alike; ``cold_onnx_int8_speedup``
  gives torch / int8 for p50 and p99. A row that cannot be built (onnxruntime missing, say) says why
  under ``skipped``. The reranker's own encoder is used where it is that backend on the CPU.
- ``online_warm``: ``OnlineReranker.rerank`` for a user with feedback state (fusion applied, rejected
  items removed, one store check per request).
- ``merlin_graph``: the warm request through ``Graph(["user_id", "item_id", "score"] >> LLMRerank(...))``
  run by Merlin's ``LocalExecutor`` on a 100-row pandas frame: the cost the Merlin wrapper adds.
- ``cross_encoder``: a cross-encoder scoring the same 100 (user text, item text) pairs: the "put the
  LLM on every pair" alternative. Few requests (seconds each on a CPU).

Each row: ``p50_ms``, ``p99_ms``, ``mean_ms``, ``requests_per_s`` (sequential, = 1000 / mean_ms) and
``requests``; timed with ``time.perf_counter`` after a warm-up. Also ``speedup_vs_cross_encoder``
(cross p50 / warm p50) and the machine. Candidates come from the fitted bundle's retrieval for real users
when available, else are random catalogue items (``candidates`` in the output says which).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from llm_rerank_plugin.config import PipelineConfig
from llm_rerank_plugin.evaluation.environment import numeric_environment
from llm_rerank_plugin.feedback.online import OnlineReranker, fusion_params
from llm_rerank_plugin.feedback.store import SQLiteUserStateStore
from llm_rerank_plugin.rerank.encoder import forget_recent_vectors

if TYPE_CHECKING:
    from llm_rerank_plugin.pipeline import Bundle
    from llm_rerank_plugin.rerank.cross import CrossEncoder
    from llm_rerank_plugin.rerank.reranker import LLMReranker

log = logging.getLogger(__name__)

N_CANDIDATES = 100
TOP_K = 10
CROSS_REQUESTS = 5
WARMUP = 10
# Distinct users the requests cycle over: enough that the warm path is not one hot cache line, few
# enough that the cold row's encodings and the online row's seeding stay quick.
BENCH_USERS = 50


class MissingArtifactError(FileNotFoundError):
    """A trained artifact the command needs was not found; the message says which command writes it."""


def reranker_artifact(config: PipelineConfig) -> Path:
    """Where ``llm-rerank fit`` saves the trained reranker: inside the bundle, ``<output_dir>/model``."""
    from llm_rerank_plugin.pipeline import bundle_path

    return bundle_path(config) / "reranker"


def load_trained_bundle(config: PipelineConfig) -> Bundle:
    """The fitted bundle of this config's output folder (checked against the config).

    Deliberately does not train one: training takes minutes and would be timed by accident."""
    from llm_rerank_plugin.pipeline import Bundle, bundle_path

    path = bundle_path(config)
    if not (path / "manifest.json").is_file():
        raise MissingArtifactError(
            f"no fitted bundle at {path} (expected manifest.json and reranker/ there); run "
            "`llm-rerank fit` with this config first, or pass a reranker"
        )
    return Bundle.load(path, config)


def load_trained_reranker(config: PipelineConfig) -> LLMReranker:
    """The trained reranker of this config's fitted bundle (:func:`load_trained_bundle`)."""
    return load_trained_bundle(config).reranker


# Rows timing the cold path per encoder backend (name in bench.json -> TextEncoder backend).
COLD_BACKENDS = {"cold_torch": "torch", "cold_onnx_int8": "onnx-int8"}


@dataclass
class Request:
    """One rerank request: a user and their retrieval candidates (original ids, best first)."""

    user_id: Any
    item_ids: np.ndarray
    scores: np.ndarray


def make_requests(
    config: PipelineConfig,
    reranker: LLMReranker,
    n_users: int = BENCH_USERS,
    n_candidates: int = N_CANDIDATES,
    bundle: Bundle | None = None,
) -> tuple[list[Request], str]:
    """Benchmark requests for up to ``n_users`` users, and a note on where the candidates came from.

    Prefers real retrieval candidates: the fitted bundle's retrieval top-``n_candidates`` of users it
    knows; otherwise random catalogue items with random, descending scores for the reranker's known users
    (or synthetic users when it knows none).
    """
    rng = np.random.default_rng(config.seed)
    users = list(reranker.histories) or list(reranker.profiles)
    candidates, source = None, "random catalogue items, random scores"
    if bundle is not None and users:
        known = [u for u in users if bundle.retriever.known_user(u)]
        if known:
            pick = rng.choice(len(known), size=min(n_users * 4, len(known)), replace=False)
            chosen = [known[i] for i in sorted(pick)]
            candidates = bundle.candidates(chosen, k=n_candidates)
            source = f"retrieval candidates of the fitted bundle ({bundle.path})"
    requests = []
    if candidates is not None:
        order = rng.permutation(len(candidates.user_ids))[: n_users * 4]
        for i in order:
            items, scores = candidates.item_ids[i][:n_candidates], candidates.scores[i][:n_candidates]
            keep = reranker.items.rows(items, strict=False) >= 0  # also drops the padding
            if keep.sum() >= min(n_candidates, 2):
                user = candidates.user_ids[i]
                requests.append(
                    Request(user.item() if hasattr(user, "item") else user, items[keep], scores[keep])
                )
            if len(requests) == n_users:
                break
    if not requests:
        source = "random catalogue items, random scores"
        if not users:
            users = [f"bench-user-{i}" for i in range(n_users)]
        pick = rng.choice(len(users), size=min(n_users, len(users)), replace=False)
        n_items = len(reranker.items.item_ids)
        for i in sorted(pick):
            rows = rng.choice(n_items, size=min(n_candidates, n_items), replace=False)
            scores = np.sort(rng.normal(size=len(rows)).astype(np.float32))[::-1].copy()
            requests.append(Request(users[i], reranker.items.item_ids[rows], scores))
    return requests, source


def summarize(latencies_s: Sequence[float]) -> dict[str, float | int]:
    """Latency percentiles in ms and sequential throughput of one timed series."""
    ms = np.asarray(latencies_s, dtype=np.float64) * 1e3
    if len(ms) == 0:
        raise ValueError("no timed requests to summarize; expected at least one")
    mean = float(ms.mean())
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": mean,
        "requests_per_s": 1e3 / mean if mean > 0 else float("inf"),
        "requests": int(len(ms)),
    }


def time_requests(
    call: Callable[[Request], Any],
    requests: Sequence[Request],
    n: int,
    warmup: int = WARMUP,
    before: Callable[[Request], Any] | None = None,
) -> list[float]:
    """Seconds per call over ``n`` requests cycling through ``requests``, after ``warmup`` untimed calls.

    ``before`` runs untimed ahead of each timed call (e.g. ``forget`` for the cold path).
    """
    for i in range(min(warmup, n)):
        call(requests[i % len(requests)])
    out = []
    for i in range(n):
        request = requests[i % len(requests)]
        if before is not None:
            before(request)
        t0 = time.perf_counter()
        call(request)
        out.append(time.perf_counter() - t0)
    return out


def forget_user_text(reranker: LLMReranker, user_id: Any) -> None:
    """Make the next request of ``user_id`` encode the user's text: drop the cached context and the
    process's memory of encoded texts, which would otherwise answer a repeated text without encoding it."""
    reranker.forget(user_id)
    forget_recent_vectors()


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[int]:
    """Run with ``n`` torch intra-op threads, restoring the caller's setting afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS/Windows: no affinity API
        return os.cpu_count() or 1


def machine_info(reranker: LLMReranker, threads: int) -> dict[str, Any]:
    """The machine the latencies were measured on, with the numeric path its kernels took
    (``evaluation.environment``: AVX-512 and AVX2 kernels time differently, as they round differently)."""
    environment = numeric_environment()
    return {
        "processor": environment["cpu"],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpus_available": available_cpus(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "torch_threads": threads,
        "torch": torch.__version__,
        "encoder_device": str(getattr(reranker.encoder, "device", "unknown")),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "numeric_path": environment["path"],
    }


def _load_cross_encoder(config: PipelineConfig) -> tuple[CrossEncoder, str]:
    from llm_rerank_plugin.pipeline import bundle_path
    from llm_rerank_plugin.rerank.cross import SETTINGS_FILE, CrossEncoder

    cfg = config.llm_rerank()
    saved = bundle_path(config) / "cross-encoder"
    if (saved / SETTINGS_FILE).is_file():
        return CrossEncoder.load(saved, device=cfg.device), f"fine-tuned ({saved})"
    model = cfg.cross.model or cfg.model
    encoder = CrossEncoder(
        model,
        device=cfg.device,
        max_length=cfg.cross.max_length,
        allow_download=cfg.allow_download,
        seed=config.seed,
    )
    # Same architecture and pair count as the fine-tuned one, so the latency is representative.
    return encoder, f"untrained head on {encoder.model_path} (latency only; no {saved})"


def _cross_call(reranker: LLMReranker, cross: CrossEncoder) -> Callable[[Request], Any]:
    texts = reranker.items.texts

    def call(request: Request) -> np.ndarray:
        # The user text is the cached one (as in the warm path); the cost is the transformer over pairs.
        user_text = reranker.context(request.user_id).text
        rows = reranker.items.rows(request.item_ids)
        logits = cross.predict([(user_text, texts[r]) for r in rows], show_progress=False)
        return request.item_ids[np.argsort(-logits, kind="stable")[:TOP_K]]

    return call


def _merlin_graph_call(reranker: LLMReranker) -> tuple[Callable[[Request], Any] | None, str]:
    """A callable running one request through a Merlin graph, or None and why it is skipped."""
    try:
        from llm_rerank_plugin.platform.operator import LLMRerank
    except ImportError as exc:
        return None, f"skipped: llm_rerank_plugin.platform.operator.LLMRerank is not importable ({exc})"
    import pandas as pd
    from merlin.dag import Graph
    from merlin.dag.executors import LocalExecutor
    from merlin.schema import ColumnSchema, Schema

    graph = Graph(["user_id", "item_id", "score"] >> LLMRerank(reranker=reranker, top_k=TOP_K))
    executor = LocalExecutor()
    frames: dict[int, pd.DataFrame] = {}
    constructed = False

    def frame_of(request: Request) -> pd.DataFrame:
        key = id(request)
        if key not in frames:
            frames[key] = pd.DataFrame(
                {
                    "user_id": np.full(len(request.item_ids), request.user_id),
                    "item_id": request.item_ids,
                    "score": request.scores.astype(np.float32),
                }
            )
        return frames[key]

    def call(request: Request) -> Any:
        nonlocal constructed
        frame = frame_of(request)
        if not constructed:  # schemas come from the first frame's dtypes
            graph.construct_schema(Schema([ColumnSchema(c, dtype=frame[c].dtype) for c in frame.columns]))
            constructed = True
        return executor.transform(frame, graph)

    return call, "LocalExecutor over Graph(['user_id','item_id','score'] >> LLMRerank), pandas frame"


def _backend_encoder(reranker: LLMReranker, backend: str, onnx_cache_dir: Path | None) -> tuple[Any, str]:
    from llm_rerank_plugin.rerank.encoder import TextEncoder

    own = reranker.encoder
    if getattr(own, "backend", "torch") == backend and getattr(own, "device", None) == torch.device("cpu"):
        return own, "the reranker's own encoder"
    encoder = TextEncoder(
        own.model_path,
        device="cpu",
        max_length=own.max_length,
        show_progress=False,
        backend=backend,
        onnx_cache_dir=onnx_cache_dir,
    )
    return encoder, f"built for the bench from {own.model_path} (cpu)"


def _cold_backend_rows(
    config: PipelineConfig, reranker: LLMReranker, requests: Sequence[Request], n: int
) -> dict[str, Any]:
    """The ``cold_*`` rows: the cold request once per backend, requests interleaved across backends."""
    from llm_rerank_plugin.rerank.encoder import ModelNotFoundError, OnnxRuntimeMissingError
    from llm_rerank_plugin.rerank.onnx_backend import OnnxExportError

    onnx_dir = Path(config.data.cache_dir) / "onnx" if config.data.cache_dir else None
    rows: dict[str, Any] = {}
    encoders: dict[str, Any] = {}
    for name, backend in COLD_BACKENDS.items():
        try:
            encoders[name], note = _backend_encoder(reranker, backend, onnx_dir)
            rows[name] = {"backend": backend, "encoder": note}
        except (OnnxRuntimeMissingError, OnnxExportError, ModelNotFoundError, ValueError) as exc:
            log.warning("bench: %s row skipped: %s", name, exc)
            rows[name] = {"skipped": f"no {backend} encoder: {exc}"}
    own = reranker.encoder
    timed: dict[str, list[float]] = {name: [] for name in encoders}
    try:
        for i in range(min(WARMUP, n) + n):
            request = requests[i % len(requests)]
            for name, encoder in encoders.items():
                reranker.encoder = encoder
                forget_user_text(reranker, request.user_id)
                t0 = time.perf_counter()
                reranker.rerank(request.user_id, request.item_ids, request.scores, TOP_K)
                if i >= min(WARMUP, n):
                    timed[name].append(time.perf_counter() - t0)
    finally:
        reranker.encoder = own
        for request in requests:  # no context encoded by another backend may outlive the rows
            reranker.forget(request.user_id)
    for name, seconds in timed.items():
        rows[name] = {**summarize(seconds), **rows[name]}
    torch_row, int8_row = rows["cold_torch"], rows["cold_onnx_int8"]
    if "p50_ms" in torch_row and "p50_ms" in int8_row:
        rows["cold_onnx_int8_speedup"] = {
            q: torch_row[f"{q}_ms"] / int8_row[f"{q}_ms"] for q in ("p50", "p99")
        }
    return rows


def _seed_feedback(online: OnlineReranker, requests: Sequence[Request]) -> None:
    """Three events per bench user (like, dislike, text), so every online request applies a state."""
    for n, request in enumerate(requests):
        uid, items = str(request.user_id), request.item_ids
        online.record_many(
            [
                {"event_id": f"bench-{n}-like", "user_id": uid, "kind": "like", "item_id": str(items[-1])},
                {
                    "event_id": f"bench-{n}-dislike",
                    "user_id": uid,
                    "kind": "dislike",
                    "item_id": str(items[-2]),
                },
                {
                    "event_id": f"bench-{n}-text",
                    "user_id": uid,
                    "kind": "text",
                    "text": "more comedies, less horror",
                },
            ]
        )


@contextlib.contextmanager
def _restored_users(reranker: LLMReranker, users: Sequence[Any]) -> Iterator[None]:
    """Give the users their histories and clocks back afterwards (the throwaway feedback moves them)."""
    histories = {u: list(reranker.histories[u]) for u in users if u in reranker.histories}
    clocks = {u: reranker.last_seen[u] for u in users if u in reranker.last_seen}
    try:
        yield
    finally:
        for u in users:
            reranker.histories.pop(u, None)
            reranker.last_seen.pop(u, None)
            reranker.forget(u)
        reranker.set_users(histories)
        reranker.last_seen.update(clocks)


def run_bench(
    config: PipelineConfig,
    reranker: LLMReranker | None = None,
    online: OnlineReranker | None = None,
    n_requests: int | None = None,
    cross_encoder: CrossEncoder | None = None,
    *,
    bundle: Bundle | None = None,
    cross_requests: int = CROSS_REQUESTS,
    requests: Sequence[Request] | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Measure the rows described in the module docstring; write ``bench.json``; return its content.

    Args:
        config: pipeline config (output folder, model settings, ``evaluation.bench_requests``).
        reranker: the reranker to time; default the fitted bundle's (:func:`load_trained_bundle`, which
            raises MissingArtifactError when there is no bundle).
        online: an OnlineReranker over ``reranker`` whose store already holds feedback for the bench
            users; default a throwaway one over a temporary SQLite store, seeded with three events per
            user (the bench never writes into a caller's store, and undoes the seeded history moves).
        n_requests: timed requests per row (default ``evaluation.bench_requests``).
        cross_encoder: default the bundle's fine-tuned ``cross-encoder``, else the configured model with
            an untrained head (same cost).
        bundle: gives real retrieval candidates (default: the config's fitted bundle when no reranker is
            given); without one, random catalogue items.
        cross_requests: timed cross-encoder requests (each scores 100 pairs).
        requests: explicit requests (overrides the candidate sources).
        threads: torch intra-op threads while timing (restored afterwards); default 1, how a serving
            worker runs (one request per worker, workers per core). Measured here on 2 cores: encoding one
            short user text with 2 threads had a p99 of ~110 ms against ~18 ms with 1 (threads waking up
            for tiny parallel regions), so more threads only pay off for large batches.
    """
    n = int(n_requests or config.evaluation.bench_requests)
    if n < 1 or cross_requests < 1:
        raise ValueError(f"n_requests and cross_requests must be >= 1, got {n} and {cross_requests}")
    if reranker is None:
        bundle = bundle or load_trained_bundle(config)
        reranker = bundle.reranker
    out_dir = config.output_path
    out_dir.mkdir(parents=True, exist_ok=True)
    if requests is None:
        requests, source = make_requests(config, reranker, bundle=bundle)
    else:
        requests, source = list(requests), "given by the caller"
    if not requests:
        raise ValueError("no benchmark requests: the reranker has no catalogue items to rank")
    result: dict[str, Any] = {
        "candidates": source,
        "candidates_per_request": int(np.median([len(r.item_ids) for r in requests])),
        "top_k": TOP_K,
        "users": len({str(r.user_id) for r in requests}),
    }
    with torch_threads(threads or 1) as used, contextlib.ExitStack() as stack:
        result["machine"] = machine_info(reranker, used)

        def warm(request: Request) -> Any:
            return reranker.rerank(request.user_id, request.item_ids, request.scores, TOP_K)

        for request in requests:  # every bench user's context is cached before the warm row
            warm(request)
        result["warm"] = summarize(time_requests(warm, requests, n))
        result["cold"] = summarize(
            time_requests(warm, requests, n, before=lambda r: forget_user_text(reranker, r.user_id))
        )
        result.update(_cold_backend_rows(config, reranker, requests, n))
        for request in requests:  # leave the caches warm again for the rows below
            warm(request)

        graph_call, note = _merlin_graph_call(reranker)
        if graph_call is None:
            log.warning("bench: merlin_graph row %s", note)
            result["merlin_graph"] = {"skipped": note}
        else:
            result["merlin_graph"] = {**summarize(time_requests(graph_call, requests, n)), "note": note}

        try:
            if cross_encoder is None:
                cross_encoder, cross_note = _load_cross_encoder(config)
            else:
                cross_note = f"given ({getattr(cross_encoder, 'model_path', type(cross_encoder).__name__)})"
        except (FileNotFoundError, OSError) as exc:  # ModelNotFoundError is a FileNotFoundError
            result["cross_encoder"] = {"skipped": f"no cross-encoder model: {exc}"}
        else:
            timed = time_requests(_cross_call(reranker, cross_encoder), requests, cross_requests, warmup=1)
            result["cross_encoder"] = {**summarize(timed), "note": cross_note}

        # Last: seeding feedback moves the bench users' histories (observe), which drops their cached
        # contexts; any plain-path row after this would time re-encoding.
        if online is None:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-", dir=out_dir)))
            store = stack.enter_context(SQLiteUserStateStore(folder / "feedback.sqlite"))
            stack.enter_context(_restored_users(reranker, [r.user_id for r in requests]))
            feedback = config.llm_rerank().feedback
            online = OnlineReranker(reranker, store, fusion_params(feedback), feedback.weight)
            _seed_feedback(online, requests)
        with_state = sum(online.state(r.user_id) is not None for r in requests)
        result["online_warm"] = {
            **summarize(
                time_requests(lambda r: online.rerank(r.user_id, r.item_ids, r.scores, TOP_K), requests, n)
            ),
            "users_with_feedback": int(with_state),
        }

    cross = result["cross_encoder"]
    result["speedup_vs_cross_encoder"] = (
        cross["p50_ms"] / result["warm"]["p50_ms"]
        if "p50_ms" in cross and result["warm"]["p50_ms"] > 0
        else None
    )
    (out_dir / "bench.json").write_text(json.dumps(result, indent=2))
    return result
