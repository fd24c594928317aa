"""The real Triton Inference Server (the binary nvidia-pytriton ships) serving a fitted bundle over HTTP.

A bundle is fitted on the tiny synthetic shop (string user and item ids, so the contract's BYTES path)
with a tiny random BERT, exported with two instances per model and served on free loopback ports; the same
shop with integer ids is served once more for the INT64 path. Model loading takes a minute or two on a
small shared CPU (every instance imports merlin and torch).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

import tritonclient.http as tritonclient_http  # noqa: E402  (a pinned dependency: no skip)
from tritonclient.utils import InferenceServerException  # noqa: E402

from llm_rerank_plugin.serve.client import RecommendClient, user_id_input  # noqa: E402
from llm_rerank_plugin.serve.export import export_ensemble  # noqa: E402
from llm_rerank_plugin.serve.server import TritonServer, free_port  # noqa: E402

INSTANCES = 2
COLD_USER = "C-never-seen"


@pytest.fixture(scope="module")
def shop_bundle(tiny_bert_dir, tmp_path_factory):
    from llm_rerank_plugin.data.synthetic import generate_shop

    tmp = tmp_path_factory.mktemp("served_shop")
    generate_shop(tmp / "shop", scale=0.04, seed=3)
    return fit_shop(tmp, tmp / "shop", tiny_bert_dir)


def fit_shop(tmp, data, model_dir):
    """``fit`` on the shop files in ``data`` with the lifecycle tests' config, on one torch thread."""
    import torch
    import yaml

    from llm_rerank_plugin.config import load_config
    from llm_rerank_plugin.pipeline import fit
    from tests.test_lifecycle import shop_config

    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(shop_config(tmp, data, model_dir)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fit(load_config(path))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["merlin", "direct"])
def served(request, shop_bundle, tmp_path_factory):
    """One server per executor: merlin-systems' executor model, and the same operators run directly."""
    tmp = tmp_path_factory.mktemp(f"triton_{request.param}")
    store = tmp / "feedback.sqlite"
    repo = export_ensemble(
        shop_bundle, tmp / "repo", store_path=store, instances=INSTANCES, executor=request.param
    )
    server = TritonServer(repo, work_dir=tmp / "work", exit_timeout_s=5)
    server.start(ready_timeout_s=900)
    try:
        yield server, repo, store
    finally:
        server.cleanup()


@pytest.fixture
def client(served):
    server, _, _ = served
    with RecommendClient(server.http_url) as c:
        yield c


def in_process(bundle, users):
    from llm_rerank_plugin.pipeline import Bundle

    return Bundle.load(bundle.path).recommend(users)


def test_top_k_equals_the_in_process_recommendation(served, client, shop_bundle):
    assert client.user_id_kind == "str"
    users = shop_bundle.users[:4]
    got = client.recommend(users)
    expected = in_process(shop_bundle, users)
    assert got["user_id"].tolist() == expected["user_id"].tolist()
    assert got["item_id"].tolist() == expected["item_id"].tolist()
    assert got["rank"].tolist() == expected["rank"].tolist()
    np.testing.assert_allclose(got["score"], expected["score"], rtol=1e-4, atol=1e-5)
    assert got["because"].tolist() == expected["because"].fillna("").tolist()
    k = shop_bundle.config.llm_rerank().top_k
    assert (got.groupby("user_id").size() == k).all()


def test_a_dislike_through_feedback_hides_the_item_on_the_next_request(served, client, shop_bundle):
    user = shop_bundle.users[5]
    before = client.recommend([user])
    item = before["item_id"].iloc[0]
    event = {"event_id": f"dislike-{user}-{item}", "user_id": user, "kind": "dislike", "item_id": item}
    assert client.feedback([event]) == [True]
    assert client.feedback([event]) == [False]  # idempotent: the same event id is logged once
    # Several requests, so both instances of `recommend` (separate processes) answer at least once.
    for _ in range(2 * INSTANCES + 2):
        after = client.recommend([user])
        assert item not in after["item_id"].tolist()
        assert len(after) == len(before)


def test_an_unknown_user_gets_the_cold_path(served, client, shop_bundle):
    got = client.recommend([COLD_USER])
    k = shop_bundle.config.llm_rerank().top_k
    assert len(got) == k and set(got["user_id"]) == {COLD_USER}
    assert (got["because"] == "").all()  # no history to cite
    popular = shop_bundle.popularity.recommend(
        np.asarray([None], dtype=object), k=shop_bundle.config.retrieval.k
    )
    assert set(got["item_id"]) <= set(popular.item_ids[0].tolist())


def test_malformed_requests_get_triton_errors_and_the_server_keeps_serving(served, client, shop_bundle):
    raw = client.client
    wrong_type = user_id_input([1, 2], "int")  # INT64 where the model takes BYTES
    with pytest.raises(InferenceServerException, match="(?i)data-type.*INT64.*expects.*BYTES"):
        raw.infer("recommend", [wrong_type])
    flat = tritonclient_http.InferInput("user_id", [2], "BYTES")  # [batch] instead of [batch, 1]
    flat.set_data_from_numpy(np.array([b"a", b"b"], dtype=object))
    with pytest.raises(InferenceServerException, match="(?i)shape|dims"):
        raw.infer("recommend", [flat])
    with pytest.raises(InferenceServerException, match="kind"):
        client.feedback([{"event_id": "bad-1", "user_id": "u", "item_id": "x"}])  # no kind
    with pytest.raises(InferenceServerException, match="not JSON"):
        event = tritonclient_http.InferInput("event", [1, 1], "BYTES")
        event.set_data_from_numpy(np.array([[b"{not json"]], dtype=object))
        raw.infer("feedback", [event])
    with pytest.raises(InferenceServerException, match="empty"):
        client.recommend([""])
    assert raw.is_server_live() and raw.is_model_ready("recommend")
    users = shop_bundle.users[6:8]
    assert set(client.recommend(users)["user_id"]) == set(users)


