"""Merlin DAG operators of the serving chain: retrieval, reranking with live feedback, the response columns.

The chain (see ``export.build_ensemble``)::

    user_id ─┬─> TransformWorkflow (the bundle's NVTabular workflow, user id only) ─> user_index
             └────────────────────────────────────────────────────────────────────────┐
    [user_id, user_index] >> RetrieveCandidates >> OnlineLLMRerank >> ServingOutput ──> recommend

Every operator here pickles without its heavy state when it was given a bundle path: merlin-systems
pickles the graph into the Triton model repository and each model instance (one process per instance)
reloads the bundle once from that path (``load_bundle`` caches it per process).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
from merlin.core.dispatch import make_df
from merlin.dag import BaseOperator, ColumnSelector, DataFormats
from merlin.schema import ColumnSchema, Schema, Tags

from llm_rerank_plugin.feedback.fusion import FusionParams
from llm_rerank_plugin.platform.operator import LLMRerank
from llm_rerank_plugin.preprocess.workflow import FIRST_KNOWN_INDEX, categorify_vocabulary
from llm_rerank_plugin.retrieve.base import PAD_ITEM, Candidates

LOG = logging.getLogger(__name__)

USER_INDEX = "user_index"
# What the `recommend` model answers, one row per (user, item), users in request order, rank 1..k.
RESPONSE_COLUMNS = ("user_id", "item_id", "rank", "score", "retrieval_score", "aspect", "because")


class CandidateSource(Protocol):
    """What retrieval needs from a fitted bundle: ``Bundle.candidates`` (cold path included)."""

    def candidates(self, user_ids: Any, k: int | None = None) -> Candidates: ...


_BUNDLES: dict[str, Any] = {}
_BUNDLES_LOCK = threading.Lock()


def load_bundle(path: str | Path) -> Any:
    """``Bundle.load(path)``, once per process and path: the ops of one graph share one bundle."""
    key = str(Path(path).resolve())
    with _BUNDLES_LOCK:
        bundle = _BUNDLES.get(key)
        if bundle is None:
            from llm_rerank_plugin.pipeline import Bundle

            bundle = _BUNDLES[key] = Bundle.load(key)
        return bundle


class _BundleRef:
    """A bundle given either live (tests, in-process graphs) or as a path (pickled into a Triton repo)."""

    def __init__(self, bundle: Any | None, path: str | Path | None) -> None:
        if bundle is None and path is None:
            raise ValueError("give a bundle object or the path of a saved bundle (<output_dir>/model)")
        self.path = None if path is None else str(path)
        self._bundle = bundle

    def get(self) -> Any:
        if self._bundle is None:
            self._bundle = load_bundle(self.path)
        return self._bundle

    def __getstate__(self) -> dict[str, Any]:
        # With a path the bundle is reloaded where the graph is unpickled; without one it must travel.
        return {"path": self.path, "_bundle": None if self.path is not None else self._bundle}


class RetrieveCandidates(BaseOperator):
    """Top-``k`` retrieval candidates of each user, in long format (``user_id, item_id, score``).

    Inputs: ``user_id`` (the raw id of the request) and ``user_index`` (the same id encoded by the bundle's
    NVTabular workflow; ``< 3`` means padding/null/out-of-vocabulary, i.e. a user the workflow never saw).
    Candidates come from ``bundle.candidates``: the Merlin implicit retriever's top-k with the user's
    history excluded, popularity candidates for unknown users (the cold path). A request the workflow and
    the retriever disagree on (a user known to one but not the other) raises: it means the workflow and
    the retriever of the bundle were fitted on different logs.
    """

    def __init__(
        self,
        bundle: CandidateSource | None = None,
        k: int = 100,
        path: str | Path | None = None,
        item_id_kind: str = "int",
    ) -> None:
        super().__init__()
        if int(k) < 1:
            raise ValueError(f"k (candidates per user) must be >= 1, got {k}")
        if item_id_kind not in ("int", "str"):
            raise ValueError(f"item_id_kind must be 'int' or 'str', got {item_id_kind!r}")
        self.k = int(k)
        self.item_id_kind = item_id_kind
        self.source = _BundleRef(bundle, path)

    def warm(self) -> None:
        """Load the bundle now (model load time) instead of on the first request."""
        self.source.get()

    def compute_input_schema(
        self, root_schema: Schema, parents_schema: Schema, deps_schema: Schema, selector: ColumnSelector
    ) -> Schema:
        schema = super().compute_input_schema(root_schema, parents_schema, deps_schema, selector)
        missing = [c for c in ("user_id", USER_INDEX) if c not in schema.column_names]
        if missing:
            raise ValueError(
                f"RetrieveCandidates is missing input columns {missing}; it got {schema.column_names} and "
                f"expects ['user_id', {USER_INDEX!r}] (raw id and its NVTabular encoding)"
            )
        return schema

    def compute_output_schema(
        self, input_schema: Schema, col_selector: ColumnSelector, prev_output_schema: Schema | None = None
    ) -> Schema:
        user = input_schema["user_id"]
        return Schema(
            [
                ColumnSchema("user_id", dtype=user.dtype.without_shape, tags=[Tags.USER_ID]),
                ColumnSchema(
                    "item_id", dtype=str if self.item_id_kind == "str" else np.int64, tags=[Tags.ITEM_ID]
                ),  # fmt: skip
                ColumnSchema("score", dtype=np.float32),
            ]
        )

    def column_mapping(self, col_selector: ColumnSelector) -> dict[str, list[str]]:
        return {"user_id": ["user_id"], "item_id": ["user_id", USER_INDEX], "score": ["user_id", USER_INDEX]}

    @property
    def supported_formats(self) -> DataFormats:
        return DataFormats.PANDAS_DATAFRAME | DataFormats.CUDF_DATAFRAME

    def transform(self, col_selector: ColumnSelector, transformable: Any) -> Any:
        users = transformable["user_id"].to_numpy()
        index = transformable[USER_INDEX].to_numpy()
        bundle = self.source.get()
        known_user = _retriever_known_user(bundle)
        if known_user is not None:
            workflow_known = index >= FIRST_KNOWN_INDEX
            retriever_known = np.fromiter((known_user(u) for u in users.tolist()), bool, len(users))
            if (workflow_known != retriever_known).any():
                bad = users[workflow_known != retriever_known][:10].tolist()
                raise RuntimeError(
                    f"users {bad}: the bundle's NVTabular workflow and its retriever disagree on whether "
                    "they are known; were they fitted on different logs?"
                )
        cands = bundle.candidates(users, k=self.k)
        valid = cands.item_ids != PAD_ITEM
        if cands.item_ids.dtype == object:  # string ids: padding is None
            valid = np.vectorize(lambda v: v is not None and v != PAD_ITEM, otypes=[bool])(cands.item_ids)
        # Retrieval may answer with other id objects (e.g. np.str_); the request's ids are what goes back.
        rows = np.broadcast_to(np.arange(len(users))[:, None], cands.item_ids.shape)[valid]
        return make_df(
            {
                "user_id": users[rows],
                "item_id": cands.item_ids[valid],
                "score": cands.scores[valid].astype(np.float32),
            },
            device="cpu",
        )


def _retriever_known_user(bundle: Any) -> Callable[[Any], bool] | None:
    retriever = getattr(bundle, "retriever", None)
    return None if retriever is None else retriever.known_user


class _OnlineView:
    """What ``LLMRerank.transform`` calls (``items``, ``rerank``), backed by an ``OnlineReranker``."""

    def __init__(self, online: Any) -> None:
        self.online = online

    @property
    def items(self) -> Any:
        return self.online.reranker.items

    def rerank(self, user_id: Any, candidate_ids: Any, retrieval_scores: Any, top_k: int | None = 10) -> Any:
        return self.online.rerank(user_id, candidate_ids, retrieval_scores, top_k)

    def __getattr__(self, name: str) -> Any:  # save() and the rest go to the plain reranker
        return getattr(self.online.reranker, name)


class OnlineLLMRerank(LLMRerank):
    """``LLMRerank`` with the user's real-time feedback applied (``feedback.online.OnlineReranker``).

    Each process opens the SQLite store at ``store_path`` itself; ``OnlineReranker(watch_store=True)`` asks
    the store for events it has not seen before every rerank, so an event appended by any process (the
    ``feedback`` model, another model instance) is reflected in this process's next answer for that user.
    Without feedback for a user the ranking is exactly ``LLMRerank``'s.
    """

    def __init__(
        self,
        reranker: Any = None,
        top_k: int = 10,
        store_path: str | Path | None = None,
        params: FusionParams | None = None,
        feedback_weight: float = 1.0,
        path: str | None = None,
        device: str = "cpu",
        bundle_path: str | Path | None = None,
    ) -> None:
        if store_path is None:
            raise ValueError("OnlineLLMRerank needs store_path (the SQLite feedback store the server shares)")
        super().__init__(reranker=reranker, top_k=top_k, path=path, device=device)
        # With a bundle folder, each serving process takes the reranker of the bundle it loads anyway for
        # retrieval (load_bundle): one copy of the model per process, none in the model repository.
        self.bundle_path = None if bundle_path is None else str(bundle_path)
        self.store_path = str(store_path)
        self.params = params or FusionParams()
        self.feedback_weight = float(feedback_weight)
        self._online: Any = None

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_online"] = None  # SQLite connections and per-process user state never travel
        if self.bundle_path is not None:
            state["reranker"] = None
        return state

    def warm(self) -> None:
        """Load the reranker and open the store now (model load time) instead of on the first request."""
        self._live_reranker()

    def save_artifacts(self, artifact_path: str | None = None) -> None:
        if self.bundle_path is None:
            super().save_artifacts(artifact_path)

    def load_artifacts(self, artifact_path: str | None = None) -> None:
        if self.bundle_path is None:
            super().load_artifacts(artifact_path)

    def _live_reranker(self) -> Any:
        if self.bundle_path is not None and self.reranker is None:
            self.reranker = load_bundle(self.bundle_path).reranker
        base = super()._live_reranker()
        if self._online is None or self._online.reranker is not base:
            from llm_rerank_plugin.feedback.online import OnlineReranker
            from llm_rerank_plugin.feedback.store import SQLiteUserStateStore

            Path(self.store_path).parent.mkdir(parents=True, exist_ok=True)
            store = SQLiteUserStateStore(self.store_path)
            self._online = OnlineReranker(base, store, self.params, feedback_weight=self.feedback_weight)
        return _OnlineView(self._online)


class ServingOutput(BaseOperator):
    """The response columns of ``recommend`` (``RESPONSE_COLUMNS``), with a null ``because`` (cold users,
    nothing to cite) sent as an empty string: Triton BYTES tensors hold no nulls."""

    def compute_output_schema(
        self, input_schema: Schema, col_selector: ColumnSelector, prev_output_schema: Schema | None = None
    ) -> Schema:
        missing = [c for c in RESPONSE_COLUMNS if c not in input_schema.column_names]
        if missing:
            raise ValueError(f"ServingOutput is missing {missing}; it got {input_schema.column_names}")
        return Schema([input_schema[c] for c in RESPONSE_COLUMNS])

    def column_mapping(self, col_selector: ColumnSelector) -> dict[str, list[str]]:
        return {c: [c] for c in RESPONSE_COLUMNS}

    @property
    def supported_formats(self) -> DataFormats:
        return DataFormats.PANDAS_DATAFRAME | DataFormats.CUDF_DATAFRAME

    def transform(self, col_selector: ColumnSelector, transformable: Any) -> Any:
        df = transformable
        out = {c: df[c].to_numpy() for c in RESPONSE_COLUMNS}
        for c in ("aspect", "because"):
            out[c] = pd.Series(out[c], dtype=object).fillna("").astype(str).to_numpy(dtype=object)
        return make_df(out, device="cpu")


class DirectChain:
    """The ensemble's operators called one after the other on pandas frames, in this process: what the
    ``direct`` executor of ``recommend`` runs instead of merlin-systems' executor (same operators, same
    output; no per-node schema checks and conversions, no BLS round trip to the workflow model).

    ``user_index`` comes from the NVTabular workflow's own Categorify vocabulary (``Preprocessor.vocabulary``)
    looked up in a dict, rather than from ``Workflow.transform`` on a one-row frame (~8 ms here).
    """

    def __init__(self, graph_output_node: Any) -> None:
        from merlin.dag import postorder_iter_nodes

        from llm_rerank_plugin.retrieve.base import IdMap

        ops = {type(n.op): n.op for n in postorder_iter_nodes(graph_output_node, flatten_subgraphs=True)}
        try:
            self.retrieve = ops[RetrieveCandidates]
            self.rerank = ops[OnlineLLMRerank]
            self.output = ops[ServingOutput]
        except KeyError as exc:
            raise ValueError(
                f"the ensemble has no {exc.args[0].__name__} operator; it is not a serving chain"
            ) from None
        workflow = self.retrieve.source.get().preprocessor.workflow
        self.user_codes = IdMap(categorify_vocabulary(workflow, "user_id"))
        self._selectors = (
            ColumnSelector(["user_id", USER_INDEX]),
            ColumnSelector(["user_id", "item_id", "score"]),
            ColumnSelector(list(RESPONSE_COLUMNS)),
        )

    def warm(self) -> None:
        self.retrieve.warm()
        self.rerank.warm()

    def transform(self, user_ids: np.ndarray) -> pd.DataFrame:
        frame = pd.DataFrame({"user_id": user_ids, USER_INDEX: self.user_codes.encode(user_ids)})
        candidates = self.retrieve.transform(self._selectors[0], frame)
        ranked = self.rerank.transform(self._selectors[1], candidates)
        return self.output.transform(self._selectors[2], ranked)
