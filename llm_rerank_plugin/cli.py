"""The ``llm-rerank`` command line."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from llm_rerank_plugin.config import ConfigError, PipelineConfig, load_config

app = typer.Typer(
    help="LLM reranking stage for NVIDIA Merlin pipelines: fit, recommend, evaluate, serve, benchmark.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(width=None if sys.stdout.isatty() else 160)
ConfigOption = Annotated[
    Path, typer.Option("--config", "-c", help="pipeline YAML (see examples/ and the README's Configuration)")
]
OutputOption = Annotated[Path | None, typer.Option("--output-dir", "-o", help="overrides output_dir")]
DebugOption = Annotated[bool, typer.Option("--debug", help="show the full traceback of an error")]


@app.callback()
def _root() -> None:
    """LLM reranking stage for NVIDIA Merlin pipelines.

    Every command reads one pipeline YAML (--config); results go to its output_dir. `fit` trains the whole
    chain into <output_dir>/model; `recommend`, `run`, `bench`, `export` and `serve` use that bundle.
    """


def _load(config: Path, output_dir: Path | None, seed: int | None = None) -> PipelineConfig:
    overrides: dict[str, object] = {"output_dir": str(output_dir)} if output_dir else {}
    if seed is not None:
        overrides["seed"] = seed
    try:
        cfg = load_config(config, overrides)
        _check_writable(cfg.output_path)
        return cfg
    except ConfigError as exc:
        console.print(f"[red]error:[/red] {exc}", markup=True, highlight=False)
        raise typer.Exit(2) from None


def _check_writable(folder: Path) -> None:
    """An unwritable output folder is a config error before any work, not a traceback deep in a writer."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise ConfigError(
            f"output_dir = {str(folder)!r} cannot be written ({exc.strerror or exc}); expected a folder this "
            "user can create and write"
        ) from None


@contextlib.contextmanager
def _errors(debug: bool) -> Iterator[None]:
    """Every failure is one clear line (exit 2 for config errors, 1 otherwise); --debug re-raises it."""
    try:
        yield
    except typer.Exit:
        raise
    except Exception as exc:
        if debug:
            raise
        code = 2 if isinstance(exc, ConfigError) else 1
        message = str(exc) or type(exc).__name__
        known = isinstance(exc, ValueError | RuntimeError | OSError | KeyError | ConfigError)
        prefix = "" if known else f"{type(exc).__name__}: "
        console.print(f"[red]error:[/red] {prefix}{message}", highlight=False)
        if not known:
            console.print("(run again with --debug for the traceback)", highlight=False)
        raise typer.Exit(code) from None


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
def fit(
    config: ConfigOption,
    output_dir: OutputOption = None,
    force: Annotated[bool, typer.Option("--force", help="replace an existing bundle")] = False,
    debug: DebugOption = False,
) -> None:
    """Train the whole chain (NVTabular, Merlin retrieval, reranker) on all the logs: <output_dir>/model."""
    from llm_rerank_plugin.pipeline import fit as fit_chain

    cfg = _load(config, output_dir)
    with _errors(debug):
        bundle = fit_chain(cfg, force=force)
    rows = bundle.manifest["data"]["rows"]
    train = bundle.manifest["training"].get("train", {})
    best = train.get("valid_ndcg@10_in_candidates", {}).get("full_scorer")
    console.print(
        f"fitted on {rows['interactions']:,} events of {rows['users']:,} users and {rows['items']:,} items "
        "in "
        f"{bundle.manifest['seconds']:.0f} s; validation NDCG@10 within candidates: {_cell(best)}"
    )
    console.print(f"wrote {bundle.path}")


