"""The platform config: one YAML file describes a whole pipeline, validated on load.

Every bad key or value is reported with its dotted path, the value given and what was expected.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """The config file is unreadable or invalid; the message lists every problem found."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ColumnsConfig(_Strict):
    """Where the interaction file keeps each field (``source: files``); the names are the file's own."""

    user_id: str = Field("user_id", description="the user id column of the interactions")
    item_id: str = Field("item_id", description="the item id column of the interactions")
    timestamp: str = Field("timestamp", description="event time: epoch seconds or datetimes")
    rating: str | None = Field(None, description="optional; absent = every event counts as 1.0")


class DataConfig(_Strict):
    source: Literal["ml-100k", "files"] = Field(
        "ml-100k", description="ml-100k (the built-in loader) or files (your own interactions/items/users)"
    )
    path: str | None = Field(
        None, description="ml-100k only: a local copy (GroupLens folder or zip, RecBole)"
    )
    cache_dir: str | None = Field(None, description="parquet cache; default $LLM_RERANK_CACHE or ~/.cache")
    allow_network: bool = Field(True, description="ml-100k only: may fetch GroupLens / the recbole wheel")
    interactions: str | None = Field(None, description="files: parquet or CSV file, or a folder of parquet")
    items: str | None = Field(None, description="files: one row per item, the id and its text columns")
    users: str | None = Field(None, description="files, optional: one row per user, id and profile columns")
    columns: ColumnsConfig = ColumnsConfig()
    item_id_column: str | None = Field(None, description="files: items' id column (default: columns.item_id)")
    user_id_column: str | None = Field(None, description="files: users' id column (default: columns.user_id)")
    strict: bool = Field(
        False, description="files: interactions whose item is not in the catalogue are an error, not dropped"
    )

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, value: Any) -> Any:
        if isinstance(value, dict) and "name" in value:
            raise ValueError(f"data.name = {value['name']!r}: the key is now data.source (ml-100k or files)")
        return value

    @model_validator(mode="after")
    def _source_keys(self) -> DataConfig:
        file_keys = [k for k in ("interactions", "items", "users") if getattr(self, k) is not None]
        if self.source == "files":
            missing = [k for k in ("interactions", "items") if getattr(self, k) is None]
            if missing:
                raise ValueError(
                    f"source: files needs data.{' and data.'.join(missing)} (paths to parquet or CSV files)"
                )
            if self.path is not None:
                raise ValueError("data.path is for source: ml-100k; with source: files use data.interactions")
        elif file_keys:
            raise ValueError(
                f"data.{', data.'.join(file_keys)} only apply to source: files (source is {self.source!r})"
            )
        return self


class PreprocessConfig(_Strict):
    user_features: list[str] = Field(
        ["age", "gender", "occupation"], description="user columns NVTabular Categorifies and tags USER"
    )
    item_features: list[str] = Field(
        ["year"], description="item columns NVTabular Categorifies and tags ITEM"
    )
    text_columns: list[str] = Field(
        ["title", "genres"], description="item text columns carried through the workflow untouched"
    )


class SequentialConfig(_Strict):
    enabled: bool = Field(
        True, description="merge the retrieval model with an item-to-item sequential retriever"
    )
    weight: float | None = Field(
        None, ge=0, le=1, description="share of the sequential scores (null = chosen on validation in fit)"
    )
    window: int = Field(10, gt=0, description="items after (and before) an item that count as following it")
    decay: float = Field(0.8, gt=0, le=1, description="weight of an item d steps later: decay ** (d - 1)")
    backward: float = Field(0.5, ge=0, le=1, description="weight of the reverse order (earlier items)")
    recent: int = Field(5, gt=0, description="the user's newest items whose successors are scored")
    recent_decay: float = Field(0.7, gt=0, le=1, description="weight of the n-th newest item: decay ** n")
    popularity_exponent: float = Field(
        0.3, ge=0, le=1, description="successor counts divided by item popularity ** this"
    )


class TextItemsConfig(_Strict):
    enabled: bool | None = Field(
        None,
        description="items without events get an item factor predicted from their text (a ridge map fitted "
        "on items with events), so new items can be candidates; null = on for als / bpr, off for popularity",
    )
    min_interactions: int = Field(5, gt=0, description="events an item needs to train the text map on")
    share: float = Field(
        0.1,
        ge=0,
        le=1,
        description="share of the retrieval.k candidates kept for the best-scored items without events (at "
        "least one place when above 0; all of them when there are fewer); 0 = all compete on score alone",
    )

    def places(self, k: int) -> int:
        """Places of a k-long candidate list kept for items without events."""
        return 0 if self.share == 0 else max(1, int(self.share * k))


