from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llm_rerank_plugin.rerank.encoder import (
    ItemVectorCache,
    ModelNotFoundError,
    TextEncoder,
    default_model_path,
    resolve_model,
)

TEXTS = [
    "star wars",
    "a toy story of a cat and a dog and a very long night at sea with a king and a queen",
    "fargo",
    "",
    "love in the time of war, a drama with romance and crime",
    "space opera",
    "star wars",
]


pytestmark = pytest.mark.usefixtures("encode_afresh")


@pytest.fixture(scope="module")
def encoder(tiny_bert_dir: Path) -> TextEncoder:
    # batch_size 2 so that TEXTS spans several length-sorted batches
    return TextEncoder(str(tiny_bert_dir), device="cpu", batch_size=2, max_length=32)


class CountingEncoder:
    """Wraps a TextEncoder and records what it was asked to encode."""

    def __init__(self, inner: TextEncoder) -> None:
        self.inner = inner
        self.calls: list[list[str]] = []

    @property
    def dim(self) -> int:
        return self.inner.dim

    @property
    def model_id(self) -> str:
        return self.inner.model_id

    @property
    def vector_key(self) -> str:
        return self.inner.vector_key

    def encode(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        return self.inner.encode(texts)


def test_encode_shape_dtype_unit_norm(encoder: TextEncoder) -> None:
    vecs = encoder.encode(TEXTS)
    assert vecs.shape == (len(TEXTS), encoder.dim) == (len(TEXTS), 32)
    assert vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)


def test_encode_restores_input_order(encoder: TextEncoder) -> None:
    batched = encoder.encode(TEXTS)
    one_by_one = np.stack([encoder.encode_one(t) for t in TEXTS])
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)
    reversed_ = encoder.encode(TEXTS[::-1])
    np.testing.assert_allclose(reversed_[::-1], batched, atol=1e-5)


def test_same_text_same_vector(encoder: TextEncoder) -> None:
    vecs = encoder.encode(TEXTS)
    np.testing.assert_allclose(vecs[0], vecs[-1], atol=1e-6)
    assert not np.allclose(vecs[0], vecs[2])


def test_a_text_encoded_once_is_reused_by_encoders_with_the_same_vectors(tiny_bert_dir: Path) -> None:
    first = TextEncoder(str(tiny_bert_dir), device="cpu", max_length=32, show_progress=False)
    vectors = first.encode(TEXTS)
    again = TextEncoder(str(tiny_bert_dir), device="cpu", max_length=32, show_progress=False)
    shorter = TextEncoder(str(tiny_bert_dir), device="cpu", max_length=4, show_progress=False)
    embedded: list[list[str]] = []
    for enc in (again, shorter):
        embed = enc._embed
        enc._embed = lambda batch, embed=embed: embedded.append(list(batch)) or embed(batch)  # type: ignore[method-assign]
    np.testing.assert_array_equal(again.encode(TEXTS[::-1]), vectors[::-1])
    assert embedded == []
    # Another truncation length gives other vectors: encoded, each distinct text once.
    short = shorter.encode(TEXTS)
    assert sorted(t for batch in embedded for t in batch) == sorted(set(TEXTS))
    assert not np.allclose(short[1], vectors[1])


def test_encode_empty_and_bad_input(encoder: TextEncoder) -> None:
    assert encoder.encode([]).shape == (0, encoder.dim)
    assert encoder.encode_one("fargo").shape == (encoder.dim,)
    with pytest.raises(TypeError, match="single str"):
        encoder.encode("fargo")
    with pytest.raises(TypeError, match="index 1"):
        encoder.encode(["fargo", None])  # type: ignore[list-item]


def test_encode_truncates_long_texts(encoder: TextEncoder) -> None:
    long_text = " ".join(["star wars"] * 200)
    assert encoder.encode([long_text]).shape == (1, encoder.dim)


def test_model_id_stable_and_distinct(
    encoder: TextEncoder, tiny_bert_dir: Path, tiny_bert_dir_b: Path
) -> None:
    again = TextEncoder(str(tiny_bert_dir), device="cpu")
    other = TextEncoder(str(tiny_bert_dir_b), device="cpu")
    assert again.model_id == encoder.model_id
    assert other.model_id != encoder.model_id
    assert str(tiny_bert_dir.resolve()) in encoder.model_id


def test_missing_local_path_raises_model_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError) as err:
        TextEncoder(str(missing))
    msg = str(err.value)
    assert str(missing) in msg and "allow_download" in msg


def test_missing_hub_id_raises_without_download() -> None:
    name = "nonexistent-org-llm-rerank/definitely-not-a-model"
    with pytest.raises(ModelNotFoundError) as err:
        TextEncoder(name)
    msg = str(err.value)
    assert name in msg and "allow_download: true" in msg and "cache" in msg


def test_folder_without_config_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="config.json"):
        resolve_model(tmp_path)