@app.command()
def recommend(
    config: ConfigOption,
    output_dir: OutputOption = None,
    users: Annotated[
        Path | None, typer.Option(help="only these users: parquet/CSV with user_id, or one id per line")
    ] = None,
    k: Annotated[int | None, typer.Option(help="items per user (default stages.llm_rerank.top_k)")] = None,
    scheduler: Annotated[
        str | None,
        typer.Option(
            help="run on Dask: local:N (a LocalCluster of N worker processes) or a scheduler address"
        ),
    ] = None,
    partition_users: Annotated[
        int | None, typer.Option(help="users per Dask partition (a multiple of 2048; default 2048)")
    ] = None,
    debug: DebugOption = False,
) -> None:
    """Top-k for every user (or --users) from the fitted bundle, history excluded: recommendations.parquet
    (with --scheduler, a folder of parquet parts that pandas.read_parquet reads as one table)."""
    from llm_rerank_plugin.pipeline import Bundle, bundle_path
    from llm_rerank_plugin.pipeline.bundle import load_user_list

    cfg = _load(config, output_dir)
    target = cfg.output_path / "recommendations.parquet"
    with _errors(debug):
        if k is not None and k < 1:
            raise ConfigError(f"--k = {k}: expected a whole number >= 1")
        bundle = Bundle.load(bundle_path(cfg), cfg)
        chosen = bundle.users if users is None else load_user_list(users, bundle.user_id_kind)
        if scheduler is None:
            frame = bundle.recommend(chosen, k)
            if target.is_dir():
                shutil.rmtree(target)
            frame.to_parquet(target, index=False)
            rows = len(frame)
        else:
            from llm_rerank_plugin.pipeline.distributed import recommend_distributed

            rows = recommend_distributed(
                bundle, chosen, target, scheduler, k, partition_users=partition_users
            )["rows"]
    console.print(f"{len(chosen):,} users, {rows:,} rows; wrote {target}")


@app.command()
def evaluate(
    config: ConfigOption,
    output_dir: OutputOption = None,
    stage: Annotated[
        list[str] | None, typer.Option("--stage", "-s", help="only these stages (repeatable)")
    ] = None,
    cold: Annotated[
        bool | None,
        typer.Option(
            "--cold/--no-cold",
            help="the cold-start protocol too (default: when evaluation.cold_items or cold_users > 0)",
        ),
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="overrides seed (runs of several seeds: see `summarize`)")
    ] = None,
    debug: DebugOption = False,
) -> None:
    """Split by time, fit on the training part, rank the test users: results.json and rankings.parquet.
    With evaluation.cold_items / cold_users, also the cold-start protocol (results.json: cold)."""
    from llm_rerank_plugin.evaluation.evaluate import evaluate as run_evaluation

    cfg = _load(config, output_dir, seed)
    with _errors(debug):
        result = run_evaluation(cfg, stages=stage, cold=cold)
    console.print(metrics_table("Leave-last-out, full ranking (test users)", result.metrics, result.seconds))
    for pair, c in result.comparisons.items():
        console.print(
            f"{pair}: NDCG@10 {c['mean_diff']:+.4f} per user, paired-bootstrap 95% CI "
            f"[{c['ci_low']:+.4f}, {c['ci_high']:+.4f}]",
            highlight=False,
        )
    if result.cold is not None:
        for table in cold_tables(result.cold):
            console.print(table)
    console.print(f"wrote {cfg.output_path / 'results.json'} and {cfg.output_path / 'rankings.parquet'}")


@app.command()
def summarize(
    runs: Annotated[
        list[Path], typer.Argument(help="evaluate output folders (results.json + rankings.parquet)")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="where to write the summary")] = Path(
        "summary.json"
    ),
    debug: DebugOption = False,
) -> None:
    """Several evaluate runs of one config (seeds): each stage's mean and spread, and every paired
    comparison per run and pooled over the runs: summary.json."""
    from llm_rerank_plugin.evaluation.summary import summarize_runs

    with _errors(debug):
        summary = summarize_runs(runs)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(summary, indent=2))
    for table in summary_tables(summary):
        console.print(table)
    for note in summary.get("notes", []):
        console.print(note, highlight=False)
    console.print(f"wrote {output}")


def _ci(c: dict) -> str:
    return f"{c['mean_diff']:+.4f} [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}]"


def summary_tables(summary: dict) -> list[Table]:
    """NDCG@10 and Recall@100 per stage and run with their mean and spread; each comparison per run and
    pooled over the runs."""
    seeds = [f"seed {s}" for s in summary["seeds"]]
    stages = Table(title=f"NDCG@10 (Recall@100) over {len(seeds)} runs, {summary['users']} test users")
    for name in ("stage", *seeds, "mean", "spread"):
        stages.add_column(name, justify="left" if name == "stage" else "right")
    for stage, metrics in summary["stages"].items():
        ndcg = metrics["ndcg@10"]
        runs = [f"{n:.4f}" for n in ndcg["runs"]]
        if "recall@100" in metrics:  # absent when evaluation.cutoffs leaves 100 out
            runs = [f"{n} ({r:.3f})" for n, r in zip(runs, metrics["recall@100"]["runs"], strict=True)]
        stages.add_row(stage, *runs, f"{ndcg['mean']:.4f}", f"{ndcg['spread']:.4f}")
    pairs = Table(title="NDCG@10 difference per user, paired-bootstrap 95% CI")
    for name in ("comparison", *seeds, "pooled over the runs"):
        pairs.add_column(name, justify="left" if name == "comparison" else "right")
    for pair, c in summary["comparisons"].items():
        pairs.add_row(pair, *(_ci(run) for run in c["runs"]), _ci(c["pooled"]))
    return [stages, pairs]


