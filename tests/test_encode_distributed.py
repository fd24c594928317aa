"""Catalogue encoding on Dask workers into the vector cache that fit reads (tiny shop, tiny BERT)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from llm_rerank_plugin.cli import app
from llm_rerank_plugin.config import ConfigError, load_config
from llm_rerank_plugin.data import load_data
from llm_rerank_plugin.pipeline.encode import catalogue_texts, encode_catalogue
from llm_rerank_plugin.pipeline.train import build_encoder, build_reranker
from llm_rerank_plugin.rerank.encoder import ItemVectorCache, TextEncoder
from tests.test_lifecycle import shop_config

KINDS = ("item", "aspect-name", "aspect-category")


@pytest.fixture(scope="module")
def cluster():
    """One LocalCluster of 2 worker processes for the module, reached by address (the non-local branch)."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as c:
        yield c


def _config(tmp_path, data_dir, model_dir, cache="cache", **data_overrides):
    raw = shop_config(tmp_path, data_dir, model_dir)
    raw["data"]["cache_dir"] = str(tmp_path / cache)
    raw["data"].update(data_overrides)
    path = tmp_path / f"config-{cache}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, load_config(path)


@pytest.fixture
def count_encoded(monkeypatch):
    """Counts the texts any TextEncoder in this process encodes."""
    seen = []
    original = TextEncoder.encode

    def counting(self, texts, show_progress=None):
        seen.append(len(texts))
        return original(self, texts, show_progress=show_progress)

    monkeypatch.setattr(TextEncoder, "encode", counting)
    return seen


def test_spread_vectors_equal_one_process_and_fit_then_encodes_nothing(
    shop_dir, tiny_bert_dir, tmp_path, single_torch_thread, count_encoded, cluster
):
    _, config = _config(tmp_path, shop_dir, tiny_bert_dir)
    summary = encode_catalogue(config, cluster.scheduler_address, chunk_size=16, progress=False)
    n = summary["items"]
    assert n == 60 and summary["texts"] == summary["encoded"] == 3 * n
    assert summary["already_cached"] == 0 and summary["workers"] == 2
    # Items sharing a text (the category aspect) cost one encode; chunks are cut from the distinct texts.
    _, texts = catalogue_texts(load_data(config.data).items, config.llm_rerank())
    distinct = [len(set(t)) for t in texts.values()]
    assert summary["distinct_texts_encoded"] == sum(distinct) < 3 * n
    assert summary["chunks"] == sum(-(-d // 16) for d in distinct)
    assert count_encoded == []  # the driver encoded nothing: the workers did it all
    root = tmp_path / "cache" / "item-vectors"
    for kind in KINDS:
        assert not list((root / kind).glob("*.part-*")), "parts are folded into the main file"
        assert len(list((root / kind).glob("vectors-*.npz"))) == 1

    data, cfg = load_data(config.data), config.llm_rerank()
    spread = build_reranker(data, cfg, root).items  # what fit does with this config
    assert count_encoded == []
    local = build_reranker(data, cfg, tmp_path / "one-process").items
    assert sum(count_encoded) == sum(distinct)
    np.testing.assert_allclose(spread.vectors, local.vectors, atol=1e-5)
    np.testing.assert_allclose(spread.field_vectors, local.field_vectors, atol=1e-5)


def test_a_second_run_encodes_nothing(shop_dir, tiny_bert_dir, tmp_path, cluster):
    path, config = _config(tmp_path, shop_dir, tiny_bert_dir)
    first = encode_catalogue(config, cluster.scheduler_address, progress=False)
    assert first["encoded"] == 180 and first["chunks"] >= 3  # one chunk at least per kind
    result = CliRunner().invoke(
        app, ["encode", "--config", str(path), "--scheduler", cluster.scheduler_address]
    )
    assert result.exit_code == 0, result.output
    assert "60 items, 180 texts: 0 encoded in 0 chunks on 0 workers (0 distinct), 180 already cached" in (
        result.output
    )


def test_resume_encodes_only_what_is_missing(shop_dir, tiny_bert_dir, tmp_path, cluster):
    items = pd.read_parquet(shop_dir / "items.parquet")
    subset = tmp_path / "subset-items.parquet"
    items.iloc[:25].to_parquet(subset)
    _, partial = _config(tmp_path, shop_dir, tiny_bert_dir, items=str(subset))
    first = encode_catalogue(partial, cluster.scheduler_address, chunk_size=8, progress=False)
    assert first["items"] == 25 and first["encoded"] == 75

    # What a crashed run leaves: a finished part of 5 more items' whole texts, never folded in.
    _, config = _config(tmp_path, shop_dir, tiny_bert_dir)
    keys, texts = catalogue_texts(load_data(config.data).items, config.llm_rerank())
    encoder = build_encoder(config.llm_rerank())
    crashed = ItemVectorCache(tmp_path / "cache" / "item-vectors" / "item", encoder)
    crashed.write_part(keys[25:30], texts["item"][25:30], encoder.encode(texts["item"][25:30]))
    assert len(list(crashed.cache_dir.glob("*.part-*"))) == 1

    full = encode_catalogue(config, cluster.scheduler_address, chunk_size=8, progress=False)
    assert full["already_cached"] == 75 + 5
    assert full["encoded"] == 180 - 80
    assert not list(crashed.cache_dir.glob("*.part-*"))
    for kind in KINDS:
        cache = ItemVectorCache(tmp_path / "cache" / "item-vectors" / kind, encoder)
        assert cache.missing(keys, texts[kind]) == []


def test_changed_text_is_re_encoded(shop_dir, tiny_bert_dir, tmp_path, cluster):
    _, config = _config(tmp_path, shop_dir, tiny_bert_dir)
    assert encode_catalogue(config, cluster.scheduler_address, progress=False)["encoded"] == 180
    items = pd.read_parquet(shop_dir / "items.parquet")
    items.loc[0, "name"] = "A renamed product"
    changed = tmp_path / "changed-items.parquet"
    items.to_parquet(changed)
    _, config = _config(tmp_path, shop_dir, tiny_bert_dir, items=str(changed))
    # The name is in the whole-item text and the name aspect, not the category one.
    assert encode_catalogue(config, cluster.scheduler_address, progress=False)["encoded"] == 2


def test_no_cache_dir_is_a_config_error(shop_dir, tiny_bert_dir, tmp_path):
    raw = shop_config(tmp_path, shop_dir, tiny_bert_dir)
    del raw["data"]["cache_dir"]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"data\.cache_dir"):
        encode_catalogue(load_config(path), "local:2", progress=False)
    result = CliRunner().invoke(app, ["encode", "--config", str(path)])
    assert result.exit_code == 2 and "data.cache_dir" in result.output