def test_cache_second_call_all_hits(encoder: TextEncoder, tmp_path: Path) -> None:
    counting = CountingEncoder(encoder)
    cache = ItemVectorCache(tmp_path, counting)  # type: ignore[arg-type]
    keys = [f"item{i}" for i in range(5)]
    texts = TEXTS[:5]
    first = cache.get(keys, texts)
    assert (cache.stats.hits, cache.stats.misses) == (0, 5)
    np.testing.assert_allclose(first, encoder.encode(texts), atol=1e-6)

    second = cache.get(keys, texts)
    assert (cache.stats.hits, cache.stats.misses) == (5, 0)
    assert len(counting.calls) == 1
    np.testing.assert_array_equal(first, second)

    # a fresh cache object reads the file back from disk
    reopened = ItemVectorCache(tmp_path, counting)  # type: ignore[arg-type]
    np.testing.assert_array_equal(reopened.get(keys[::-1], texts[::-1]), first[::-1])
    assert reopened.stats.misses == 0 and len(counting.calls) == 1


def test_cache_changed_text_reencodes_only_that_item(encoder: TextEncoder, tmp_path: Path) -> None:
    counting = CountingEncoder(encoder)
    cache = ItemVectorCache(tmp_path, counting)  # type: ignore[arg-type]
    keys = [1, 2, 3]
    cache.get(keys, ["star wars", "fargo", "alien"])
    out = cache.get(keys + [4], ["star wars", "fargo (1996)", "alien", "space opera"])
    assert (cache.stats.hits, cache.stats.misses) == (2, 2)
    assert counting.calls[-1] == ["fargo (1996)", "space opera"]
    np.testing.assert_allclose(out[1], encoder.encode_one("fargo (1996)"), atol=1e-6)
    cache.get([2], ["fargo (1996)"])
    assert (cache.stats.hits, cache.stats.misses) == (1, 0)
    assert not list(tmp_path.glob("*.tmp")), "temp files must not be left behind"


def test_cache_other_model_uses_separate_file(
    encoder: TextEncoder, tiny_bert_dir_b: Path, tmp_path: Path
) -> None:
    cache_a = ItemVectorCache(tmp_path, encoder)
    cache_a.get(["x"], ["star wars"])
    other = TextEncoder(str(tiny_bert_dir_b), device="cpu")
    cache_b = ItemVectorCache(tmp_path, other)
    assert cache_b.path != cache_a.path
    vec_b = cache_b.get(["x"], ["star wars"])
    assert cache_b.stats.misses == 1
    assert len(list(tmp_path.glob("*.npz"))) == 2
    np.testing.assert_allclose(vec_b[0], other.encode_one("star wars"), atol=1e-6)


def test_cache_input_validation(encoder: TextEncoder, tmp_path: Path) -> None:
    cache = ItemVectorCache(tmp_path, encoder)
    with pytest.raises(ValueError, match="same length"):
        cache.get(["a", "b"], ["x"])
    with pytest.raises(ValueError, match="different texts"):
        cache.get(["a", "a"], ["x", "y"])
    assert cache.get([], []).shape == (0, encoder.dim)


def test_cache_ignores_corrupt_file(encoder: TextEncoder, tmp_path: Path) -> None:
    cache = ItemVectorCache(tmp_path, encoder)
    cache.path.parent.mkdir(parents=True, exist_ok=True)
    cache.path.write_bytes(b"not an npz")
    assert cache.get(["a"], ["fargo"]).shape == (1, encoder.dim)
    assert cache.stats.misses == 1


@pytest.mark.slow
def test_packaged_minilm_semantics() -> None:
    enc = TextEncoder(default_model_path(), device="cpu")
    assert enc.dim == 384
    query = enc.encode_one("space opera")
    docs = enc.encode(
        [
            "Star Wars (1977). Genres: Action, Sci-Fi.",
            "Toy Story (1995). Genres: Animation, Children's, Comedy.",
        ]
    )
    assert docs.shape == (2, 384)
    sims = docs @ query
    assert sims[0] > sims[1]


def test_cache_is_keyed_by_truncation_length(tiny_bert_dir, tmp_path) -> None:
    long_text = " ".join(["space opera"] * 40)
    short = TextEncoder(str(tiny_bert_dir), device="cpu", max_length=16, show_progress=False)
    full = TextEncoder(str(tiny_bert_dir), device="cpu", max_length=128, show_progress=False)
    a = ItemVectorCache(tmp_path, short).get(["x"], [long_text])
    cache = ItemVectorCache(tmp_path, full)
    b = cache.get(["x"], [long_text])
    assert cache.stats.misses == 1  # not served the vector of the truncated text
    np.testing.assert_allclose(b, full.encode([long_text]), rtol=1e-5, atol=1e-6)
    assert not np.allclose(a, b)


class FailingEncoder(CountingEncoder):
    """Raises on its ``fail_on``-th encode call, like a process killed halfway through a catalogue."""

    def __init__(self, inner: TextEncoder, fail_on: int) -> None:
        super().__init__(inner)
        self.fail_on = fail_on

    def encode(self, texts: list[str]) -> np.ndarray:
        if len(self.calls) + 1 == self.fail_on:
            self.calls.append(list(texts))
            raise RuntimeError("killed while encoding")
        return super().encode(texts)