def _pair(m: dict) -> str:
    return f"{m['ndcg@10']:.4f} / {m['recall@10']:.4f}"


def cold_tables(cold: dict) -> list[Table]:
    """The cold-start protocol's NDCG@10 / Recall@10 per ranker (cold items) and per events known (users)."""
    tables = []
    items = cold.get("cold_items")
    if items:
        table = Table(
            title=f"Cold items: {items['items']} items never in any log, ranked for the {items['users']} "
            "users who had them"
        )
        for column in ("ranker", "ndcg@10", "recall@10"):
            table.add_column(column, justify="left" if column == "ranker" else "right")
        for name, m in items["rankers"].items():
            table.add_row(name, f"{m['ndcg@10']:.4f}", f"{m['recall@10']:.4f}")
        tables.append(table)
    users = cold.get("cold_users")
    if users:
        table = Table(title=f"Cold users: {users['users']} users never in any log, NDCG@10 / Recall@10")
        table.add_column("events known", justify="right")
        rankers = list(dict.fromkeys(k for row in users["by_events"].values() for k, v in row.items()
                                     if isinstance(v, dict)))  # fmt: skip
        for name in rankers:
            table.add_column(name, justify="right")
        for n, row in users["by_events"].items():
            cells = [
                f"{row[r]['ndcg@10']:.4f} / {row[r]['recall@10']:.4f}" if r in row else "" for r in rankers
            ]
            table.add_row(f"{n} ({row['users']} users)", *cells)
        tables.append(table)
    return tables


@app.command()
def run(
    config: ConfigOption,
    output_dir: OutputOption = None,
    users: Annotated[Path | None, typer.Option(help="only these users (as for recommend)")] = None,
    debug: DebugOption = False,
) -> None:
    """Serve every user (or --users) through the plugin manager from the fitted bundle, as a platform does:
    recommendations.parquet (top-k with explanations) and run.json."""
    from llm_rerank_plugin.pipeline import Bundle, bundle_path
    from llm_rerank_plugin.pipeline.bundle import load_user_list
    from llm_rerank_plugin.platform.pipeline import run_pipeline

    cfg = _load(config, output_dir)
    with _errors(debug):
        bundle = Bundle.load(bundle_path(cfg), cfg)
        chosen = None if users is None else load_user_list(users, bundle.user_id_kind)
        summary = run_pipeline(cfg, users=chosen, bundle=bundle)
    console.print(
        f"plugins: {', '.join(summary['plugins']) or '(none)'}; final stage: {summary['final_stage']}; "
        f"{summary['users']:,} users, {summary['rows']:,} rows"
    )
    console.print(f"wrote {cfg.output_path / 'recommendations.parquet'} and {cfg.output_path / 'run.json'}")


@app.command()
def bench(
    config: ConfigOption,
    output_dir: OutputOption = None,
    requests: Annotated[int | None, typer.Option(help="requests per row (default from config)")] = None,
    threads: Annotated[int, typer.Option(help="torch threads while timing (a serving worker uses 1)")] = 1,
    triton: Annotated[
        bool, typer.Option(help="also time recommend through a real Triton server (1 and N instances)")
    ] = True,
    instances: Annotated[int, typer.Option(help="N for the triton rows")] = 2,
    executor: ExecutorOption = "merlin",
    debug: DebugOption = False,
) -> None:
    """Latency of one rerank request (100 candidates): warm, cold (per encoder backend), cross-encoder,
    Merlin graph, and a whole recommend request through Triton; bench.json."""
    import json

    from llm_rerank_plugin.evaluation.bench import load_trained_bundle, run_bench

    cfg = _load(config, output_dir)
    with _errors(debug):
        _check_executor(executor)
        bundle = load_trained_bundle(cfg)
        result = run_bench(cfg, bundle=bundle, n_requests=requests, threads=threads)
        if triton:
            from llm_rerank_plugin.serve.bench import bench_triton

            counts = sorted({1, max(1, instances)})
            rows = bench_triton(
                bundle.path,
                bundle.users[:50],
                requests or cfg.evaluation.bench_requests,
                counts,
                executor=executor,
            )
            for row in rows:
                result[f"triton_{row['instances']}"] = {**row, "requests": row["n_requests"]}
            (cfg.output_path / "bench.json").write_text(json.dumps(result, indent=2, default=str))
    table = Table(title="One rerank request, 100 candidates, one process")
    for column in ("path", "p50_ms", "p99_ms", "mean_ms", "requests_per_s", "requests"):
        table.add_column(column, justify="right" if column != "path" else "left")
    for name, row in result.items():
        if isinstance(row, dict) and "p50_ms" in row:
            table.add_row(
                name,
                *(
                    f"{row[c]:.3f}" if isinstance(row.get(c), float) else str(row.get(c, ""))
                    for c in ("p50_ms", "p99_ms", "mean_ms", "requests_per_s", "requests")
                ),
            )
    console.print(table)
    console.print(f"wrote {cfg.output_path / 'bench.json'}")


