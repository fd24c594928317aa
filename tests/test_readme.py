"""The README's Python blocks run as written, in order, in one namespace, on a small shop it describes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

README = Path(__file__).parents[1] / "README.md"
EXAMPLES = Path(__file__).parents[1] / "examples"
# Blocks that need a running server are exercised by the integration harness instead.
NEEDS_SERVER = "tritonclient"


def python_blocks() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    return [b for b in blocks if NEEDS_SERVER not in b]


def test_readme_has_python_examples():
    assert len(python_blocks()) >= 3


def test_readme_python_blocks_run_as_written(tmp_path, monkeypatch, tiny_bert_dir, single_torch_thread):
    from llm_rerank_plugin.config import load_config
    from llm_rerank_plugin.data.synthetic import generate_shop
    from llm_rerank_plugin.pipeline import fit

    monkeypatch.chdir(tmp_path)
    generate_shop("out/shop-data", scale=0.1, seed=0)
    raw = yaml.safe_load((EXAMPLES / "shop.yaml").read_text())
    # The example config as written, with a tiny encoder and a short training budget.
    raw["stages"]["llm_rerank"].update(model=str(tiny_bert_dir), rank=4)
    raw["stages"]["llm_rerank"]["train"].update(epochs=1, max_minutes=1)
    raw["retrieval"].update(k=20, factors=8, iterations=3)
    raw["data"]["cache_dir"] = str(tmp_path / "cache")
    Path("shop.yaml").write_text(yaml.safe_dump(raw))
    fit(load_config("shop.yaml"))
    namespace: dict = {}
    for i, block in enumerate(python_blocks()):
        try:
            exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
        except Exception as exc:  # pragma: no cover - the message is the point
            pytest.fail(f"README python block {i + 1} failed: {type(exc).__name__}: {exc}\n{block}")
    assert len(namespace["top10"]) == 3 * 10
