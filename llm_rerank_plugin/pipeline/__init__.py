"""The lifecycle on top of the stages: ``fit`` the whole chain into a bundle, ``recommend`` from it."""

from llm_rerank_plugin.pipeline.bundle import (
    Bundle,
    BundleError,
    BundleExistsError,
    bundle_path,
    fit,
    rankings_frame,
)

__all__ = ["Bundle", "BundleError", "BundleExistsError", "bundle_path", "fit", "rankings_frame"]
