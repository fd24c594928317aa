"""The ``llm-rerank`` command line."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from llm_rerank_plugin.config import ConfigError, PipelineConfig, load_config

app = typer.Typer(
    help="LLM reranking stage for NVIDIA Merlin pipelines: evaluate, run, benchmark.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(width=None if sys.stdout.isatty() else 160)
ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="pipeline YAML (see examples/ml100k.yaml)")
]
OutputOption = Annotated[Path | None, typer.Option("--output-dir", "-o", help="overrides output_dir")]


@app.callback()
def _root() -> None:
    """LLM reranking stage for NVIDIA Merlin pipelines.

    Every command reads one pipeline YAML (--config); results go to its output_dir.
    """


def _load(config: Path | None, output_dir: Path | None) -> PipelineConfig:
    overrides = {"output_dir": str(output_dir)} if output_dir else None
    try:
        return load_config(config, overrides)
    except ConfigError as exc:
        console.print(f"[red]error:[/red] {exc}", markup=True, highlight=False)
        raise typer.Exit(2) from None


def _fail(exc: Exception) -> None:
    console.print(f"[red]error:[/red] {exc}", highlight=False)
    raise typer.Exit(1) from None


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else str(value)


def _gain(value: float | None) -> str:
    return "n/a (feedback off scored 0)" if value is None else f"{value:+.1%}"


def metrics_table(
    title: str, metrics: dict[str, dict[str, float]], seconds: dict[str, float] | None = None
) -> Table:
    """One row per stage, one column per metric."""
    table = Table(title=title)
    names = [k for k in next(iter(metrics.values())) if k != "users"]
    table.add_column("stage")
    for name in names:
        table.add_column(name, justify="right")
    with_users = any("users" in values for values in metrics.values())
    if with_users:
        table.add_column("users", justify="right")
    if seconds:
        table.add_column("seconds", justify="right")
    for stage, values in metrics.items():
        row = [stage, *(_cell(values.get(n)) for n in names)]
        if with_users:
            row.append(str(values.get("users", "")))
        if seconds:
            row.append(f"{seconds.get(stage, 0.0):.1f}")
        table.add_row(*row)
    return table


@app.command()
def evaluate(
    config: ConfigOption = None,
    output_dir: OutputOption = None,
    stage: Annotated[
        list[str] | None, typer.Option("--stage", "-s", help="only these stages (repeatable)")
    ] = None,
) -> None:
    """Evaluate every configured stage on the test split; write results.json and rankings.parquet."""
    from llm_rerank_plugin.evaluation.evaluate import evaluate as run_evaluation

    cfg = _load(config, output_dir)
    try:
        result = run_evaluation(cfg, stages=stage)
    except (ValueError, RuntimeError, OSError) as exc:
        _fail(exc)
    console.print(metrics_table("Leave-last-out, full ranking (test users)", result.metrics, result.seconds))
    console.print(f"wrote {cfg.output_path / 'results.json'} and {cfg.output_path / 'rankings.parquet'}")


@app.command()
def run(config: ConfigOption = None, output_dir: OutputOption = None) -> None:
    """Run the whole pipeline from the config through the plugin manager; write recommendations.parquet
    (top-k per test user with explanations) and run.json."""
    from llm_rerank_plugin.platform.pipeline import run_pipeline

    cfg = _load(config, output_dir)
    try:
        summary = run_pipeline(cfg)
    except ConfigError as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None
    except (ValueError, RuntimeError, OSError) as exc:
        _fail(exc)
    console.print(
        f"plugins: {', '.join(summary['plugins']) or '(none)'}; final stage: {summary['final_stage']}"
    )
    console.print(metrics_table("Test users: retrieval vs. final stage", summary["metrics"]))
    console.print(f"wrote {cfg.output_path / 'recommendations.parquet'} and {cfg.output_path / 'run.json'}")


@app.command()
def bench(
    config: ConfigOption = None,
    output_dir: OutputOption = None,
    requests: Annotated[int | None, typer.Option(help="requests per row (default from config)")] = None,
    threads: Annotated[int, typer.Option(help="torch threads while timing (a serving worker uses 1)")] = 1,
) -> None:
    """Latency of one rerank request (100 candidates): warm, cold, cross-encoder, Merlin graph; bench.json."""
    from llm_rerank_plugin.evaluation.bench import run_bench

    cfg = _load(config, output_dir)
    try:
        result = run_bench(cfg, n_requests=requests, threads=threads)
    except (ValueError, RuntimeError, OSError) as exc:
        _fail(exc)
    table = Table(title="One rerank request, 100 candidates, one process")
    for column in ("path", "p50_ms", "p99_ms", "mean_ms", "requests_per_s", "requests"):
        table.add_column(column, justify="right" if column != "path" else "left")
    for name, row in result.items():
        if isinstance(row, dict) and "p50_ms" in row:
            table.add_row(
                name,
                *(
                    f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c])
                    for c in ("p50_ms", "p99_ms", "mean_ms", "requests_per_s", "requests")
                ),
            )
    console.print(table)
    console.print(f"wrote {cfg.output_path / 'bench.json'}")


@app.command("stream-eval")
def stream_eval(
    config: ConfigOption = None,
    output_dir: OutputOption = None,
    events: Annotated[int | None, typer.Option(help="later events replayed per user")] = None,
) -> None:
    """Replay each user's latest events in time order, feedback fusion on vs. off; stream.json."""
    from llm_rerank_plugin.evaluation.streaming import run_stream_eval

    cfg = _load(config, output_dir)
    try:
        result = run_stream_eval(cfg, n_events=events)
    except (ValueError, RuntimeError, OSError) as exc:
        _fail(exc)
    arms = {k: v for k, v in result.items() if isinstance(v, dict) and "ndcg@10" in v}
    console.print(metrics_table("Online replay (NDCG@10 before each event)", arms))
    console.print(f"feedback on vs off (NDCG@10): {_gain(result['relative_gain'])}")
    console.print(f"wrote {cfg.output_path / 'stream.json'}")


def main() -> None:  # pragma: no cover - console entry
    logging.basicConfig(level=logging.WARNING)
    sys.exit(app())
