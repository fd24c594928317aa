"""The Triton python-backend models of the exported repository. Imported only inside the server's backend
stub (``triton_python_backend_utils`` exists nowhere else); each exported ``model.py`` is a shim that
applies ``stubfix`` and imports a class from here.

- ``RecommendModel``: merlin-systems' executor model (it loads the pickled ensemble and the operators'
  artifacts) with the client contract on top: ``user_id`` ``[batch, 1]`` in, one ``[rows, 1]`` tensor per
  response column out; a bad request gets an error response naming the problem, and the model keeps
  serving.
- ``FeedbackModel``: validates JSON feedback events and appends them to the SQLite store; ``recommend``
  instances read the store before each rerank (``OnlineReranker(watch_store=True)``).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils
from merlin.dag import postorder_iter_nodes
from merlin.systems.dag.runtimes.triton import TritonExecutorRuntime
from merlin.systems.triton.models.executor_model import TritonPythonModel as MerlinExecutorModel
from merlin.table import TensorTable

from llm_rerank_plugin.serve.ops import RESPONSE_COLUMNS, DirectChain


def _error(exc: BaseException) -> Any:
    return pb_utils.InferenceResponse(
        output_tensors=[], error=pb_utils.TritonError(f"{type(exc).__name__}: {exc}")
    )


def _input(request: Any, name: str) -> np.ndarray:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        raise ValueError(f"the request has no input {name!r}")
    array = tensor.as_numpy()
    if array.ndim != 2 or array.shape[1] != 1:
        raise ValueError(f"input {name!r} must have shape [batch, 1]; got {list(array.shape)}")
    return array[:, 0]


def _column(table: Any, name: str) -> np.ndarray:
    column = table[name]
    values = (
        column.to_numpy() if hasattr(column, "to_numpy") else np.asarray(getattr(column, "values", column))
    )
    return np.asarray(values)


class RecommendModel(MerlinExecutorModel):
    """``recommend``: user ids in, top-k rows out (see ``export``'s module docstring for the contract)."""

    def initialize(self, args: dict[str, str]) -> None:
        super().initialize(args)  # loads ensemble.pkl and calls load_artifacts on every operator
        # The bundle and the reranker load here, so /v2/health/ready means "answers at full speed".
        for node in postorder_iter_nodes(self.ensemble.graph.output_node, flatten_subgraphs=True):
            warm = getattr(node.op, "warm", None)
            if callable(warm):
                warm()
        config = json.loads(args["model_config"])
        user_input = next(i for i in config["input"] if i["name"] == "user_id")
        self.string_ids = user_input["data_type"] == "TYPE_STRING"
        self.runtime = TritonExecutorRuntime()

    def _transform(self, ids: np.ndarray) -> Any:
        return self.ensemble.transform(TensorTable({"user_id": ids}), runtime=self.runtime)

    def execute(self, requests: list[Any]) -> list[Any]:
        return [self._execute_one(request) for request in requests]

    def _execute_one(self, request: Any) -> Any:
        try:
            ids = _input(request, "user_id")
            if self.string_ids:
                ids = np.array(
                    [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in ids], dtype=object
                )
                if any(not v for v in ids):
                    raise ValueError("user_id must be non-empty strings")
            # One answer per distinct user, in order of first appearance: the reranker groups rows by user,
            # so a repeated id would otherwise merge two copies of the same candidate list.
            _, first = np.unique(ids, return_index=True)
            ids = ids[np.sort(first)]
            if len(ids) == 0:
                raise ValueError("the request holds no user_id")
            out = self._transform(ids)
            tensors = []
            for name in RESPONSE_COLUMNS:
                values = _column(out, name)
                if values.dtype.kind in "OUS":
                    values = values.astype(object)
                tensors.append(pb_utils.Tensor(name, values.reshape(-1, 1)))
            return pb_utils.InferenceResponse(tensors)
        except Exception as exc:  # noqa: BLE001 - every failure becomes this request's error response
            return _error(exc)


class DirectRecommendModel(RecommendModel):
    """``recommend`` with the ``direct`` executor: the same pickled ensemble and operators, called in
    sequence in this process (``ops.DirectChain``) instead of through merlin-systems' executor."""

    def initialize(self, args: dict[str, str]) -> None:
        super().initialize(args)
        self.chain = DirectChain(self.ensemble.graph.output_node)

    def _transform(self, ids: np.ndarray) -> Any:
        return self.chain.transform(ids)


class FeedbackModel:
    """``feedback``: input ``event`` (BYTES ``[batch, 1]``, one JSON ``FeedbackEvent`` each: ``event_id``,
    ``user_id``, ``kind``, ``item_id``/``rating``/``text`` as the kind needs, optional ``timestamp``);
    output ``accepted`` (BOOL ``[batch, 1]``: True if new, False if that ``event_id`` was already logged).
    All events of a request are validated before any is written."""

    def initialize(self, args: dict[str, str]) -> None:
        from llm_rerank_plugin.feedback.store import SQLiteUserStateStore

        config = json.loads(args["model_config"])
        path = config["parameters"]["store_path"]["string_value"]
        self.store = SQLiteUserStateStore(path)

    def execute(self, requests: list[Any]) -> list[Any]:
        return [self._execute_one(request) for request in requests]

    def _execute_one(self, request: Any) -> Any:
        from llm_rerank_plugin.feedback.events import parse_event

        try:
            raw = _input(request, "event")
            events = []
            for i, value in enumerate(raw):
                text = value.decode("utf-8") if isinstance(value, bytes) else str(value)
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"event {i} is not JSON ({exc}); got {text[:80]!r}") from None
                if not isinstance(obj, dict):
                    raise ValueError(f"event {i} must be a JSON object; got {type(obj).__name__}")
                try:
                    events.append(parse_event(obj))
                except ValueError as exc:
                    raise ValueError(f"event {i}: {exc}") from None
            accepted = np.array([self.store.append(ev) for ev in events], dtype=bool)
            return pb_utils.InferenceResponse([pb_utils.Tensor("accepted", accepted.reshape(-1, 1))])
        except Exception as exc:  # noqa: BLE001
            return _error(exc)

    def finalize(self) -> None:
        self.store.close()