def test_interrupted_encoding_resumes_with_only_the_missing_texts(encoder, tmp_path) -> None:
    keys = [f"item{i}" for i in range(7)]
    failing = FailingEncoder(encoder, fail_on=3)
    cache = ItemVectorCache(tmp_path, failing, chunk_size=2)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="killed"):
        cache.get(keys, TEXTS)
    assert [len(c) for c in failing.calls] == [2, 2, 2]
    assert len(list(tmp_path.glob("*.part-*.npz"))) == 2, "each finished chunk is on disk"

    counting = CountingEncoder(encoder)
    resumed = ItemVectorCache(tmp_path, counting, chunk_size=2)  # type: ignore[arg-type]
    out = resumed.get(keys, TEXTS)
    # item6 shares item0's text, so the first chunk already stored it: only the chunk in flight is left
    assert counting.calls == [TEXTS[4:6]], "only the chunk in flight and the rest"
    assert (resumed.stats.hits, resumed.stats.misses) == (5, 2)
    np.testing.assert_allclose(out, encoder.encode(TEXTS), atol=1e-5)
    assert not list(tmp_path.glob("*.part-*")) and not list(tmp_path.glob("*.tmp"))
    assert resumed.path.is_file()

    again = ItemVectorCache(tmp_path, counting, chunk_size=2)  # type: ignore[arg-type]
    np.testing.assert_array_equal(again.get(keys, TEXTS), out)
    assert again.stats.misses == 0 and len(counting.calls) == 1


def test_parts_of_a_crashed_run_are_folded_in_without_encoding(encoder, tmp_path) -> None:
    keys = [f"item{i}" for i in range(6)]
    failing = FailingEncoder(encoder, fail_on=3)
    with pytest.raises(RuntimeError):
        ItemVectorCache(tmp_path, failing, chunk_size=2).get(keys, TEXTS[:6])  # type: ignore[arg-type]
    counting = CountingEncoder(encoder)
    cache = ItemVectorCache(tmp_path, counting)  # type: ignore[arg-type]
    assert len(cache) == 4
    out = cache.get(keys[:4], TEXTS[:4])
    assert counting.calls == [] and cache.stats.hits == 4
    np.testing.assert_allclose(out, encoder.encode(TEXTS[:4]), atol=1e-5)
    assert not list(tmp_path.glob("*.part-*")), "folded into the main file"
    assert len(ItemVectorCache(tmp_path, counting)) == 4  # type: ignore[arg-type]


def test_chunks_and_progress(encoder, tmp_path) -> None:
    counting = CountingEncoder(encoder)
    cache = ItemVectorCache(tmp_path, counting, chunk_size=3, show_progress=True)  # type: ignore[arg-type]
    keys = [f"k{i}" for i in range(7)]
    out = cache.get(keys, TEXTS)
    assert [len(c) for c in counting.calls] == [3, 3]  # 6 distinct texts (k6 has k0's)
    np.testing.assert_allclose(out, encoder.encode(TEXTS), atol=1e-5)
    # a text changed in a later chunk overwrites its row, and the rest stay cached
    changed = TEXTS[:6] + ["a brand new text"]
    out2 = cache.get(keys, changed)
    assert counting.calls[-1] == ["a brand new text"] and cache.stats.misses == 1
    np.testing.assert_allclose(out2[:6], out[:6], atol=0)
    with pytest.raises(ValueError, match="chunk_size"):
        ItemVectorCache(tmp_path, encoder, chunk_size=0)


def test_encoder_returning_a_wrong_shape_is_an_error(encoder, tmp_path) -> None:
    class Broken(CountingEncoder):
        def encode(self, texts: list[str]) -> np.ndarray:
            return np.zeros((len(texts) + 1, self.dim), np.float32)

    with pytest.raises(ValueError, match="expected \\(2, 32\\)"):
        ItemVectorCache(tmp_path, Broken(encoder)).get(["a", "b"], ["x", "y"])  # type: ignore[arg-type]


def test_cache_encodes_a_text_shared_by_many_items_once(encoder: TextEncoder, tmp_path: Path) -> None:
    counting = CountingEncoder(encoder)
    cache = ItemVectorCache(tmp_path, counting, chunk_size=2)  # type: ignore[arg-type]
    keys = [f"item{i}" for i in range(7)]
    texts = ["Acme", "Globex", "Acme", "Initech", "Acme", "Globex", "Umbrella"]
    vectors = cache.get(keys, texts)
    assert sorted(t for call in counting.calls for t in call) == ["Acme", "Globex", "Initech", "Umbrella"]
    assert cache.stats.misses == 7
    np.testing.assert_allclose(vectors, encoder.encode(texts), atol=1e-6)
    assert np.array_equal(vectors[0], vectors[2]) and np.array_equal(vectors[0], vectors[4])
    reopened = ItemVectorCache(tmp_path, counting)  # type: ignore[arg-type]
    np.testing.assert_array_equal(reopened.get(keys, texts), vectors)
    assert reopened.stats.misses == 0
