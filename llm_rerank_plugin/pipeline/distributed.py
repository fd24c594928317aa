"""Batch ``recommend`` on a Dask cluster: users partitioned, the bundle loaded once per worker process.

``scheduler``: ``local:N`` starts a ``LocalCluster`` of N single-threaded worker processes (a
``dask_cuda.LocalCUDACluster`` of N GPUs where Merlin finds GPUs); anything else is the address of a
running scheduler (``tcp://host:8786``). Each partition is ranked by the same code as one process
(``Bundle.recommend``) and written as one parquet part, so a worker holds one partition's results at a time
and the driver only counts rows. Partitions are whole multiples of ``RANK_CHUNK`` users, the batch in which
user texts are encoded, so the parts are identical to a one-process run.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from llm_rerank_plugin.config import ConfigError, PipelineConfig
from llm_rerank_plugin.pipeline.bundle import RANK_CHUNK, Bundle

_WORKER_BUNDLES: dict[tuple[str, str], Bundle] = {}


@contextlib.contextmanager
def dask_client(scheduler: str) -> Iterator[Any]:
    """A ``distributed.Client`` for ``local:N`` (a cluster started and closed here) or an address."""
    from distributed import Client, LocalCluster

    if scheduler.startswith("local:"):
        try:
            workers = int(scheduler.removeprefix("local:"))
        except ValueError:
            workers = 0
        if workers < 1:
            raise ConfigError(
                f"--scheduler {scheduler!r}: expected local:N with N >= 1 workers, or an address"
            )
        from merlin.core.compat import HAS_GPU

        if HAS_GPU:
            from dask_cuda import LocalCUDACluster

            cluster = LocalCUDACluster(n_workers=workers)
        else:
            cluster = LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
            )
        with cluster, Client(cluster) as client:
            yield client
    else:
        try:
            client = Client(scheduler, timeout="20s")
        except (OSError, TimeoutError) as exc:
            raise ConfigError(f"--scheduler {scheduler!r}: no Dask scheduler answers there ({exc})") from None
        with client:
            yield client


def _worker_bundle(path: str, config_json: str) -> Bundle:
    key = (path, config_json)
    if key not in _WORKER_BUNDLES:
        import torch

        torch.set_num_threads(1)  # one single-threaded worker per core
        config = PipelineConfig.model_validate_json(config_json)
        _WORKER_BUNDLES[key] = Bundle.load(path, config)
    return _WORKER_BUNDLES[key]


def _load_on_worker(path: str, config_json: str) -> None:
    """Load the bundle into the worker's cache. Returns nothing: ``client.run`` ships every worker's
    return value back to the client, and a returned bundle (gigabytes at 150,000 items) was pickled from
    every worker into the client process at once."""
    _worker_bundle(path, config_json)


def _rank_partition(
    path: str, config_json: str, users: list[Any], k: int | None, chunk: int, target: str
) -> int:
    bundle = _worker_bundle(path, config_json)
    frame = bundle.recommend(users, k, chunk=chunk)
    frame.to_parquet(target, index=False)
    return len(frame)


def recommend_distributed(
    bundle: Bundle,
    users: Sequence[Any],
    target: Path,
    scheduler: str,
    k: int | None = None,
    *,
    partition_users: int | None = None,
    chunk: int = RANK_CHUNK,
    progress: bool = True,
    warm_workers: bool = False,
) -> dict[str, Any]:
    """Rank ``users`` on the cluster; write ``target`` as a folder of parquet parts (read it back with
    ``pandas.read_parquet(target)``: parts in user order). Returns ``{"rows", "parts", "workers",
    "seconds"}``, ``seconds`` the ranking's wall time (after loading the bundle on every worker first when
    ``warm_workers``, as a benchmark wants)."""
    size = partition_users or chunk
    if size % chunk:
        raise ValueError(f"partition_users ({size}) must be a multiple of the ranking chunk ({chunk})")
    if target.exists():
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    target.mkdir(parents=True)
    users = list(users)
    parts = [users[i : i + size] for i in range(0, len(users), size)]
    config_json = bundle.config.model_dump_json()
    with dask_client(scheduler) as client:
        from merlin.core.utils import set_dask_client

        set_dask_client(client)  # NVTabular work in this process uses the same cluster
        try:
            if warm_workers:
                client.run(_load_on_worker, str(bundle.path), config_json)
            started = time.perf_counter()
            futures = [
                client.submit(
                    _rank_partition,
                    str(bundle.path),
                    config_json,
                    part,
                    k,
                    chunk,
                    str(target / f"part-{i:05d}.parquet"),
                    pure=False,
                )
                for i, part in enumerate(parts)
            ]
            from distributed import as_completed

            rows = 0
            with tqdm(total=len(users), desc="recommend", unit="user", disable=not progress) as bar:
                by_future = {f: len(p) for f, p in zip(futures, parts, strict=True)}
                for future in as_completed(futures):
                    rows += future.result()
                    bar.update(by_future[future])
            seconds = time.perf_counter() - started
            workers = len(client.scheduler_info()["workers"])
        finally:
            set_dask_client(None)
    return {"rows": rows, "parts": len(parts), "workers": workers, "seconds": seconds}
