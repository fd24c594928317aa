"""``LLMRerank``: the reranker as a Merlin DAG operator, for NVTabular workflows and merlin-systems graphs.

Input contract (column names configurable; any other input columns are ignored):

* long format, one row per candidate: ``user_col`` (scalar id), ``item_col`` (scalar item id),
  ``score_col`` (scalar retrieval score) -- what a retrieval stage emits after unrolling its top-N;
* list format, one row per user: ``item_col`` and ``score_col`` are list columns of equal length per row.

A user's candidates may be spread over several rows (long or list) but must arrive in one frame: the
operator reranks each frame it is given, so under ``Workflow.transform(Dataset)`` every partition must hold
all of a user's candidates (e.g. one partition, or data partitioned by user).

Output contract (always long format, fixed names, users in order of first appearance, best first):
``user_id, item_id, rank, score, retrieval_score, aspect, aspect_share, because`` with
``min(top_k, known candidates)`` rows per user and ``rank`` 1..k (see ``Ranking.to_frame``).

Each user's candidates pass the request contract (``platform/contract.py``), exactly as on the platform
stage: user and item ids are normalised to the reranker's id types or refused by name (the output keeps
the input's ids and dtypes); duplicate candidates are merged, keeping the best retrieval score; infinite
scores are refused, NaN means "no score"; candidate ids missing from the reranker's catalogue are dropped
with a logged warning. A user left with no known candidate (``NoKnownCandidatesError``) or given none (in
list format) raises, because silently emitting no rows for a user would hide a catalogue or retrieval
mismatch. All of these errors are ``contract.RequestError``s.

Fallbacks: a user the reranker has no history or profile for is ranked as a cold user (empty profile text,
no recent-history feature, ``because`` is null).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from merlin.core.dispatch import is_cpu_object, is_list_dtype, make_df
from merlin.dag import BaseOperator, ColumnSelector, DataFormats
from merlin.schema import ColumnSchema, Schema, Tags

from llm_rerank_plugin.platform.contract import (
    MalformedRequestError,
    check_top_k,
    normalise_id,
    prepare_candidates,
    user_id_kind,
)
from llm_rerank_plugin.rerank.reranker import RANKING_COLUMNS, LLMReranker

LOG = logging.getLogger(__name__)

ARTIFACT_DIR = "llm_rerank"
OUTPUT_COLUMNS = RANKING_COLUMNS


def load_reranker(path: str, device: str = "auto") -> LLMReranker:
    """The reranker of a fitted bundle folder (it holds ``manifest.json`` and ``reranker/``), or of a folder
    written by ``LLMReranker.save``."""
    folder = Path(path)
    if (folder / "manifest.json").is_file():
        folder = folder / "reranker"
    return LLMReranker.load(folder, device=device)


class LLMRerank(BaseOperator):
    """Rerank each user's retrieval candidates with an ``LLMReranker`` and keep the best ``top_k``.

    ``["user_id", "item_id", "score"] >> LLMRerank(reranker=reranker, top_k=10)``.

    Parameters
    ----------
    reranker : the live reranker; or give ``path`` (a folder written by ``LLMReranker.save``).
    top_k : rows kept per user, an int >= 1 (fewer when a user has fewer distinct known candidates).
    user_col, item_col, score_col : input column names (the output names are fixed, see module doc).
    path : a fitted bundle (``<output_dir>/model``, written by ``llm-rerank fit``) or a saved reranker
        folder, loaded now; given with ``reranker``, where that reranker was saved.
        With a path (also set by ``save_artifacts``), pickling the operator stores only the path and the
        model is reloaded from the folder on first use, so in-memory changes made since (``set_users``,
        ``observe``) do not travel: save again. Without one, pickles embed the model.
    device : where a reranker loaded from a folder runs ("auto", "cpu", "cuda").
    """

    def __init__(
        self,
        reranker: LLMReranker | None = None,
        top_k: int = 10,
        user_col: str = "user_id",
        item_col: str = "item_id",
        score_col: str = "score",
        path: str | None = None,
        device: str = "auto",
    ) -> None:
        super().__init__()
        if reranker is None and path is None:
            raise ValueError("LLMRerank needs a reranker object or the path of a saved reranker folder")
        self.top_k = check_top_k(top_k)
        self.user_col, self.item_col, self.score_col = user_col, item_col, score_col
        self.path = None if path is None else str(path)
        self.device = device
        # Load eagerly so that a bad folder fails at graph construction, not at the first request.
        self.reranker = reranker if reranker is not None else load_reranker(self.path, device)

    def __getstate__(self) -> dict[str, Any]:
        # With a folder to reload from, pickles (Workflow.save, Dask workers, merlin-systems' executor model)
        # carry only the path; without one, the model itself must travel or it would be silently lost.
        # (LLMReranker pickles without its item-projection cache, which is rebuilt on first use.)
        state = dict(self.__dict__)
        if self.path is not None:
            state["reranker"] = None
        return state

    def _live_reranker(self) -> LLMReranker:
        if self.reranker is None:  # unpickled without the model: reload it from the folder, once
            self.reranker = load_reranker(self.path, self.device)
        return self.reranker

    # ---------------------------------------------------------------- artifacts
    def save_artifacts(self, artifact_path: str | None = None) -> None:
        """Write the reranker to ``artifact_path/llm_rerank``; the operator then refers to that copy, so a
        graph pickled next to it (merlin-systems does exactly that) stays small and reloads elsewhere."""
        if not artifact_path:
            return
        folder = Path(artifact_path) / ARTIFACT_DIR
        self._live_reranker().save(folder)
        self.path = str(folder)

    def load_artifacts(self, artifact_path: str | None = None) -> None:
        """Reload the reranker from ``artifact_path/llm_rerank``. ``Graph`` calls this with ``""`` on
        construction: that is a no-op (a folder-only operator reloads lazily on first use)."""
        if not artifact_path:
            return
        folder = Path(artifact_path) / ARTIFACT_DIR
        if not folder.is_dir():
            raise FileNotFoundError(f"no saved reranker at {folder} (written by LLMRerank.save_artifacts)")
        self.reranker = LLMReranker.load(folder, device=self.device)
        self.path = str(folder)

    # ---------------------------------------------------------------- schemas
    def _check_columns(self, present: list[str]) -> None:
        expected = [self.user_col, self.item_col, self.score_col]
        missing = [c for c in expected if c not in present]
        if missing:
            raise ValueError(
                f"LLMRerank is missing input columns {missing}; it got {list(present)} and expects "
                f"{expected} (user id, candidate item id(s), retrieval score(s)). Select them before the "
                "operator or set user_col/item_col/score_col."
            )

    def compute_input_schema(
        self, root_schema: Schema, parents_schema: Schema, deps_schema: Schema, selector: ColumnSelector
    ) -> Schema:
        input_schema = super().compute_input_schema(root_schema, parents_schema, deps_schema, selector)
        self._check_columns(input_schema.column_names)
        return input_schema

    def compute_output_schema(
        self, input_schema: Schema, col_selector: ColumnSelector, prev_output_schema: Schema | None = None
    ) -> Schema:
        self._check_columns(input_schema.column_names)

        def id_column(name: str, source: ColumnSchema, tag: Tags) -> ColumnSchema:
            # Ids pass through unchanged, so keep their element dtype, tags and properties (e.g. the
            # Categorify domain); a list input's value_count no longer applies to the scalar output.
            properties = {k: v for k, v in source.properties.items() if k != "value_count"}
            return ColumnSchema(name, tags=list(source.tags) + [tag], properties=properties,
                                dtype=source.dtype.without_shape, is_list=False)  # fmt: skip

        return Schema(
            [
                id_column("user_id", input_schema[self.user_col], Tags.USER_ID),
                id_column("item_id", input_schema[self.item_col], Tags.ITEM_ID),
                ColumnSchema("rank", dtype=np.int32),
                ColumnSchema("score", dtype=np.float32),
                ColumnSchema("retrieval_score", dtype=np.float32),
                ColumnSchema("aspect", dtype=str),
                ColumnSchema("aspect_share", dtype=np.float32),
                ColumnSchema("because", dtype=str),
            ]
        )

    def column_mapping(self, col_selector: ColumnSelector) -> dict[str, list[str]]:
        # Merlin derives output column names (and lineage) from this mapping, not from the schema.
        inputs = [self.user_col, self.item_col, self.score_col]
        mapping = {name: inputs for name in OUTPUT_COLUMNS}
        mapping.update(user_id=[self.user_col], item_id=[self.item_col])
        return mapping

    @property
    def supported_formats(self) -> DataFormats:
        # Grouping by user and building string columns want a frame; the executor converts tensor tables.
        return DataFormats.PANDAS_DATAFRAME | DataFormats.CUDF_DATAFRAME

    # ---------------------------------------------------------------- transform
    def transform(self, col_selector: ColumnSelector, transformable: Any) -> Any:
        """Rerank a pandas or cuDF frame; returns the same frame library (the scoring itself runs on host
        numpy, only the candidate columns are copied off the GPU)."""
        df = transformable
        self._check_columns(list(df.columns))
        users, items, retrieval = self._long_candidates(df)
        reranker = self._live_reranker()

        # Grouped by the normalised id, so "1" and 1 are one user of an integer-keyed reranker.
        normalised = _normalise_users(users, user_id_kind(reranker))
        codes, keys = pd.factorize(normalised)  # users in order of first appearance
        order = np.argsort(codes, kind="stable")
        groups = np.split(order, np.flatnonzero(np.diff(codes[order])) + 1) if len(order) else []

        # Seeded with empty columns so that an empty frame still yields the schema's dtypes.
        parts: dict[str, list[np.ndarray]] = {
            "user_id": [users[:0]], "item_id": [items[:0]], "rank": [np.empty(0, np.int32)],
            "score": [np.empty(0, np.float32)], "retrieval_score": [np.empty(0, np.float32)],
            "aspect": [np.empty(0, object)], "aspect_share": [np.empty(0, np.float32)],
            "because": [np.empty(0, object)],
        }  # fmt: skip
        for group in groups:
            cands = prepare_candidates(reranker, keys[codes[group[0]]], items[group], retrieval[group])
            ranking = reranker.rerank(cands.user_id, cands.item_ids, cands.scores, top_k=self.top_k)
            k = len(ranking.item_ids)
            parts["user_id"].append(users[group[:1]].repeat(k))  # keeps the input id dtype
            parts["item_id"].append(ranking.item_ids)
            parts["rank"].append(np.arange(1, k + 1, dtype=np.int32))
            parts["score"].append(ranking.scores.astype(np.float32))
            parts["retrieval_score"].append(ranking.retrieval_scores.astype(np.float32))
            parts["aspect"].append(np.array(ranking.aspects, dtype=object))
            parts["aspect_share"].append(ranking.aspect_shares.astype(np.float32))
            parts["because"].append(np.array(ranking.because, dtype=object))

        columns = {name: np.concatenate(parts[name]) for name in OUTPUT_COLUMNS}
        return make_df(columns, device="cpu" if is_cpu_object(df) else "gpu")

    def _long_candidates(self, df: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(user ids, item ids, retrieval scores) on host, one entry per candidate, list rows unrolled."""
        user, item, score = df[self.user_col], df[self.item_col], df[self.score_col]
        if not is_list_dtype(item):
            if is_list_dtype(score):
                raise ValueError(f"{self.score_col!r} is a list column but {self.item_col!r} is not")
            return user.to_numpy(), item.to_numpy(), score.to_numpy()
        if not is_list_dtype(score):
            raise ValueError(f"{self.item_col!r} is a list column but {self.score_col!r} is not")
        items, lengths = _unroll(item)
        scores, score_lengths = _unroll(score)
        users = user.to_numpy()
        if not np.array_equal(lengths, score_lengths):
            bad = np.flatnonzero(lengths != score_lengths)[:10]
            raise ValueError(f"{self.item_col!r} and {self.score_col!r} lists differ in length for users "
                             f"{users[bad].tolist()}")  # fmt: skip
        if (lengths == 0).any():
            raise MalformedRequestError(
                f"users {users[lengths == 0][:10].tolist()} have an empty candidate list"
            )
        return users.repeat(lengths), items, scores


