"""Client helpers over ``tritonclient.http`` for the ``recommend`` and ``feedback`` models."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import tritonclient.http as httpclient

from llm_rerank_plugin.serve.export import FEEDBACK, RECOMMEND
from llm_rerank_plugin.serve.ops import RESPONSE_COLUMNS


def user_id_input(user_ids: Sequence[Any], kind: str) -> httpclient.InferInput:
    """The ``user_id`` input tensor (``[batch, 1]``, INT64 or BYTES by the data's id kind)."""
    if kind == "str":
        array = np.array([str(u).encode("utf-8") for u in user_ids], dtype=object).reshape(-1, 1)
        tensor = httpclient.InferInput("user_id", list(array.shape), "BYTES")
    elif kind == "int":
        array = np.asarray(user_ids, dtype=np.int64).reshape(-1, 1)
        tensor = httpclient.InferInput("user_id", list(array.shape), "INT64")
    else:
        raise ValueError(f"kind must be 'int' or 'str', got {kind!r}")
    tensor.set_data_from_numpy(array)
    return tensor


def response_frame(result: httpclient.InferResult) -> pd.DataFrame:
    """A ``recommend`` response as a frame with ``RESPONSE_COLUMNS`` (strings decoded)."""
    columns = {}
    for name in RESPONSE_COLUMNS:
        values = result.as_numpy(name).reshape(-1)
        if values.dtype == object:
            values = np.array(
                [v.decode("utf-8") if isinstance(v, bytes) else v for v in values], dtype=object
            )
        columns[name] = values
    return pd.DataFrame(columns)


class RecommendClient:
    """``recommend``/``feedback`` over HTTP: ``RecommendClient("127.0.0.1:8000").recommend([7, 12])``.

    ``user_id_kind``: "int" or "str"; by default read from the ``recommend`` model's config.
    """

    def __init__(self, url: str, user_id_kind: str | None = None, timeout_s: float = 60.0) -> None:
        self.client = httpclient.InferenceServerClient(
            url, connection_timeout=timeout_s, network_timeout=timeout_s
        )
        if user_id_kind is None:
            config = self.client.get_model_config(RECOMMEND)
            dtype = next(i for i in config["input"] if i["name"] == "user_id")["data_type"]
            user_id_kind = "str" if dtype == "TYPE_STRING" else "int"
        self.user_id_kind = user_id_kind

    def recommend(self, user_ids: Sequence[Any]) -> pd.DataFrame:
        """Top-k rows of each distinct user (request order); raises InferenceServerException on errors."""
        result = self.client.infer(RECOMMEND, [user_id_input(user_ids, self.user_id_kind)])
        return response_frame(result)

    def feedback(self, events: Iterable[dict[str, Any]]) -> list[bool]:
        """Send events (``FeedbackEvent`` fields); returns, per event, True if new, False if a duplicate."""
        payload = [json.dumps(e).encode("utf-8") for e in events]
        array = np.array(payload, dtype=object).reshape(-1, 1)
        tensor = httpclient.InferInput("event", list(array.shape), "BYTES")
        tensor.set_data_from_numpy(array)
        result = self.client.infer(FEEDBACK, [tensor])
        return [bool(v) for v in result.as_numpy("accepted").reshape(-1)]

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> RecommendClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
