"""Shared test fixtures.

Tests never touch the network: the hub clients are put in offline mode before anything imports them,
and model fixtures are tiny random models written to temporary folders.
"""

from __future__ import annotations

import os

# Must be set before huggingface_hub / transformers are imported (they read these at import time).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# Enough real words for the toy tasks in the tests plus single letters/word pieces, so that any
# lowercase ASCII text tokenizes to something other than [UNK].
_TINY_WORDS = """
the a an of and in to is it with for on at by from as or not this that movie film story year genres
genre action comedy drama romance thriller horror animation children sci fi fantasy adventure war
crime mystery musical western documentary noir space opera star wars toy fargo alien love night day
man woman old young user watched recently released red blue green cat dog car ship ocean king queen
""".split()
_LETTERS = list("abcdefghijklmnopqrstuvwxyz0123456789")
_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_PUNCT = list(".,;:!?()'-/&")


def _write_tiny_bert(folder: Path, seed: int = 0) -> Path:
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = _SPECIAL + _PUNCT + _LETTERS + ["##" + c for c in _LETTERS] + _TINY_WORDS
    vocab = list(dict.fromkeys(vocab))
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    # transformers 5: BertTokenizerFast(vocab_file=...) silently ignores the file (5-token vocab);
    # the argument is now `vocab`.
    tokenizer = BertTokenizerFast(vocab=str(vocab_file), model_max_length=128)
    assert len(tokenizer) == len(vocab), "tiny tokenizer did not pick up its vocab"
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with a tiny random BERT (hidden 32, 2 layers) + its WordPiece tokenizer, loadable offline.

    Session-scoped and shared: tests must not write into it (copy it, or use ``tiny_bert_dir_b``).
    """
    return _write_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), seed=0)


@pytest.fixture(scope="session")
def tiny_bert_dir_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second tiny BERT with different weights (seed 1), i.e. a "different model"."""
    return _write_tiny_bert(tmp_path_factory.mktemp("tiny_bert_b"), seed=1)


@pytest.fixture(scope="session")
def shop_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic shop (80 customers, string ids, datetimes): read-only, shared by the tests."""
    from llm_rerank_plugin.data.synthetic import generate_shop

    folder = tmp_path_factory.mktemp("shop")
    generate_shop(folder, scale=0.04, seed=3)
    return folder