def _normalise_users(users: np.ndarray, kind: str) -> np.ndarray:
    """The user id column as the reranker's user id type (the contract); integer columns as they are."""
    if users.dtype.kind in "iu" and kind != "str":
        return users
    out = np.empty(len(users), dtype=object)
    # A user has many candidate rows: normalise each distinct value once. Keyed with the type, because
    # 1, 1.0 and True are equal dict keys and True must be refused.
    cache: dict[tuple[type, Any], Any] = {}
    for i, value in enumerate(users.tolist()):
        try:
            key = (type(value), value)
            hash(key)
        except TypeError:  # unhashable (a list): normalise_id names and refuses it
            normalise_id(value, kind, "user_id")
        if key not in cache:
            cache[key] = normalise_id(value, kind, "user_id")
        out[i] = cache[key]
    return out


def _unroll(column: Any) -> tuple[np.ndarray, np.ndarray]:
    """(all list elements on host, length of each row's list) of a pandas or cuDF list column."""
    if is_cpu_object(column):
        lengths = column.map(len).to_numpy()
        values = [np.asarray(v) for v in column]
        flat = np.concatenate(values) if values else np.empty(0)
        if flat.dtype.kind in "US" and any(v.dtype.kind not in "US" for v in values):
            # numpy would turn [3] and ["4"] into strings; keep each element as it came (the contract
            # normalises them).
            flat = np.empty(int(lengths.sum()), dtype=object)
            flat[:] = [x for row in column for x in row]
        return flat, lengths
    return column.list.leaves.to_numpy(), column.list.len().to_numpy()
