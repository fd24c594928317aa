"""The fitted bundle as a Merlin Systems ensemble and as a Triton model repository.

``build_ensemble(bundle)`` returns a fresh ``merlin.systems.dag.Ensemble`` of the whole chain::

    user_id -> TransformWorkflow (the bundle's NVTabular workflow, reduced to the user id) -> user_index
    [user_id, user_index] -> RetrieveCandidates (Merlin implicit retrieval, history excluded; popularity
                             for unknown users) -> OnlineLLMRerank (top-k, live feedback) -> ServingOutput

``export_ensemble(bundle, to_dir)`` writes it as a Triton model repository:

- ``recommend``: merlin-systems' executor model (``merlin_executor``: it unpickles the ensemble and runs
  it with ``TritonExecutorRuntime``; the workflow step is a BLS call to the next model), or with
  ``executor="direct"`` the same ensemble's operators called in sequence in-process, under the
  client contract: input ``user_id`` (INT64 or BYTES by the data's id kind, shape ``[batch, 1]``),
  outputs ``user_id, item_id, rank, score, retrieval_score, aspect, because``, each ``[rows, 1]``: one
  row per recommended item, users in request order, ``rank`` 1..k within a user.
- ``0_transformworkflowtriton``: the NVTabular workflow (merlin-systems' workflow model; merlin only).
- ``feedback``: appends events to the SQLite feedback store that ``recommend`` reads
  (``triton_models.FeedbackModel``).

Every exported ``model.py`` is a shim that first applies ``stubfix.patch_resource_tracker_lock`` and
then imports its model class from this package (see stubfix.py and server.py for the stub set-up).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from llm_rerank_plugin.serve.ops import (
    RESPONSE_COLUMNS,
    USER_INDEX,
    OnlineLLMRerank,
    RetrieveCandidates,
    ServingOutput,
)

RECOMMEND = "recommend"
FEEDBACK = "feedback"
MANIFEST = "llm_rerank_serving.json"
# How `recommend` runs the ensemble -> the model class of its model.py.
EXECUTORS = {"merlin": "RecommendModel", "direct": "DirectRecommendModel"}
# The exported model.py files: the stub fix first, then the model class from this package.
_SHIM = """# Written by llm_rerank_plugin.serve.export: the model lives in the installed package.
from llm_rerank_plugin.serve.stubfix import patch_resource_tracker_lock

patch_resource_tracker_lock()

from {module} import {cls} as TritonPythonModel  # noqa: E402,F401
"""


def _resolve_bundle(bundle_or_path: Any) -> tuple[Any, str | None]:
    """(bundle, its folder or None); a path is loaded with ``Bundle.load``."""
    if isinstance(bundle_or_path, str | Path):
        from llm_rerank_plugin.pipeline import Bundle

        path = Path(bundle_or_path)
        if not path.is_dir():
            raise FileNotFoundError(
                f"no bundle folder at {path} (expected <output_dir>/model, written by fit)"
            )
        return Bundle.load(path), str(path.resolve())
    path = getattr(bundle_or_path, "path", None)
    return bundle_or_path, None if path is None else str(Path(path).resolve())


def id_kind(bundle: Any, which: str) -> str:
    kind = getattr(bundle, f"{which}_id_kind", "int")
    if kind not in ("int", "str"):
        raise ValueError(f"bundle.{which}_id_kind must be 'int' or 'str', got {kind!r}")
    return kind


def user_workflow(bundle: Any) -> Any:
    """A fresh copy of the bundle's fitted NVTabular workflow reduced to the ``user_id`` input, its encoded
    output renamed ``user_index``. The bundle's own workflow is never changed (``remove_inputs`` mutates)."""
    import nvtabular as nvt

    source = bundle.preprocessor.workflow
    workflow = copy.deepcopy(source)
    inputs = workflow.input_schema.column_names
    if "user_id" not in inputs or "user_id" not in workflow.output_schema.column_names:
        raise ValueError(f"the bundle's workflow must encode 'user_id'; its inputs are {inputs}")
    workflow.remove_inputs([c for c in inputs if c != "user_id"])
    renamed = nvt.Workflow(workflow.output_node >> nvt.ops.Rename(name=USER_INDEX))
    renamed.graph.construct_schema(workflow.input_schema)  # Categorify stays fitted: no refit
    return renamed


