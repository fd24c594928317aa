"""``serve``: export the fitted bundle when needed and run the real Triton server in the foreground."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from llm_rerank_plugin.serve.export import MANIFEST, export_ensemble
from llm_rerank_plugin.serve.server import TritonServer, run_foreground

LOG = logging.getLogger(__name__)

REPO_DIR = "triton_repo"
BUNDLE_DIR = "model"


def _newest_mtime(folder: Path) -> float:
    return max((p.stat().st_mtime for p in folder.rglob("*") if p.is_file()), default=0.0)


def resolve_serving_paths(
    config_or_bundle_path: str | Path, repo_dir: str | Path | None = None, fit_if_missing: bool = True
) -> tuple[Path, Path]:
    """(bundle folder, model repository folder) for a YAML config or a bundle folder.

    A config's bundle is ``<output_dir>/model``; when it is absent and ``fit_if_missing``, it is fitted
    first (``pipeline.fit``). The repository defaults to ``<output_dir>/triton_repo`` (next to the bundle).
    """
    source = Path(config_or_bundle_path)
    if source.is_dir():
        bundle_path = source
    elif source.is_file():
        from llm_rerank_plugin.config import load_config

        config = load_config(source)
        bundle_path = config.output_path / BUNDLE_DIR
        if not bundle_path.is_dir():
            if not fit_if_missing:
                raise FileNotFoundError(
                    f"no fitted bundle at {bundle_path}; run `llm-rerank fit --config {source}`"
                )
            from llm_rerank_plugin.pipeline import fit

            LOG.warning("no fitted bundle at %s: fitting it now (all logs)", bundle_path)
            fit(config)
    else:
        raise FileNotFoundError(f"{source} is neither a config file nor a bundle folder (<output_dir>/model)")
    repo = Path(repo_dir) if repo_dir is not None else bundle_path.parent / REPO_DIR
    return bundle_path, repo


def needs_export(
    bundle_path: Path, repo: Path, instances: int, store_path: str | Path | None, executor: str = "merlin"
) -> str | None:
    """Why ``repo`` must be (re)written for this bundle and these settings; None when it is current."""
    manifest_file = repo / MANIFEST
    if not manifest_file.is_file():
        return "no exported repository yet"
    manifest = json.loads(manifest_file.read_text())
    if manifest.get("bundle") != str(bundle_path.resolve()):
        return f"it was exported from {manifest.get('bundle')}"
    if manifest.get("executor", "merlin") != executor:
        return f"it runs the {manifest.get('executor')!r} executor, {executor!r} asked"
    if manifest.get("instances") != instances:
        return f"it has {manifest.get('instances')} instances, {instances} asked"
    if store_path is not None and manifest.get("store_path") != str(Path(store_path).resolve()):
        return f"its feedback store is {manifest.get('store_path')}"
    if _newest_mtime(bundle_path) > manifest_file.stat().st_mtime:
        return "the bundle changed after the export"
    return None


def prepare_repository(
    config_or_bundle_path: str | Path,
    *,
    repo_dir: str | Path | None = None,
    instances: int = 1,
    store_path: str | Path | None = None,
    executor: str = "merlin",
) -> Path:
    """The model repository for serving, exported (or re-exported) when ``needs_export`` says so."""
    bundle_path, repo = resolve_serving_paths(config_or_bundle_path, repo_dir)
    reason = needs_export(bundle_path, repo, instances, store_path, executor)
    if reason is not None:
        LOG.info("exporting %s to %s: %s", bundle_path, repo, reason)
        export_ensemble(
            bundle_path, repo, instances=instances, store_path=store_path, overwrite=True, executor=executor
        )
    return repo


def serve(
    config_or_bundle_path: str | Path,
    http_port: int = 8000,
    grpc_port: int = 8001,
    instances: int = 1,
    *,
    host: str = "127.0.0.1",
    repo_dir: str | Path | None = None,
    store_path: str | Path | None = None,
    executor: str = "merlin",
    announce: Any = print,
) -> int:
    """Serve the fitted bundle on a real Triton server in the foreground; returns the exit code.

    ``config_or_bundle_path``: a pipeline YAML (its bundle is ``<output_dir>/model``, fitted first if
    absent) or a bundle folder. Exports the model repository (``<output_dir>/triton_repo`` unless
    ``repo_dir``) when it is missing or stale, starts ``tritonserver`` on ``host`` (loopback by default;
    "0.0.0.0" to listen on every interface) with ``instances`` processes per model, waits for
    ``/v2/health/ready`` and blocks until SIGINT/SIGTERM, then stops the server cleanly (in-flight requests
    are drained) and returns 0. ``store_path``: the SQLite feedback store (default from the config).
    ``executor``: ``merlin`` or ``direct`` (see ``export_ensemble``).
    """
    repo = prepare_repository(
        config_or_bundle_path,
        repo_dir=repo_dir,
        instances=instances,
        store_path=store_path,
        executor=executor,
    )
    server = TritonServer(
        repo, http_port=http_port, grpc_port=grpc_port, host=host, work_dir=repo.parent / "triton_work"
    )
    announce(f"starting tritonserver for {repo} ({instances} instance(s) per model); loading the models "
             "takes a while on a small CPU")  # fmt: skip
    return run_foreground(server, announce=announce)
