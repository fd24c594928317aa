"""``bench_triton``: request latency through the real Triton server on localhost, 1 and N model instances."""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llm_rerank_plugin.serve.export import MANIFEST, _set_instances, export_ensemble


def _repo_with_instances(
    source: Any, instances: int, work: Path, store_path: str | Path | None, executor: str
) -> Path:
    """A repository with ``instances`` per model: exported from a bundle, or a copy of an existing repo."""
    repo = work / f"repo_{instances}"
    if isinstance(source, str | Path) and (Path(source) / MANIFEST).is_file():
        shutil.copytree(source, repo)
        for config in repo.glob("*/config.pbtxt"):
            if config.parent.name != "feedback":  # one writer is enough for the store
                _set_instances(config, instances)
        return repo
    return export_ensemble(source, repo, instances=instances, store_path=store_path, executor=executor)


def _percentiles(latencies_s: list[float], wall_s: float) -> dict[str, float]:
    ms = np.asarray(latencies_s) * 1000.0
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "mean_ms": round(float(ms.mean()), 3),
        "requests_per_s": round(len(ms) / wall_s, 1),
        "n_requests": len(ms),
    }


def _drive(url: str, users: Sequence[Any], n_requests: int, concurrency: int, kind: str) -> dict[str, float]:
    """``n_requests`` single-user requests spread over ``concurrency`` client threads.

    Each thread owns its client: tritonclient.http runs on gevent, whose connections cannot be used from
    another thread. The threads only wait on sockets, so the GIL does not serialise the server's work.
    Before the clock starts every thread sends every user once (concurrently), so that each instance
    (process) has encoded the users' texts (cached after a user's first request) and run its kernels: the
    rows measure warm requests, like the in-process ``warm`` row of ``llm-rerank bench``.
    """
    from llm_rerank_plugin.serve.client import RecommendClient

    warmed = threading.Barrier(concurrency + 1)
    go = threading.Event()
    latencies: list[float] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        mine = []
        try:
            with RecommendClient(url, user_id_kind=kind) as client:
                for user in users:
                    client.recommend([user])
                warmed.wait()
                go.wait()
                for i in range(index, n_requests, concurrency):
                    start = time.perf_counter()
                    client.recommend([users[i % len(users)]])
                    mine.append(time.perf_counter() - start)
        except threading.BrokenBarrierError:
            return
        except BaseException as exc:  # noqa: BLE001 - re-raised below in the caller's thread
            errors.append(exc)
            warmed.abort()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    try:
        warmed.wait()
    except threading.BrokenBarrierError:
        pass
    start = time.perf_counter()
    go.set()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise errors[0]
    return _percentiles(latencies, wall)


def bench_triton(
    model_repo_or_bundle: Any,
    users: Sequence[Any],
    n_requests: int = 300,
    instances: int | Sequence[int] = (1, 2),
    *,
    store_path: str | Path | None = None,
    executor: str = "merlin",
    ready_timeout_s: float = 900.0,
) -> list[dict[str, Any]]:
    """p50/p99 ms of ``recommend`` through the real server on localhost, for each instance count.

    ``model_repo_or_bundle``: an exported repository (copied, instance counts rewritten), a bundle folder
    or a Bundle (exported into a temporary folder with ``executor``; an existing repository keeps its
    own). ``users``: ids sent one per request, cycled.
    For ``n`` instances, ``n`` client threads send requests concurrently (1 instance: sequential), so
    each row measures latency at that concurrency. Returns one dict per instance count: ``instances``,
    ``concurrency``, ``p50_ms``, ``p99_ms``, ``mean_ms``, ``requests_per_s``, ``n_requests``,
    ``load_s`` (server start until ready).
    """
    from llm_rerank_plugin.serve.server import TritonServer

    counts = [instances] if isinstance(instances, int) else list(instances)
    if not users:
        raise ValueError("bench_triton needs at least one user id")
    if n_requests < 1 or any(int(n) < 1 for n in counts):
        raise ValueError(f"n_requests and instances must be >= 1; got {n_requests}, {counts}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="llm_rerank_bench_") as tmp:
        work = Path(tmp)
        store = store_path or work / "bench_feedback.sqlite"  # never the live store: bench writes nothing
        for n in counts:
            repo = _repo_with_instances(model_repo_or_bundle, int(n), work, store, executor)
            kind = json.loads((repo / MANIFEST).read_text())["user_id_kind"]
            server = TritonServer(repo, work_dir=work / f"server_{n}", exit_timeout_s=5)
            start = time.perf_counter()
            server.start(ready_timeout_s)
            load_s = time.perf_counter() - start
            try:
                stats = _drive(server.http_url, list(users), n_requests, int(n), kind)
            finally:
                server.cleanup()
            manifest = json.loads((repo / MANIFEST).read_text())
            rows.append({"executor": manifest.get("executor", "merlin"), "instances": int(n),
                         "concurrency": int(n), **stats, "load_s": round(load_s, 1)})  # fmt: skip
    return rows