@app.command("stream-eval")
def stream_eval(
    config: ConfigOption,
    output_dir: OutputOption = None,
    events: Annotated[int | None, typer.Option(help="later events replayed per user")] = None,
    debug: DebugOption = False,
) -> None:
    """Replay each user's latest events in time order, feedback fusion on vs. off; stream.json."""
    from llm_rerank_plugin.evaluation.streaming import run_stream_eval

    cfg = _load(config, output_dir)
    with _errors(debug):
        result = run_stream_eval(cfg, n_events=events)
    arms = {k: v for k, v in result.items() if isinstance(v, dict) and "ndcg@10" in v}
    console.print(metrics_table("Online replay (NDCG@10 before each event)", arms))
    console.print(f"feedback on vs off (NDCG@10): {_gain(result['relative_gain'])}")
    console.print(f"wrote {cfg.output_path / 'stream.json'}")


ExecutorOption = Annotated[
    str,
    typer.Option(
        help="merlin (merlin-systems' executor model) or direct (the same operators in one process)"
    ),
]


def _fitted_bundle_path(cfg: PipelineConfig) -> Path:
    """The config's bundle folder, checked against the config (a missing or other bundle is an error)."""
    from llm_rerank_plugin.pipeline import bundle_path
    from llm_rerank_plugin.pipeline.bundle import read_manifest

    read_manifest(bundle_path(cfg), cfg)  # export and serve load the models themselves
    return bundle_path(cfg)


def _check_executor(executor: str, instances: int | None = None) -> None:
    if executor not in ("merlin", "direct"):
        raise ConfigError(f"--executor {executor!r}: expected merlin or direct")
    if instances is not None and instances < 1:
        raise ConfigError(f"--instances = {instances}: expected >= 1")


@app.command()
def export(
    config: ConfigOption,
    to: Annotated[Path, typer.Option("--to", help="folder for the Triton model repository")],
    output_dir: OutputOption = None,
    instances: Annotated[int, typer.Option(help="instances (processes) per model")] = 1,
    executor: ExecutorOption = "merlin",
    force: Annotated[bool, typer.Option("--force", help="replace an existing repository")] = False,
    debug: DebugOption = False,
) -> None:
    """Write a Triton model repository of the fitted chain: `recommend` and `feedback` models."""
    from llm_rerank_plugin.feedback.online import default_store_path
    from llm_rerank_plugin.serve.export import export_ensemble

    cfg = _load(config, output_dir)
    with _errors(debug):
        _check_executor(executor, instances)
        repo = export_ensemble(
            _fitted_bundle_path(cfg),
            to,
            store_path=default_store_path(cfg),
            instances=instances,
            overwrite=force,
            executor=executor,
        )
    console.print(f"wrote {repo}")


@app.command()
def serve(
    config: ConfigOption,
    output_dir: OutputOption = None,
    http_port: Annotated[int, typer.Option(help="HTTP port")] = 8000,
    grpc_port: Annotated[int, typer.Option(help="gRPC port")] = 8001,
    instances: Annotated[int, typer.Option(help="instances (processes) per model")] = 1,
    host: Annotated[str, typer.Option(help="address to listen on (0.0.0.0: every interface)")] = "127.0.0.1",
    executor: ExecutorOption = "merlin",
    debug: DebugOption = False,
) -> None:
    """Run the real Triton server on the fitted bundle in the foreground (exported to
    <output_dir>/triton_repo when missing or stale); Ctrl-C or SIGTERM stops it cleanly."""
    from llm_rerank_plugin.feedback.online import default_store_path
    from llm_rerank_plugin.serve.serving import serve as run_server

    cfg = _load(config, output_dir)
    with _errors(debug):
        _check_executor(executor, instances)
        code = run_server(
            _fitted_bundle_path(cfg),
            http_port,
            grpc_port,
            instances,
            host=host,
            repo_dir=cfg.output_path / "triton_repo",
            store_path=default_store_path(cfg),
            executor=executor,
            announce=lambda line: console.print(line, highlight=False),
        )
    raise typer.Exit(code)


