"""Serving on a real Triton Inference Server: the fitted bundle as a Merlin Systems ensemble.

``export_ensemble`` writes the model repository, ``serve`` runs it in the foreground, ``RecommendClient``
calls it over HTTP, ``bench_triton`` measures it. Importing this package is light; the submodules import
merlin-systems and tritonclient.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llm_rerank_plugin.serve.bench import bench_triton
    from llm_rerank_plugin.serve.client import RecommendClient
    from llm_rerank_plugin.serve.export import build_ensemble, export_ensemble
    from llm_rerank_plugin.serve.server import TritonServer
    from llm_rerank_plugin.serve.serving import serve

__all__ = ["RecommendClient", "TritonServer", "bench_triton", "build_ensemble", "export_ensemble", "serve"]

_WHERE = {
    "bench_triton": "bench",
    "RecommendClient": "client",
    "build_ensemble": "export",
    "export_ensemble": "export",
    "TritonServer": "server",
    "serve": "serving",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
