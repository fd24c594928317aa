"""TextEncoder backends torch / onnx / onnx-int8 on the tiny BERT: same vectors, cached export, errors."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import numpy as np
import onnxruntime  # noqa: E402, F401  (a project dependency: its absence is a failure, not a skip)
import pytest
import torch

from llm_rerank_plugin.rerank import onnx_backend
from llm_rerank_plugin.rerank.encoder import (
    ItemVectorCache,
    OnnxRuntimeMissingError,
    TextEncoder,
    forget_recent_vectors,
)
from llm_rerank_plugin.rerank.onnx_backend import OnnxExportError

TEXTS = [
    "star wars",
    "a toy story of a cat and a dog and a very long night at sea with a king and a queen",
    "fargo",
    "",
    "love in the time of war, a drama with romance and crime",
    "space opera",
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(single_torch_thread):
    yield


pytestmark = pytest.mark.usefixtures("encode_afresh")


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="module")
def encoders(tiny_bert_dir: Path, onnx_cache: Path) -> dict[str, TextEncoder]:
    return {
        b: TextEncoder(str(tiny_bert_dir), device="cpu", batch_size=2, backend=b, onnx_cache_dir=onnx_cache)
        for b in ("torch", "onnx", "onnx-int8")
    }


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1)  # rows are unit vectors


@pytest.mark.parametrize("backend", ["torch", "onnx", "onnx-int8"])
def test_each_backend_loads_and_encodes(encoders, backend: str) -> None:
    enc = encoders[backend]
    assert enc.backend == backend and enc.device.type == "cpu"
    vecs = enc.encode(TEXTS)
    assert vecs.shape == (len(TEXTS), enc.dim) == (len(TEXTS), 32) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    # batched (length-sorted, padded) and one-by-one agree: padding is masked out in the pooling
    one_by_one = np.stack([enc.encode_one(t) for t in TEXTS])
    assert cosines(vecs, one_by_one).min() > 0.999
    assert (enc.onnx_path is None) == (backend == "torch")


def test_onnx_vectors_match_torch(encoders) -> None:
    ref = encoders["torch"].encode(TEXTS)
    assert cosines(encoders["onnx"].encode(TEXTS), ref).min() > 0.9999
    long_text = " ".join(["star wars"] * 200)  # truncated to max_length by both
    assert cosines(encoders["onnx"].encode([long_text]), encoders["torch"].encode([long_text]))[0] > 0.9999


def test_int8_vectors_are_close_and_rank_like_torch(encoders) -> None:
    ref = encoders["torch"].encode(TEXTS)
    int8 = encoders["onnx-int8"].encode(TEXTS)
    assert cosines(int8, ref).min() > 0.95
    assert not np.array_equal(int8, encoders["onnx"].encode(TEXTS)), "int8 must be a different model"
    query_ref, query_int8 = (
        encoders["torch"].encode_one("space opera war"),
        encoders["onnx-int8"].encode_one("space opera war"),
    )
    assert np.argmax(ref @ query_ref) == np.argmax(int8 @ query_int8)


def test_int8_encoder_ranks_in_the_reranker(tiny_reranker, encoders) -> None:
    """The cold path (user text encoded on the request) served by the int8 encoder."""
    candidates = tiny_reranker.items.item_ids[:8]
    scores = np.linspace(1.0, 0.0, len(candidates)).astype(np.float32)
    tiny_reranker.encoder = encoders["onnx-int8"]
    tiny_reranker.forget(42)
    result = tiny_reranker.rerank(42, candidates, scores, 5)
    assert len(result.item_ids) == 5 and set(result.item_ids.tolist()) <= set(candidates.tolist())
    assert np.all(np.isfinite(result.scores)) and np.all(np.diff(result.scores) <= 0)


def test_vector_key_and_cache_file_differ_per_backend(encoders, tmp_path: Path) -> None:
    keys = {b: e.vector_key for b, e in encoders.items()}
    assert len(set(keys.values())) == 3
    assert all(f"backend={b}" in k for b, k in keys.items())
    assert len({e.model_id for e in encoders.values()}) == 1, "same weights, same model_id"
    paths = {ItemVectorCache(tmp_path, e).path for e in encoders.values()}
    assert len(paths) == 3
    torch_cache = ItemVectorCache(tmp_path, encoders["torch"])
    torch_cache.get(["x"], ["star wars"])
    int8_cache = ItemVectorCache(tmp_path, encoders["onnx-int8"])
    got = int8_cache.get(["x"], ["star wars"])
    assert int8_cache.stats.misses == 1, "int8 must not be served torch's vector"
    np.testing.assert_allclose(got[0], encoders["onnx-int8"].encode_one("star wars"), atol=1e-6)


def test_second_load_uses_the_cached_export(tiny_bert_dir, onnx_cache, encoders, monkeypatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(onnx_backend, "_export", lambda *a, **k: calls.append("export"))
    monkeypatch.setattr(onnx_backend, "_quantize", lambda *a, **k: calls.append("quantize"))
    again = TextEncoder(str(tiny_bert_dir), device="cpu", backend="onnx-int8", onnx_cache_dir=onnx_cache)
    assert calls == []
    assert again.onnx_path == encoders["onnx-int8"].onnx_path
    assert again.onnx_path.parent.parent == onnx_cache
    # Not bit-equal: dynamic int8 scales each activation tensor by its batch's range, and `again`
    # batches 64 texts where the fixture batches 2.
    vectors = again.encode(TEXTS)
    forget_recent_vectors()  # the same vectors' key: the fixture's encoder must run its own session
    assert cosines(vectors, encoders["onnx-int8"].encode(TEXTS)).min() > 0.999
    manifest = (again.onnx_path.parent / "manifest.json").read_text()
    assert again.model_id in manifest and '"opset": 17' in manifest


def test_other_weights_get_their_own_export(tiny_bert_dir_b, onnx_cache, encoders) -> None:
    other = TextEncoder(str(tiny_bert_dir_b), device="cpu", backend="onnx", onnx_cache_dir=onnx_cache)
    assert other.onnx_path != encoders["onnx"].onnx_path
    ref = TextEncoder(str(tiny_bert_dir_b), device="cpu").encode(TEXTS)
    assert cosines(other.encode(TEXTS), ref).min() > 0.9999


def test_corrupt_cached_export_is_made_again(tiny_bert_dir, tmp_path, encoders) -> None:
    first = TextEncoder(str(tiny_bert_dir), device="cpu", backend="onnx-int8", onnx_cache_dir=tmp_path)
    expected = first.encode(TEXTS)
    assert first.onnx_path is not None
    first.onnx_path.write_bytes(b"not an onnx model")
    second = TextEncoder(str(tiny_bert_dir), device="cpu", backend="onnx-int8", onnx_cache_dir=tmp_path)
    forget_recent_vectors()  # the rebuilt export must encode, not the memory of the first one
    np.testing.assert_allclose(second.encode(TEXTS), expected, atol=1e-6)


def test_export_that_disagrees_with_torch_is_refused(tiny_bert_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(onnx_backend, "_EXPORT_MIN_COSINE", 1.01)  # no export can pass this
    with pytest.raises(OnnxExportError, match="disagrees with torch"):
        TextEncoder(str(tiny_bert_dir), device="cpu", backend="onnx", onnx_cache_dir=tmp_path)
    assert not list(tmp_path.rglob("*.onnx")) and not list(tmp_path.rglob("*.tmp"))


def test_missing_onnxruntime_is_a_named_error(tiny_bert_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails
    for backend in ("onnx", "onnx-int8"):
        with pytest.raises(OnnxRuntimeMissingError, match="pip install onnxruntime") as err:
            TextEncoder(str(tiny_bert_dir), device="cpu", backend=backend, onnx_cache_dir=tmp_path)
        assert "encoder_backend: torch" in str(err.value)
    assert TextEncoder(str(tiny_bert_dir), device="cpu", backend="torch").backend == "torch"


def test_bad_backend_and_device(tiny_bert_dir, tmp_path) -> None:
    with pytest.raises(ValueError, match="torch, onnx, onnx-int8"):
        TextEncoder(str(tiny_bert_dir), device="cpu", backend="tensorrt")
    with pytest.raises(ValueError, match="onnx-int8 runs on the CPU"):
        TextEncoder(str(tiny_bert_dir), device="cuda", backend="onnx-int8", onnx_cache_dir=tmp_path)
    assert not list(tmp_path.rglob("*.onnx")), "a bad device is refused before any export"


def test_onnx_encoder_pickles_and_follows_torch_threads(encoders) -> None:
    enc = encoders["onnx-int8"]
    copy = pickle.loads(pickle.dumps(enc))  # e.g. sent to a Dask worker: sessions are reopened there
    vectors = copy.encode(TEXTS)
    forget_recent_vectors()  # both encoders run their own sessions
    np.testing.assert_array_equal(vectors, enc.encode(TEXTS))
    forget_recent_vectors()
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        enc.encode(TEXTS[:2])
    finally:
        torch.set_num_threads(previous)
    assert {1, 2} <= set(enc._onnx._sessions)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["onnx", "onnx-int8"])
def test_packaged_minilm_backends_agree_with_torch(backend: str, tmp_path: Path) -> None:
    docs = [
        "Star Wars (1977). Genres: Action, Adventure, Sci-Fi.",
        "Toy Story (1995). Genres: Animation, Children's, Comedy.",
        "Fargo (1996). Genres: Crime, Drama, Thriller.",
    ]
    ref = TextEncoder(device="cpu").encode(docs)
    enc = TextEncoder(device="cpu", backend=backend, onnx_cache_dir=tmp_path)
    assert enc.dim == 384
    got = enc.encode(docs)
    # measured on 500 ML-100k item texts: fp32 ONNX 1.0000, int8 0.984 at worst
    assert cosines(got, ref).min() > (0.9999 if backend == "onnx" else 0.97)
    query = enc.encode_one("space opera with rebels and an empire")
    assert np.argmax(got @ query) == 0
