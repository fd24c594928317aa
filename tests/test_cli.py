"""The command line as a user meets it: required config, one-line errors, --debug."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llm_rerank_plugin.cli import app

runner = CliRunner()


def test_an_empty_config_file_is_an_error(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    result = runner.invoke(app, ["fit", "--config", str(empty)])
    assert result.exit_code == 2
    assert "is empty" in result.output and "output_dir" in result.output
    assert not (tmp_path / "model").exists()


def test_config_is_required(tmp_path):
    result = runner.invoke(app, ["recommend"])
    assert result.exit_code == 2 and "--config" in result.output


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_unwritable_output_dir_is_one_line_not_a_traceback(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    config = tmp_path / "c.yaml"
    config.write_text(f"output_dir: {locked / 'out'}\n")
    result = runner.invoke(app, ["fit", "--config", str(config)])
    assert result.exit_code == 2
    assert "output_dir" in result.output and "cannot be written" in result.output
    assert "Traceback" not in result.output


def test_an_output_dir_that_is_a_file_is_one_line(tmp_path):
    # Runs as root too: nobody can make a folder below a regular file.
    blocker = tmp_path / "file"
    blocker.write_text("x")
    config = tmp_path / "c.yaml"
    config.write_text(f"output_dir: {blocker / 'out'}\n")
    result = runner.invoke(app, ["evaluate", "--config", str(config)])
    assert result.exit_code == 2
    assert "cannot be written" in result.output and "Traceback" not in result.output


def test_a_missing_bundle_is_one_line_and_debug_shows_the_traceback(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"output_dir: {tmp_path / 'out'}\n")
    result = runner.invoke(app, ["recommend", "--config", str(config)])
    assert result.exit_code == 1
    assert "llm-rerank fit" in result.output and "Traceback" not in result.output
    debug = runner.invoke(app, ["recommend", "--config", str(config), "--debug"])
    assert debug.exit_code != 0 and debug.exception is not None
    assert type(debug.exception).__name__ == "BundleError"


def test_renamed_data_key_names_the_new_one(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"output_dir: {tmp_path}\ndata:\n  name: ml-100k\n")
    result = runner.invoke(app, ["fit", "--config", str(config)])
    assert result.exit_code == 2 and "data.source" in result.output


def test_bad_scale_bench_sizes_are_one_line(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"output_dir: {tmp_path / 'out'}\n")
    result = runner.invoke(app, ["scale-bench", "--config", str(config), "--factors", "1,ten"])
    assert result.exit_code == 2 and "--factors" in result.output
    result = runner.invoke(app, ["scale-bench", "--config", str(config), "--factors", "0,1"])
    assert result.exit_code == 1 and "positive" in result.output


@pytest.mark.parametrize("command", [["export", "--to", "repo"], ["serve"]])
def test_bad_serving_options_are_one_line_before_any_work(tmp_path, command):
    config = tmp_path / "c.yaml"
    config.write_text(f"output_dir: {tmp_path / 'out'}\n")
    result = runner.invoke(app, [*command, "--config", str(config), "--instances", "0"])
    assert result.exit_code == 2 and "--instances = 0: expected >= 1" in result.output
    result = runner.invoke(app, [*command, "--config", str(config), "--executor", "fast"])
    assert result.exit_code == 2 and "--executor 'fast': expected merlin or direct" in result.output


def test_a_negative_seed_is_refused_by_name(tmp_path):
    config = Path(__file__).parents[1] / "examples" / "ml100k.yaml"
    out = tmp_path / "o"
    args = ["evaluate", "--config", str(config), "--seed", "-1", "--output-dir", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "seed = -1" in result.output
    assert "greater than or equal to 0" in result.output and not (out / "results.json").exists()