class RetrievalConfig(_Strict):
    model: Literal["als", "bpr", "popularity"] = Field(
        "als", description="Merlin candidate retrieval: als | bpr | popularity"
    )
    k: int = Field(100, gt=0, le=10_000, description="candidates per user that the reranker reorders")
    factors: int = Field(64, gt=0, description="latent factors (als, bpr)")
    iterations: int = Field(15, gt=0, description="training iterations (als, bpr)")
    regularization: float = Field(0.05, ge=0, description="L2 regularization (als, bpr)")
    alpha: float = Field(1.0, gt=0, description="confidence weight of an event (als)")
    learning_rate: float = Field(0.01, gt=0, description="learning rate (bpr)")
    sequential: SequentialConfig = SequentialConfig()
    text_items: TextItemsConfig = TextItemsConfig()

    @model_validator(mode="after")
    def _text_items_need_factors(self) -> RetrievalConfig:
        if self.text_items.enabled and self.model == "popularity":
            raise ValueError(
                "retrieval.text_items.enabled: true needs item factors to predict, which retrieval.model: "
                "popularity has none of; expected model als or bpr, or text_items.enabled false / null"
            )
        return self

    @property
    def uses_text_items(self) -> bool:
        """Whether fit gives items without events a factor predicted from their text."""
        enabled = self.text_items.enabled
        return self.model != "popularity" if enabled is None else enabled


class PluginsConfig(_Strict):
    enabled: list[str] | None = Field(None, description="plugin names to load; null loads all installed")
    disabled: list[str] = Field([], description="plugin names not to load, e.g. [llm_rerank]")


class TemplatesConfig(_Strict):
    item: str = Field(
        "{title} ({year}). Genres: {genres}.",
        description="an item's text; {column} names a column of the items file",
    )
    item_title: str = Field(
        "{title}", description="the short name of an item: in a user's history text and in 'because'"
    )
    user_profile: str = Field(
        "A {age}-year-old {gender} {occupation}.",
        description="a user's profile text; {column} names a column of the users file",
    )
    history_prefix: str = Field(
        " Recently watched: ", description="text between the profile and the recent item names"
    )
    max_history: int = Field(20, gt=0, le=200, description="recent items (newest first) in a user's text")


class TrainConfig(_Strict):
    loss: Literal["softmax", "bpr"] = Field("softmax", description="listwise softmax or pairwise bpr")
    epochs: int = Field(30, gt=0, description="most epochs of the second phase (full scorer)")
    batch_size: int = Field(128, gt=0, description="candidate lists per step")
    lr: float = Field(1e-3, gt=0, description="learning rate of the second phase")
    feature_lr: float = Field(
        0.05, gt=0, description="learning rate of the first phase (fusion weights only)"
    )
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay")
    patience: int = Field(4, ge=1, description="epochs without a better validation NDCG@10 before stopping")
    max_minutes: float | None = Field(10.0, gt=0, description="wall-clock budget of training (null = none)")
    holdout: int = Field(
        2, ge=1, le=20, description="last training events per user held out of the retrieval fit"
    )
    valid_train_fraction: float = Field(
        0.0, ge=0, lt=1, description="share of validation users whose lists also train (the rest early-stop)"
    )
    max_users: int | None = Field(
        None,
        gt=0,
        description="train the scorer on the lists of at most this many users (a seeded sample); null = all. "
        "Bounds fit time on large logs: retrieval still learns from every event",
    )


class CrossConfig(_Strict):
    enabled: bool = Field(False, description="fine-tune the cross-encoder in fit (minutes of CPU)")
    model: str | None = Field(None, description="cross-encoder model (null = stages.llm_rerank.model)")
    top_m: int = Field(20, gt=1, description="the cross-encoder reorders this many of the bilinear top")
    max_steps: int | None = Field(300, gt=0, description="fine-tuning steps at most")
    max_minutes: float | None = Field(6.0, gt=0, description="fine-tuning minutes at most")
    max_length: int = Field(128, ge=16, le=512, description="tokens per (user text, item text) pair")
    train_users: int = Field(400, gt=0, description="users whose held-out events fine-tune it")
    negatives: int = Field(7, gt=0, description="candidates per training list beside the target")
    lr: float = Field(1e-4, gt=0, description="fine-tuning learning rate")

    @field_validator("max_minutes")
    @classmethod
    def _some_budget(cls, value: float | None, info: Any) -> float | None:
        if value is None and info.data.get("max_steps") is None:
            raise ValueError("the cross-encoder needs a fine-tuning budget: set max_steps or max_minutes")
        return value