@app.command()
def encode(
    config: ConfigOption,
    output_dir: OutputOption = None,
    scheduler: Annotated[
        str, typer.Option(help="Dask: local:N (a LocalCluster of N worker processes) or a scheduler address")
    ] = "local:2",
    chunk_size: Annotated[
        int | None, typer.Option(help="texts per task and part file (default: ~4 chunks per worker)")
    ] = None,
    debug: DebugOption = False,
) -> None:
    """Encode the catalogue texts the vector cache (<data.cache_dir>/item-vectors) lacks, on Dask workers,
    so that `fit` finds every item vector cached."""
    from llm_rerank_plugin.pipeline.encode import encode_catalogue

    cfg = _load(config, output_dir)
    with _errors(debug):
        s = encode_catalogue(cfg, scheduler, chunk_size)
    console.print(
        f"{s['items']:,} items, {s['texts']:,} texts: {s['encoded']:,} encoded in {s['chunks']:,} chunks on "
        f"{s['workers']} workers ({s['distinct_texts_encoded']:,} distinct), {s['already_cached']:,} already "
        f"cached; {s['seconds']:.1f} s",
        highlight=False,
    )


@app.command("scale-bench")
def scale_bench(
    config: ConfigOption,
    output_dir: OutputOption = None,
    factors: Annotated[
        str, typer.Option(help="data sizes as multiples of the shop's unit, e.g. 1,10,100")
    ] = "1,10",
    workers: Annotated[str, typer.Option(help="Dask worker counts for recommend, e.g. 1,2")] = "1,2",
    debug: DebugOption = False,
) -> None:
    """Fit time, encoding speed, recommend throughput and peak memory per data size: scale.json."""
    from llm_rerank_plugin.evaluation.scale import run_scale_bench

    cfg = _load(config, output_dir)
    with _errors(debug):
        try:
            sizes = [float(f) for f in factors.split(",")]
            counts = [int(w) for w in workers.split(",")]
        except ValueError:
            raise ConfigError(
                f"--factors {factors!r} / --workers {workers!r}: expected comma-separated numbers"
            ) from None
        result = run_scale_bench(cfg, sizes, counts)
    table = Table(title="Cost by data size (synthetic shop)")
    for column in ("factor", "users", "items", "interactions", "fit_s", "encode/s", "recommend/s", "peak MB"):
        table.add_column(column, justify="right")
    for row in result["rows"]:
        rates = ", ".join(f"{w}w {r:,.0f}" for w, r in row["recommend_users_per_s"].items())
        table.add_row(
            f"{row['factor']:g}", f"{row['users']:,}", f"{row['items']:,}", f"{row['interactions']:,}",
            f"{row['fit_seconds']:.0f}", f"{row['encode_items_per_s']:.0f}", rates,
            f"{row['peak_rss_mb']:.0f}",
        )  # fmt: skip
    console.print(table)
    console.print(f"wrote {cfg.output_path / 'scale.json'}")


@app.command("generate-shop")
def generate_shop(
    to: Annotated[Path, typer.Option("--to", help="folder for interactions/items/users.parquet")],
    scale: Annotated[float, typer.Option(help="multiplies users, items and events")] = 1.0,
    seed: Annotated[int, typer.Option(help="random seed (same seed, same files)")] = 0,
    debug: DebugOption = False,
) -> None:
    """Write the deterministic synthetic shop that examples/shop.yaml reads (not movies)."""
    from llm_rerank_plugin.data.synthetic import generate_shop as generate

    with _errors(debug):
        counts = generate(to, scale=scale, seed=seed)
    console.print(f"wrote {to}: " + ", ".join(f"{v:,} {k}" for k, v in counts.items() if isinstance(v, int)))


def main() -> None:  # pragma: no cover - console entry
    logging.basicConfig(level=logging.WARNING)
    sys.exit(app())