def build_ensemble(
    bundle: Any,
    store_path: str | Path,
    *,
    top_k: int | None = None,
    k_candidates: int | None = None,
    bundle_path: str | Path | None = None,
) -> Any:
    """A new ``Ensemble`` of the whole chain (never shared with an earlier call: export mutates ensembles).

    ``bundle_path``: where the bundle is saved; the retrieval and rerank ops then pickle only that path and
    each serving process reloads the bundle from it. Without it the ops pickle the bundle objects.
    ``top_k``/``k_candidates`` default to the bundle config's ``stages.llm_rerank.top_k`` and
    ``retrieval.k``.
    """
    from merlin.dag import ColumnSelector
    from merlin.schema import ColumnSchema, Schema, Tags
    from merlin.systems.dag import Ensemble
    from merlin.systems.dag.ops.workflow import TransformWorkflow

    from llm_rerank_plugin.feedback.online import fusion_params

    config = bundle.config
    rerank_cfg = config.llm_rerank()
    top_k = int(top_k or rerank_cfg.top_k)
    k_candidates = int(k_candidates or config.retrieval.k)
    user_dtype = str if id_kind(bundle, "user") == "str" else np.int64
    schema = Schema([ColumnSchema("user_id", dtype=user_dtype, tags=[Tags.USER_ID])])

    encoded = ["user_id"] >> TransformWorkflow(user_workflow(bundle))
    retrieval = RetrieveCandidates(
        bundle,
        k=k_candidates,
        path=bundle_path,
        item_id_kind=id_kind(bundle, "item"),
    )
    # Without a bundle folder, export saves the reranker into the repository (LLMRerank.save_artifacts) and
    # the executor model reloads it from there; with one, every process takes it from the loaded bundle.
    rerank = OnlineLLMRerank(
        bundle.reranker,
        top_k=top_k,
        store_path=store_path,
        params=fusion_params(rerank_cfg.feedback),
        feedback_weight=rerank_cfg.feedback.weight,
        bundle_path=bundle_path,
    )
    chain = (encoded + ColumnSelector(["user_id"])) >> retrieval >> rerank >> ServingOutput()
    return Ensemble(chain, schema)


def _config_pbtxt(name: str, user_type: str, item_type: str, instances: int) -> str:
    types = {"user_id": user_type, "item_id": item_type, "rank": "TYPE_INT32", "score": "TYPE_FP32",
             "retrieval_score": "TYPE_FP32", "aspect": "TYPE_STRING", "because": "TYPE_STRING"}  # fmt: skip
    outputs = ",\n".join(
        f'  {{ name: "{c}" data_type: {types[c]} dims: [ -1, 1 ] }}' for c in RESPONSE_COLUMNS
    )
    return (
        f'name: "{name}"\nbackend: "python"\nmax_batch_size: 0\n'
        f'input [\n  {{ name: "user_id" data_type: {user_type} dims: [ -1, 1 ] }}\n]\n'
        f"output [\n{outputs}\n]\n"
        f"instance_group [ {{ count: {instances} kind: KIND_CPU }} ]\n"
    )


def _set_instances(config_file: Path, instances: int) -> None:
    """Rewrite a generated config.pbtxt to ``instances`` CPU instances (merlin-systems writes KIND_AUTO)."""
    import tritonclient.grpc.model_config_pb2 as model_config
    from google.protobuf import text_format

    config = text_format.Parse(config_file.read_text(), model_config.ModelConfig())
    del config.instance_group[:]
    config.instance_group.add(count=instances, kind=model_config.ModelInstanceGroup.Kind.KIND_CPU)
    config_file.write_text(text_format.MessageToString(config))


def _write_model_py(folder: Path, module: str, cls: str) -> None:
    (folder / "1").mkdir(parents=True, exist_ok=True)
    (folder / "1" / "model.py").write_text(_SHIM.format(module=module, cls=cls))