class FeedbackConfig(_Strict):
    store: str | None = Field(
        None, description="SQLite file for user state; default <output_dir>/feedback.sqlite"
    )
    step_positive: float = Field(
        0.35, gt=0, le=1, description="how far a like/click moves the user's state towards the item"
    )
    step_negative: float = Field(0.35, gt=0, le=1, description="how far a dislike/skip moves it away")
    decay: float = Field(0.9, gt=0, le=1, description="decay of older feedback at each new event")
    max_norm: float = Field(1.0, gt=0, description="bound on the feedback directions' norm")
    aspect_step: float = Field(0.25, gt=0, le=1, description="how far feedback moves the aspect-gate bias")
    aspect_bias_bound: float = Field(1.0, gt=0, description="bound on the aspect-gate bias")
    text_step: float = Field(0.5, gt=0, le=1, description="step of a text feedback phrase ('less horror')")
    weight: float = Field(1.0, ge=0, description="weight of the direct feedback term in the final score")


class LLMRerankConfig(_Strict):
    """The ``llm_rerank`` stage's section."""

    enabled: bool = Field(True, description="false removes the stage from the pipeline")
    model: str | None = Field(None, description="HF model id or local path; null = packaged all-MiniLM-L6-v2")
    allow_download: bool = Field(
        False, description="may load `model` from the Hugging Face hub (never in tests or CI)"
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto | cpu | cuda (fp16 on CUDA)")
    scorer: Literal["bilinear", "cross"] = Field(
        "bilinear",
        description="bilinear (real time) or cross (the fine-tuned cross-encoder reorders the top m)",
    )
    encoder_backend: Literal["torch", "onnx", "onnx-int8"] = Field(
        "torch", description="how texts are encoded: torch, or ONNX Runtime (fp32 / dynamic int8)"
    )
    max_text_chars: int = Field(
        2000, ge=16, le=1_000_000, description="longer request texts (feedback, item text) are cut to this"
    )
    aspects: dict[str, str | None] = Field(
        default_factory=lambda: {
            "overall": None,
            "title": "{title}",
            "genres": "{genres}",
            "era": "released in {year}",
        },
        description="aspect name -> item text template it is tied to (null = the whole item text)",
    )
    aspect_mode: Literal["max", "softmax"] = Field(
        "max", description="max (the winning aspect scores) or softmax (weighted sum)"
    )
    rank: int = Field(32, gt=0, le=1024, description="rank of each aspect matrix M_j = A_j B_j^T")
    top_k: int = Field(10, gt=0, description="items returned per user")
    new_item_slots: int = Field(
        1,
        ge=0,
        description="of the top_k, up to this many go to the best-scored candidates without any event in "
        "the logs (new items); 0 = ranked on score alone",
    )
    max_length: int = Field(
        64, ge=16, le=512, description="tokens per text; bounds the cold-user encode on the request path"
    )
    batch_size: int = Field(64, gt=0, description="texts per encoder batch")
    templates: TemplatesConfig = TemplatesConfig()
    train: TrainConfig = TrainConfig()
    cross: CrossConfig = CrossConfig()
    feedback: FeedbackConfig = FeedbackConfig()

    @field_validator("aspects")
    @classmethod
    def _aspects_not_empty(cls, value: dict[str, str | None]) -> dict[str, str | None]:
        if not value:
            raise ValueError("at least one aspect is needed, e.g. {overall: null}")
        return value

    @model_validator(mode="after")
    def _new_item_slots_fit(self) -> LLMRerankConfig:
        if self.new_item_slots > self.top_k:
            raise ValueError(
                f"new_item_slots = {self.new_item_slots} is more than the top_k = {self.top_k} items "
                "returned; expected at most top_k"
            )
        return self


StageName = Literal[
    "popularity",
    "retrieval",
    "candidates",
    "rerank-zeroshot",
    "rerank-notext",
    "rerank-bilinear",
    "rerank-cross",
]


class EvaluationConfig(_Strict):
    stages: list[StageName] = Field(
        ["popularity", "retrieval"], description="stages evaluate reports (rerank-cross needs cross.enabled)"
    )
    cutoffs: list[int] = Field([10, 20, 50, 100], description="Recall@k cutoffs")
    bench_requests: int = Field(300, gt=0, description="timed requests per bench row")
    stream_events: int = Field(10, gt=0, description="later interactions per user replayed by stream-eval")
    cold_items: float = Field(
        0.0, ge=0, lt=1, description="share of items held out of all logs: the cold-item protocol (0 = off)"
    )
    cold_users: float = Field(
        0.0, ge=0, lt=1, description="share of users held out of all logs: the cold-user protocol (0 = off)"
    )
    cold_min_interactions: int = Field(
        5, gt=0, description="cold items are drawn among items with at least this many events"
    )
    cold_user_events: list[int] = Field(
        [0, 1, 3], description="events a cold user has when ranked (their first n), one row each"
    )


class PipelineConfig(_Strict):
    """A whole pipeline: data, NVTabular preprocessing, retrieval, plugins and stage sections."""

    output_dir: str = Field(".", description="where bundles, results and recommendations are written")
    seed: int = Field(0, ge=0, description="seed of every random choice (retrieval, training, sampling)")
    data: DataConfig = DataConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    retrieval: RetrievalConfig = RetrievalConfig()
    plugins: PluginsConfig = PluginsConfig()
    stages: dict[str, dict[str, Any]] = Field(default_factory=dict)
    evaluation: EvaluationConfig = EvaluationConfig()

    @property
    def output_path(self) -> Path:
        return Path(self.output_dir)

    def llm_rerank(self) -> LLMRerankConfig:
        """The validated ``stages.llm_rerank`` section (defaults when absent)."""
        return parse_section(LLMRerankConfig, self.stages.get("llm_rerank", {}), "stages.llm_rerank")


def format_errors(exc: ValidationError, prefix: str = "") -> list[str]:
    """One line per problem: ``dotted.key = value: what was expected``."""
    lines = []
    for error in exc.errors():
        path = ".".join(str(p) for p in (prefix, *error["loc"]) if p != "")
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown key (check the spelling; see the README for the keys allowed here)"
        lines.append(f"{path or '<root>'} = {error.get('input')!r}: {message}")
    return lines


def parse_section(model: type[BaseModel], data: Any, prefix: str) -> Any:
    try:
        return model.model_validate(data if data is not None else {})
    except ValidationError as exc:
        raise ConfigError("invalid config:\n  " + "\n  ".join(format_errors(exc, prefix))) from None


def load_config(
    path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None
) -> PipelineConfig:
    """Read and validate a YAML pipeline config (None = all defaults). Relative paths in ``output_dir`` and
    ``data.path`` stay relative to the current folder, like every command-line path."""
    raw: Any = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path} cannot be read: {exc}") from None
        if raw is None:
            raise ConfigError(
                f"config file {path} is empty; expected at least output_dir and data "
                "(see examples/ml100k.yaml and the README's Configuration section)"
            )
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top, got {type(raw).__name__}")
    for key, value in (overrides or {}).items():
        raw[key] = value
    problems = []
    config = None
    try:
        config = parse_section(PipelineConfig, raw, "")
    except ConfigError as exc:
        problems.append(str(exc).removeprefix("invalid config:\n  "))
    section = raw.get("stages", {}).get("llm_rerank") if isinstance(raw.get("stages"), dict) else None
    if section is not None:
        try:  # the stage section is checked eagerly too, so one run reports every problem at load time
            parse_section(LLMRerankConfig, section, "stages.llm_rerank")
        except ConfigError as exc:
            problems.append(str(exc).removeprefix("invalid config:\n  "))
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
    return config


def config_keys() -> list[tuple[str, Any, str]]:
    """Every leaf key of a pipeline config as ``(dotted.key, default, description)``, the stage section
    under ``stages.llm_rerank``; the README's Configuration table is this list."""
    rows: list[tuple[str, Any, str]] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            key = f"{prefix}{name}"
            annotation = info.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, key + ".")
                continue
            if key == "stages":
                walk(LLMRerankConfig, "stages.llm_rerank.")
                continue
            default = info.get_default(call_default_factory=True)
            rows.append((key, default, info.description or ""))

    walk(PipelineConfig, "")
    return rows
