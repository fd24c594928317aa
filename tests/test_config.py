"""Platform config: typed validation, every bad key or value named with what was expected."""

from __future__ import annotations

import pytest

from llm_rerank_plugin.config import ConfigError, load_config


def write(tmp_path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_example_config_loads():
    config = load_config("examples/ml100k.yaml")
    assert config.retrieval.model == "als" and config.retrieval.k == 100
    assert list(config.llm_rerank().aspects) == ["overall", "title", "genres", "era"]


def test_every_problem_is_reported_with_key_value_and_expectation(tmp_path):
    path = write(
        tmp_path,
        "retrieval:\n  k: 0\n  model: knn\nseed: x\nstages:\n  llm_rerank:\n    top_k: -1\n"
        "    templates:\n      max_histroy: 5\n",
    )
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "retrieval.k = 0: Input should be greater than 0" in message
    assert "retrieval.model = 'knn'" in message and "'als', 'bpr' or 'popularity'" in message
    assert "seed = 'x'" in message
    # The stage section is validated at load too, with its full dotted path.
    path = write(tmp_path, "stages:\n  llm_rerank:\n    top_k: -1\n    templates:\n      max_histroy: 5\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "stages.llm_rerank.top_k = -1" in str(err.value)
    assert "stages.llm_rerank.templates.max_histroy = 5: unknown key" in str(err.value)


def test_new_item_places_cannot_exceed_the_list(tmp_path):
    path = write(tmp_path, "stages:\n  llm_rerank:\n    top_k: 3\n    new_item_slots: 4\n")
    with pytest.raises(ConfigError, match="new_item_slots = 4 is more than the top_k = 3"):
        load_config(path)
    path = write(tmp_path, "stages:\n  llm_rerank:\n    new_item_slots: -1\n")
    with pytest.raises(ConfigError, match="stages.llm_rerank.new_item_slots = -1"):
        load_config(path)
    assert (
        load_config(write(tmp_path, "stages:\n  llm_rerank:\n    top_k: 1\n")).llm_rerank().new_item_slots
        == 1
    )


def test_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "a: [1, 2"))
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_cross_encoder_needs_a_budget(tmp_path):
    path = write(
        tmp_path, "stages:\n  llm_rerank:\n    cross:\n      max_steps: null\n      max_minutes: null\n"
    )
    with pytest.raises(ConfigError, match="fine-tuning budget"):
        load_config(path)


def test_readme_configuration_lists_every_key():
    from pathlib import Path

    from llm_rerank_plugin.config import config_keys

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme[readme.index("## Configuration") : readme.index("## Install")]
    missing = [key for key, _, _ in config_keys() if f"`{key}`" not in section]
    assert not missing, f"README Configuration lacks {missing}"


def test_empty_config_file_is_an_error(tmp_path):
    from llm_rerank_plugin.config import ConfigError, load_config

    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing but a comment\n")
    with pytest.raises(ConfigError, match="is empty"):
        load_config(empty)


def test_files_source_needs_its_paths_and_ml100k_refuses_them():
    from llm_rerank_plugin.config import ConfigError, DataConfig, parse_section

    with pytest.raises(ConfigError, match="data.interactions and data.items"):
        parse_section(DataConfig, {"source": "files"}, "data")
    with pytest.raises(ConfigError, match="only apply to source: files"):
        parse_section(DataConfig, {"source": "ml-100k", "items": "x.parquet"}, "data")