def merlin_only(repo) -> None:
    if json.loads((repo / "llm_rerank_serving.json").read_text())["executor"] != "merlin":
        pytest.skip("server lifecycle checked once, on the merlin executor's repository")


def test_serve_runs_in_the_foreground_and_stops_cleanly_on_sigterm(served, shop_bundle, tmp_path):
    _, repo, store = served
    merlin_only(repo)
    http, grpc = free_port(), free_port()
    # The command a user runs: the config the bundle was fitted with; it exports to <output_dir>/triton_repo.
    config = shop_bundle.path.parents[1] / "config.yaml"
    cli = Path(sys.executable).parent / "llm-rerank"
    command = [str(cli), "serve", "--config", str(config), "--http-port", str(http), "--grpc-port", str(grpc)]
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ)
    try:
        deadline = time.monotonic() + 900
        ready = False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                c = tritonclient_http.InferenceServerClient(f"127.0.0.1:{http}")
                ready = c.is_server_ready()
                c.close()
            except Exception:  # noqa: BLE001 - not listening yet
                ready = False
            if ready:
                break
            time.sleep(1)
        assert ready, (tmp_path / "serve.log").read_text()[-3000:]
        with RecommendClient(f"127.0.0.1:{http}") as c:
            assert len(c.recommend([shop_bundle.users[0]])) > 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0, (tmp_path / "serve.log").read_text()[-3000:]
        assert "stopped on SIGTERM" in (tmp_path / "serve.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()


def test_bench_triton_reports_latency_through_the_server(served, shop_bundle):
    from llm_rerank_plugin.serve.bench import bench_triton

    _, repo, _ = served
    merlin_only(repo)
    rows = bench_triton(repo, shop_bundle.users[:4], n_requests=20, instances=1)
    assert len(rows) == 1
    row = rows[0]
    assert row["instances"] == 1 and row["n_requests"] == 20
    assert 0 < row["p50_ms"] <= row["p99_ms"]
    assert row["requests_per_s"] > 0


# ------------------------------------------------------------------ integer ids: the INT64 path, for real
INT_COLD_USER = 999_999


@pytest.fixture(scope="module")
def int_served(tiny_bert_dir, tmp_path_factory):
    """The same tiny shop with integer customer and product ids (what a Merlin pipeline usually has), fitted,
    exported for the direct executor with one instance, and served: the INT64 inputs and outputs."""
    import pandas as pd

    from llm_rerank_plugin.data.synthetic import generate_shop

    tmp = tmp_path_factory.mktemp("served_int_shop")
    generate_shop(tmp / "text_ids", scale=0.04, seed=3)
    data = tmp / "shop"
    data.mkdir()
    as_int = {
        "customer": lambda s: s.str[1:].astype("int64") + 1000,
        "sku": lambda s: s.str[1:].astype("int64"),
    }
    as_int["product"] = as_int["sku"]
    for name in ("interactions", "items", "users"):
        frame = pd.read_parquet(tmp / "text_ids" / f"{name}.parquet")
        for column, convert in as_int.items():
            if column in frame.columns:
                frame[column] = convert(frame[column])
        frame.to_parquet(data / f"{name}.parquet")
    bundle = fit_shop(tmp, data, tiny_bert_dir)
    repo = export_ensemble(
        bundle, tmp / "repo", store_path=tmp / "feedback.sqlite", instances=1, executor="direct"
    )
    server = TritonServer(repo, work_dir=tmp / "work", exit_timeout_s=5)
    server.start(ready_timeout_s=900)
    try:
        yield server, bundle
    finally:
        server.cleanup()


def test_integer_ids_travel_as_int64_through_the_server(int_served):
    server, bundle = int_served
    with RecommendClient(server.http_url) as client:
        assert client.user_id_kind == "int"
        users = [int(u) for u in bundle.users[:3]]
        got = client.recommend(users)
        expected = in_process(bundle, users)
        assert got["user_id"].dtype == np.int64 and got["item_id"].dtype == np.int64
        assert got["user_id"].tolist() == expected["user_id"].tolist()
        assert got["item_id"].tolist() == expected["item_id"].tolist()
        np.testing.assert_allclose(got["score"], expected["score"], rtol=1e-4, atol=1e-5)

        item = int(got["item_id"].iloc[0])
        event = {
            "event_id": f"dislike-{users[0]}-{item}",
            "user_id": users[0],
            "kind": "dislike",
            "item_id": item,
        }
        assert client.feedback([event]) == [True]
        assert item not in client.recommend([users[0]])["item_id"].tolist()

        cold = client.recommend([INT_COLD_USER])
        assert len(cold) == bundle.config.llm_rerank().top_k and set(cold["user_id"]) == {INT_COLD_USER}
        with pytest.raises(InferenceServerException, match="(?i)data-type.*BYTES.*expects.*INT64"):
            client.client.infer("recommend", [user_id_input(["1001"], "str")])
