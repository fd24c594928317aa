"""NVTabular preprocessing: id encoding and feature tagging, fitted on the training split only.

Encoded ids follow NVTabular's ``Categorify``: 0 is padding, 1 null, 2 the out-of-vocabulary bucket (every
id unseen at fit time lands there), known values from 3 on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import nvtabular as nvt
import pandas as pd
from merlin.io import Dataset

from llm_rerank_plugin.data.base import InteractionData

OOV_INDEX = 2
FIRST_KNOWN_INDEX = 3


@dataclass
class FeatureSpec:
    """Which columns the workflow encodes and which text columns it carries through untouched."""

    user_features: list[str] = field(default_factory=lambda: ["age", "gender", "occupation"])
    item_features: list[str] = field(default_factory=lambda: ["year"])
    text_columns: list[str] = field(default_factory=lambda: ["title", "genres"])
    passthrough: list[str] = field(default_factory=lambda: ["rating", "timestamp"])


def join_features(interactions: Any, data: InteractionData, spec: FeatureSpec) -> Any:
    """Interactions with the user and item columns the workflow needs, joined on the original ids."""
    wanted = dict.fromkeys((*spec.item_features, *spec.text_columns))  # a column named twice is joined once
    item_cols = ["item_id", *[c for c in wanted if c in data.items.columns and c != "item_id"]]
    user_cols = ["user_id", *[c for c in spec.user_features if c in data.users.columns]]
    frame = interactions.merge(data.items[item_cols], on="item_id", how="left")
    if len(user_cols) > 1:
        frame = frame.merge(data.users[user_cols], on="user_id", how="left")
    return frame


class Preprocessor:
    """An ``nvtabular.Workflow`` that Categorifies ids and tags USER_ID / ITEM_ID / USER / ITEM columns."""

    def __init__(self, workflow: nvt.Workflow, spec: FeatureSpec) -> None:
        self.workflow = workflow
        self.spec = spec

    @classmethod
    def fit(cls, frame: Any, work_dir: str | Path, spec: FeatureSpec | None = None) -> Preprocessor:
        """Fit on ``frame`` (the training split joined with its features); vocabularies go to ``work_dir``."""
        spec = spec or FeatureSpec()
        out_path = str(Path(work_dir) / "categories")
        columns = set(frame.columns)
        for required in ("user_id", "item_id"):
            if required not in columns:
                raise ValueError(f"the frame to preprocess needs {required!r}; got columns {sorted(columns)}")
        user_id = ["user_id"] >> nvt.ops.Categorify(out_path=out_path) >> nvt.ops.TagAsUserID()
        item_id = ["item_id"] >> nvt.ops.Categorify(out_path=out_path) >> nvt.ops.TagAsItemID()
        outputs = user_id + item_id
        user_features = [c for c in spec.user_features if c in columns]
        if user_features:
            outputs += user_features >> nvt.ops.Categorify(out_path=out_path) >> nvt.ops.TagAsUserFeatures()
        item_features = [c for c in spec.item_features if c in columns]
        if item_features:
            outputs += item_features >> nvt.ops.Categorify(out_path=out_path) >> nvt.ops.TagAsItemFeatures()
        # A column that is also a feature is already in the output (encoded): carrying it raw too would
        # give the workflow two outputs of one name.
        encoded = {"user_id", "item_id", *user_features, *item_features}
        carried = [c for c in dict.fromkeys((*spec.text_columns, *spec.passthrough)) if c in columns]
        carried = [c for c in carried if c not in encoded]
        if carried:
            outputs += carried
        workflow = nvt.Workflow(outputs)
        workflow.fit(Dataset(frame))
        return cls(workflow, spec)

    def transform(self, frame: Any) -> Any:
        """Encode a frame (same columns as at fit time); same frame library out as in."""
        return self.workflow.transform(Dataset(frame)).to_ddf().compute(scheduler="synchronous")

    def transform_dataset(self, frame: Any) -> Dataset:
        """Encode a frame into a ``merlin.io.Dataset`` carrying the tagged output schema."""
        return self.workflow.transform(Dataset(frame))

    def vocabulary(self, column: str) -> np.ndarray:
        """Original values indexed by encoded id (``object`` array; indices below 3 hold None)."""
        return categorify_vocabulary(self.workflow, column)

    def cardinality(self, column: str) -> int:
        return int(self.workflow.output_schema[column].properties["embedding_sizes"]["cardinality"])

    def save(self, path: str | Path) -> None:
        self.workflow.save(str(path))

    @classmethod
    def load(cls, path: str | Path, spec: FeatureSpec | None = None) -> Preprocessor:
        return cls(nvt.Workflow.load(str(path)), spec or FeatureSpec())


def categorify_vocabulary(workflow: nvt.Workflow, column: str) -> np.ndarray:
    """Original values indexed by their Categorify code, read from the file the workflow's own Categorify
    op uses. (Not from the output schema's ``cat_path``: a saved and reloaded workflow keeps the path it
    was fitted in there, while the op's ``categories`` point at the loaded copy.)"""
    from merlin.dag import postorder_iter_nodes

    for node in postorder_iter_nodes(workflow.output_node):
        if isinstance(node.op, nvt.ops.Categorify) and column in node.op.categories:
            unique = pd.read_parquet(node.op.categories[column])
            values = np.empty(int(unique.index.max()) + 1, dtype=object)
            values[unique.index.to_numpy()] = unique[column].to_numpy()
            return values
    raise ValueError(f"the workflow has no fitted Categorify for {column!r}")
