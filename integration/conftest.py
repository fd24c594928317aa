"""The integration harness shares the unit tests' offline setup and tiny-model fixtures."""

from tests.conftest import tiny_bert_dir, tiny_bert_dir_b  # noqa: F401  (fixtures, by name)