def export_ensemble(
    bundle: Any,
    to_dir: str | Path,
    *,
    store_path: str | Path | None = None,
    instances: int = 1,
    top_k: int | None = None,
    k_candidates: int | None = None,
    overwrite: bool = False,
    executor: str = "merlin",
) -> Path:
    """Write the Triton model repository of the whole chain (``recommend``, its workflow model,
    ``feedback``) to ``to_dir`` and return it.

    ``bundle``: a fitted ``Bundle`` or its folder (``<output_dir>/model``). ``store_path``: the SQLite
    feedback store both models use (default: the config's ``stages.llm_rerank.feedback.store``, else
    ``<output_dir>/feedback.sqlite``). ``instances``: Triton ``instance_group`` count of every model (one
    process each). ``to_dir`` must be empty or absent unless ``overwrite``. A fresh ensemble is built
    for the export, so no ensemble a caller holds is changed.

    ``executor``: ``merlin`` (default) runs the pickled ensemble with merlin-systems' executor, the
    NVTabular step as a BLS call to ``0_transformworkflowtriton``; ``direct`` loads the same ensemble and
    calls its operators in sequence in the ``recommend`` process (``ops.DirectChain``, user ids encoded
    with the workflow's Categorify vocabulary): same output, a fraction of the latency (see the README).
    """
    from llm_rerank_plugin.feedback.online import default_store_path

    if int(instances) < 1:
        raise ValueError(f"instances must be >= 1, got {instances}")
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {list(EXECUTORS)}, got {executor!r}")
    bundle, bundle_path = _resolve_bundle(bundle)
    to_dir = Path(to_dir)
    if to_dir.exists() and any(to_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{to_dir} is not empty; pass overwrite=True (--force) to replace it")
        shutil.rmtree(to_dir)
    to_dir.mkdir(parents=True, exist_ok=True)
    store = Path(store_path) if store_path is not None else default_store_path(bundle.config)
    store = store.resolve()
    store.parent.mkdir(parents=True, exist_ok=True)

    ensemble = build_ensemble(bundle, store, top_k=top_k, k_candidates=k_candidates, bundle_path=bundle_path)
    ensemble.export(str(to_dir), name=RECOMMEND)

    user_type = "TYPE_STRING" if id_kind(bundle, "user") == "str" else "TYPE_INT64"
    item_type = "TYPE_STRING" if id_kind(bundle, "item") == "str" else "TYPE_INT64"
    recommend = to_dir / RECOMMEND
    (recommend / "config.pbtxt").write_text(_config_pbtxt(RECOMMEND, user_type, item_type, int(instances)))
    _write_model_py(recommend, "llm_rerank_plugin.serve.triton_models", EXECUTORS[executor])
    for workflow_model in to_dir.glob("*_transformworkflowtriton"):
        if executor == "direct":  # nothing calls it: not loaded, no processes
            shutil.rmtree(workflow_model)
            continue
        _set_instances(workflow_model / "config.pbtxt", int(instances))
        _write_model_py(workflow_model, "merlin.systems.triton.models.workflow_model", "TritonPythonModel")

    feedback = to_dir / FEEDBACK
    feedback.mkdir()
    (feedback / "config.pbtxt").write_text(
        f'name: "{FEEDBACK}"\nbackend: "python"\nmax_batch_size: 0\n'
        'input [ { name: "event" data_type: TYPE_STRING dims: [ -1, 1 ] } ]\n'
        'output [ { name: "accepted" data_type: TYPE_BOOL dims: [ -1, 1 ] } ]\n'
        f"instance_group [ {{ count: 1 kind: KIND_CPU }} ]\n"
        f'parameters: {{ key: "store_path" value: {{ string_value: "{store}" }} }}\n'
    )
    _write_model_py(feedback, "llm_rerank_plugin.serve.triton_models", "FeedbackModel")
    (to_dir / MANIFEST).write_text(
        json.dumps(
            {
                "bundle": bundle_path,
                "store_path": str(store),
                "instances": int(instances),
                "executor": executor,
                "user_id_kind": id_kind(bundle, "user"),
                "item_id_kind": id_kind(bundle, "item"),
                "models": [
                    RECOMMEND,
                    FEEDBACK,
                    *sorted(p.name for p in to_dir.glob("*_transformworkflowtriton")),
                ],
            },
            indent=2,
        )
    )
    return to_dir
