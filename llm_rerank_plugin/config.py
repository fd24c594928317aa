"""The platform config: one YAML file describes a whole pipeline, validated on load.

Every bad key or value is reported with its dotted path, the value given and what was expected.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class ConfigError(ValueError):
    """The config file is unreadable or invalid; the message lists every problem found."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    name: str = "ml-100k"
    path: str | None = Field(None, description="local copy of the data set (folder or zip)")
    cache_dir: str | None = None
    allow_network: bool = True


class PreprocessConfig(_Strict):
    user_features: list[str] = ["age", "gender", "occupation"]
    item_features: list[str] = ["year"]
    text_columns: list[str] = ["title", "genres"]


class RetrievalConfig(_Strict):
    model: Literal["als", "bpr", "popularity"] = "als"
    k: int = Field(100, gt=0, le=10_000)
    factors: int = Field(64, gt=0)
    iterations: int = Field(15, gt=0)
    regularization: float = Field(0.05, ge=0)
    alpha: float = Field(1.0, gt=0)
    learning_rate: float = Field(0.01, gt=0)


class PluginsConfig(_Strict):
    enabled: list[str] | None = Field(None, description="plugin names to load; null loads all installed")
    disabled: list[str] = []


class TemplatesConfig(_Strict):
    item: str = "{title} ({year}). Genres: {genres}."
    user_profile: str = "A {age}-year-old {gender} {occupation}."
    history_prefix: str = " Recently watched: "
    max_history: int = Field(20, gt=0, le=200)


class TrainConfig(_Strict):
    loss: Literal["softmax", "bpr"] = "softmax"
    epochs: int = Field(30, gt=0)
    batch_size: int = Field(128, gt=0)
    lr: float = Field(1e-3, gt=0)
    feature_lr: float = Field(
        0.05, gt=0, description="learning rate of the first phase (fusion weights only)"
    )
    weight_decay: float = Field(1e-4, ge=0)
    patience: int = Field(4, ge=1)
    max_minutes: float | None = Field(10.0, gt=0)
    holdout: int = Field(
        3, ge=1, le=20, description="last training events per user held out of the retrieval fit"
    )
    valid_train_fraction: float = Field(
        0.5, ge=0, lt=1, description="share of validation users whose lists also train (the rest early-stop)"
    )


class CrossConfig(_Strict):
    enabled: bool = True
    model: str | None = None
    top_m: int = Field(20, gt=1, description="the cross-encoder reorders this many of the bilinear top")
    max_steps: int | None = Field(300, gt=0)
    max_minutes: float | None = Field(6.0, gt=0)
    max_length: int = Field(128, ge=16, le=512)
    train_users: int = Field(400, gt=0, description="users whose held-out events fine-tune it")
    negatives: int = Field(7, gt=0)
    lr: float = Field(1e-4, gt=0)

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
    step_positive: float = Field(0.35, gt=0, le=1)
    step_negative: float = Field(0.35, gt=0, le=1)
    decay: float = Field(0.9, gt=0, le=1)
    max_norm: float = Field(1.0, gt=0)
    aspect_step: float = Field(0.25, gt=0, le=1)
    aspect_bias_bound: float = Field(1.0, gt=0)
    text_step: float = Field(0.5, gt=0, le=1)
    weight: float = Field(1.0, ge=0, description="weight of the direct feedback term in the final score")


class LLMRerankConfig(_Strict):
    """The ``llm_rerank`` stage's section."""

    enabled: bool = True
    model: str | None = Field(None, description="HF model id or local path; null = packaged all-MiniLM-L6-v2")
    allow_download: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    scorer: Literal["bilinear", "cross"] = "bilinear"
    aspects: dict[str, str | None] = Field(
        default_factory=lambda: {
            "overall": None,
            "title": "{title}",
            "genres": "{genres}",
            "era": "released in {year}",
        },
        description="aspect name -> item text template it is tied to (null = the whole item text)",
    )
    aspect_mode: Literal["max", "softmax"] = "max"
    rank: int = Field(32, gt=0, le=1024)
    top_k: int = Field(10, gt=0)
    max_length: int = Field(
        64, ge=16, le=512, description="tokens per text; bounds the cold-user encode on the request path"
    )
    batch_size: int = Field(64, gt=0)
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


STAGE_NAMES = ("popularity", "retrieval", "rerank-zeroshot", "rerank-bilinear", "rerank-cross")


class EvaluationConfig(_Strict):
    stages: list[Literal["popularity", "retrieval", "rerank-zeroshot", "rerank-bilinear", "rerank-cross"]] = [
        "popularity",
        "retrieval",
    ]
    cutoffs: list[int] = [10, 20, 50, 100]
    bench_requests: int = Field(300, gt=0)
    stream_events: int = Field(10, gt=0, description="later interactions per user replayed by stream-eval")


class PipelineConfig(_Strict):
    """A whole pipeline: data, NVTabular preprocessing, retrieval, plugins and stage sections."""

    output_dir: str = "."
    seed: int = 0
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
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
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
