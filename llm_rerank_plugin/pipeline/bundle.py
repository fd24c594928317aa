"""``fit`` -> a bundle on disk -> ``recommend``: the lifecycle every command and serving path shares.

``fit`` trains the whole chain (NVTabular workflow, Merlin retrieval, the reranker) on all the logs it is
given and writes one folder, ``<output_dir>/model/``::

    manifest.json     package version, config, data source and fingerprint, row counts, training metrics
    workflow/         the fitted nvtabular.Workflow (ids -> Categorify codes)
    retriever/        the Merlin retrieval model (ALS/BPR through merlin.models.implicit), merged with the
                      sequential model when enabled; items without events carry text-predicted factors
    text-adapter/     the ridge map item text -> item factor (retrieval.text_items), for items added later
    popularity/       the popularity retriever: the candidates of users the retriever has never seen
    reranker/         the trained LLMReranker with its serving state (histories, profiles, item statistics)
    cross-encoder/    only with cross.enabled

``Bundle.load(path)`` gives all of it back; ``Bundle.recommend`` is what ``llm-rerank recommend``, the
evaluation, the platform stage and the Triton model all call.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from llm_rerank_plugin.config import ConfigError, PipelineConfig
from llm_rerank_plugin.data import InteractionData, load_data
from llm_rerank_plugin.data.split import with_sequence_position
from llm_rerank_plugin.pipeline.chain import Chain
from llm_rerank_plugin.pipeline.text_items import add_text_items, fit_item_text_adapter
from llm_rerank_plugin.pipeline.train import RerankerTrainer, host_frame, zeroshot_scores
from llm_rerank_plugin.preprocess.workflow import Preprocessor
from llm_rerank_plugin.rerank.reranker import LLMReranker, Ranking
from llm_rerank_plugin.retrieve.base import PAD_ITEM, Candidates, id_array
from llm_rerank_plugin.retrieve.retrievers import Retriever, load_retriever
from llm_rerank_plugin.retrieve.text_adapter import TextAdapter

BUNDLE_DIR = "model"
# Users ranked per batch: one batched text encoding each. Distributed runs partition users in multiples of
# it, so every user's text is encoded in the same batch as in one process and the outputs are identical.
RANK_CHUNK = 2048
RANK_METHODS = ("bilinear", "zeroshot", "retrieval", "notext")
MANIFEST = "manifest.json"
RECOMMENDATION_COLUMNS = (
    "user_id", "item_id", "rank", "score", "because", "aspect", "aspect_share", "retrieval_score"
)  # fmt: skip
# Settings a bundle is trained with: a config that differs in one of them cannot use the bundle.
MODEL_KEYS = ("model", "encoder_backend", "aspects", "templates", "rank", "aspect_mode", "max_length")


class BundleError(RuntimeError):
    """A bundle is missing, incomplete, or does not match the config it is used with."""


class BundleExistsError(BundleError):
    """``fit`` would overwrite an existing bundle (pass ``force=True`` / ``--force``)."""


def bundle_path(config: PipelineConfig) -> Path:
    return config.output_path / BUNDLE_DIR


def package_version() -> str:
    try:
        return importlib.metadata.version("llm-rerank-plugin")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


@dataclass
class Bundle:
    """A fitted chain: preprocessing, retrieval and the reranker, with what they were trained on."""

    path: Path
    config: PipelineConfig
    manifest: dict[str, Any]
    preprocessor: Preprocessor
    retriever: Retriever
    popularity: Retriever
    reranker: LLMReranker
    cross_encoder: Any = None
    notext_scorer: Any = None  # the no-text ablation's scorer, fitted only when asked (evaluation)
    text_adapter: TextAdapter | None = None  # item text -> retriever item factor (retrieval.text_items)
    _cold_candidates: dict[int, Candidates] = field(default_factory=dict, repr=False)
    _notext_projections: Any = field(default=None, repr=False)

    # ------------------------------------------------------------------ ids
    @property
    def item_id_kind(self) -> str:
        """``int`` or ``str``: the type of the catalogue's item ids (kept as given in every output)."""
        return self.manifest["ids"]["item"]

    @property
    def user_id_kind(self) -> str:
        return self.manifest["ids"]["user"]

    @property
    def users(self) -> list[Any]:
        """Every user with events in the logs the bundle was fitted on."""
        return list(self.reranker.histories)

    @property
    def retrieval_info(self) -> dict[str, Any]:
        """How the candidates were built: the sequential share and the validation recall it was chosen by."""
        return dict(self.manifest["training"].get("retrieval", {}))

    @property
    def zeroshot_weight(self) -> float:
        return float(self.manifest["training"]["zeroshot"]["weight"])

    # ------------------------------------------------------------------ serving
    def candidates(self, user_ids: Sequence[Any], k: int | None = None, merged: bool = True) -> Candidates:
        """Retrieval top-``k`` (default ``retrieval.k``) per user, items in the user's history excluded:
        the lists the reranker reorders (the retrieval model merged with the sequential one when enabled,
        a ``retrieval.text_items.share`` of the places kept for items without events; ``merged=False``:
        the retrieval model alone, as fitted: the baseline).

        A user with events since the fit (their reranker history, which feedback moves, holds items the
        retriever did not fit them on) is scored from their whole history instead of their fitted scores:
        ALS's factor folded in from every item, the successors of their newest items. Users the retriever
        never saw (new users) are the cold path: with events since, the same; without any item it knows,
        the most popular items."""
        k = int(k or self.config.retrieval.k)
        users = id_array(user_ids) if len(user_ids) else np.asarray(user_ids)
        retriever = self.retriever if merged else getattr(self.retriever, "base", self.retriever)
        # New items (no events, text-predicted factors) get their kept places in the served lists; the
        # baseline is the retrieval model as fitted, without them.
        places = (
            {"reserved_for_added": self.config.retrieval.text_items.places(k)}
            if merged
            else {"with_added": False}
        )
        known = np.fromiter((retriever.known_user(u) for u in users.tolist()), bool, len(users))
        item_ids = np.full((len(users), k), PAD_ITEM, dtype=retriever.item_map.id_dtype)
        scores = np.full((len(users), k), -np.inf, dtype=np.float32)
        histories = self.reranker.histories
        folded = np.zeros(len(users), bool)  # scored from a history rather than a fitted user
        from_history = []
        for i, user in enumerate(users.tolist()):
            history = histories.get(user, ())
            if known[i]:
                since = retriever.history_since_fit(user, history)
            else:
                since = list(history) if retriever.knows_any_item(history) else None
            if since is not None:
                folded[i] = True
                from_history.append(since)
        fitted = known & ~folded
        if fitted.any():
            found = retriever.recommend(users[fitted], k=k, **places)
            item_ids[fitted], scores[fitted] = found.item_ids, found.scores
        if folded.any():
            found = retriever.recommend_for_histories(users[folded], from_history, k=k, **places)
            item_ids[folded], scores[folded] = found.item_ids, found.scores
        cold = ~known & ~folded
        if cold.any():
            popular = self._cold(k)
            item_ids[cold], scores[cold] = popular.item_ids[0], popular.scores[0]
        return Candidates(users, item_ids, scores)

    def add_items(self, items: Any) -> int:
        """Add catalogue items to the loaded bundle (in memory; ``items`` has the items file's columns):
        their texts are encoded for the reranker and, with ``retrieval.text_items``, the retriever gets the
        factor each text predicts, so the items can be candidates from the next request on. Items the
        bundle knows are skipped; returns how many were added."""
        frame = host_frame(items)
        if "item_id" not in frame.columns:  # as the items file has them: its own id column
            from llm_rerank_plugin.data.files import item_id_column

            column = item_id_column(self.config.data)
            if column not in frame.columns:
                raise ValueError(
                    f"the items to add have no id column: expected {column!r} (data.item_id_column) or "
                    f"item_id, got columns {list(frame.columns)}"
                )
            frame = frame.rename(columns={column: "item_id"})
        cfg = self.config.llm_rerank()
        added = self.reranker.add_items(frame, cfg.templates.item, cfg.aspects)
        if self.text_adapter is not None:
            add_text_items(self.retriever, self.reranker.items, self.text_adapter)
        self._notext_projections = None
        return added

    def _cold(self, k: int) -> Candidates:
        if k not in self._cold_candidates:
            # The out-of-vocabulary user of the popularity model has no history: plain popularity.
            self._cold_candidates[k] = self.popularity.recommend(np.asarray([None], dtype=object), k=k)
        return self._cold_candidates[k]

    def rank(
        self,
        user_ids: Sequence[Any],
        k: int | None = None,
        *,
        method: str = "bilinear",
        chunk: int = RANK_CHUNK,
    ) -> list[Ranking]:
        """The reranked top ``k`` (default the stage's ``top_k``) of each user's candidates.

        ``method``: ``bilinear`` (the trained scorer), ``zeroshot`` (retrieval fused with text similarity,
        untrained), ``notext`` (the no-text ablation, when fitted) or ``retrieval`` (the candidates' own
        order). A user with no candidate left (every item in their history) gets an empty ranking."""
        if method not in RANK_METHODS:
            raise ValueError(f"unknown ranking method {method!r}; expected one of {RANK_METHODS}")
        if method == "notext" and self.notext_scorer is None:
            raise BundleError(
                f"the bundle at {self.path} has no no-text scorer (fit with variants=['notext'])"
            )
        k = int(k or self.config.llm_rerank().top_k)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        prime = method != "retrieval"
        return [
            self._rank_one(user, items, scores, k, method)
            for user, items, scores in self.candidate_lists(user_ids, chunk=chunk, prime=prime)
        ]

    def candidate_lists(
        self, user_ids: Sequence[Any], *, chunk: int = RANK_CHUNK, prime: bool = True
    ) -> Iterator[tuple[Any, np.ndarray, np.ndarray]]:
        """``(user, item_ids, retrieval_scores)`` per user, padding dropped, ``chunk`` users at a time; with
        ``prime``, each chunk's user texts are encoded in one batch first (and stay within the context
        cache however many users there are)."""
        users = id_array(user_ids) if len(user_ids) else np.asarray(user_ids)
        for start in range(0, len(users), chunk):
            part = users[start : start + chunk]
            candidates = self.candidates(part)
            if prime:
                self.reranker.prime(part.tolist())
            for user, items, scores in zip(
                part.tolist(), candidates.item_ids, candidates.scores, strict=True
            ):
                keep = items != PAD_ITEM
                yield user, items[keep], scores[keep]

    def _rank_one(self, user: Any, items: np.ndarray, scores: np.ndarray, k: int, method: str) -> Ranking:
        if len(items) == 0:  # the user has seen every item: nothing is left to recommend
            return Ranking(user, items, scores, scores, [], np.zeros(0, np.float32), [])
        if method == "bilinear":
            return self.reranker.rerank(user, items, scores, top_k=k)
        if method == "notext":
            return self._rank_without_text(user, items, scores, k)
        if method == "zeroshot":
            reranker = self.reranker
            context = reranker.context(user)
            rows = reranker.items.rows(items)
            fused = zeroshot_scores(reranker, context, rows, scores.astype(np.float32), self.zeroshot_weight)
            return _ranked_by(
                user, items, scores, fused, k, "overall", lambda o: reranker.because(context, rows[o])
            )
        return _ranked_by(user, items, scores, scores, k, "retrieval")  # the candidates' own order

    def _rank_without_text(self, user: Any, items: np.ndarray, scores: np.ndarray, k: int) -> Ranking:
        from llm_rerank_plugin.pipeline.train import TEXT_FEATURES

        reranker = self.reranker
        if self._notext_projections is None:
            table = reranker.items
            self._notext_projections = self.notext_scorer.precompute_items(
                np.zeros_like(table.field_vectors), np.zeros_like(table.vectors)
            )
        context = reranker.context(user)
        rows = reranker.items.rows(items)
        features = reranker.features(context, rows, scores.astype(np.float32))
        features[:, list(TEXT_FEATURES)] = 0.0
        zero = np.zeros_like(context.text_vector)
        fused, _, _ = self.notext_scorer.score_fast(zero, rows, self._notext_projections, features)
        return _ranked_by(user, items, scores, fused, k, "none")

    def recommend(
        self, user_ids: Sequence[Any] | None = None, k: int | None = None, *, chunk: int = RANK_CHUNK
    ) -> pd.DataFrame:
        """Top-``k`` per user (default: every user in the logs) as a frame with ``RECOMMENDATION_COLUMNS``;
        ids as given in the data."""
        users = self.users if user_ids is None else list(user_ids)
        return rankings_frame(self.rank(users, k, chunk=chunk))

    # ------------------------------------------------------------------ persistence
    @classmethod
    def load(cls, path: str | Path, config: PipelineConfig | None = None, device: str = "auto") -> Bundle:
        """Load a bundle written by ``fit``. With ``config``, check that its model settings match the
        bundle's (a bundle trained with another encoder or templates is refused by name, not used)."""
        path = Path(path)
        manifest = read_manifest(path, config)
        cfg = config or PipelineConfig.model_validate(manifest["config"])
        reranker = LLMReranker.load(
            path / "reranker", device=device if config is None else cfg.llm_rerank().device
        )
        reranker.new_item_slots = cfg.llm_rerank().new_item_slots
        notext = None
        if (path / "notext" / "scorer.pt").is_file():
            from llm_rerank_plugin.rerank.scorer import MultiAspectScorer

            notext = MultiAspectScorer.load(path / "notext" / "scorer.pt").eval()
        cross = None
        if (path / "cross-encoder").is_dir():
            from llm_rerank_plugin.rerank.cross import CrossEncoder

            cross = CrossEncoder.load(path / "cross-encoder", device=cfg.llm_rerank().device)
        return cls(
            path=path,
            config=cfg,
            manifest=manifest,
            preprocessor=Preprocessor.load(path / "workflow"),
            retriever=load_retriever(path / "retriever"),
            popularity=load_retriever(path / "popularity"),
            reranker=reranker,
            cross_encoder=cross,
            notext_scorer=notext,
            text_adapter=TextAdapter.load(adapter) if (adapter := path / "text-adapter").is_dir() else None,
        )


def read_manifest(path: str | Path, config: PipelineConfig | None = None) -> dict[str, Any]:
    """The manifest of the bundle at ``path``, checked against ``config`` when given (no model is loaded)."""
    path = Path(path)
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        raise BundleError(
            f"no fitted bundle at {path} (expected {MANIFEST} there); run `llm-rerank fit --config FILE` "
            "first"
        )
    manifest = json.loads(manifest_file.read_text())
    if config is not None:
        check_compatible(PipelineConfig.model_validate(manifest["config"]), config, path)
    return manifest


def check_compatible(saved: PipelineConfig, config: PipelineConfig, path: Path) -> None:
    """The config's model settings must be the ones the bundle was trained with."""
    a, b = saved.llm_rerank().model_dump(), config.llm_rerank().model_dump()
    pairs = [(key, a[key], b[key]) for key in MODEL_KEYS]
    pairs.append(("retrieval.model", saved.retrieval.model, config.retrieval.model))
    for section in ("sequential", "text_items"):
        # text_items.share only shapes the served lists: a bundle serves any value.
        was = getattr(saved.retrieval, section).model_dump(exclude={"share"})
        now = getattr(config.retrieval, section).model_dump(exclude={"share"})
        pairs += [(f"retrieval.{section}.{key}", was[key], now[key]) for key in was]
    differ = [f"{key}: bundle {was!r}, config {now!r}" for key, was, now in pairs if was != now]
    if differ:
        raise BundleError(
            f"the bundle at {path} was fitted with other settings than the config gives "
            f"({'; '.join(differ)}); run `llm-rerank fit --force` with this config, or restore the settings"
        )


def rankings_frame(rankings: Sequence[Ranking]) -> pd.DataFrame:
    """One row per (user, recommended item), ``RECOMMENDATION_COLUMNS``, users in the given order."""
    if not rankings:
        return pd.DataFrame({c: [] for c in RECOMMENDATION_COLUMNS})
    frame = pd.concat([r.to_frame() for r in rankings], ignore_index=True)
    return frame[list(RECOMMENDATION_COLUMNS)]


def _ranked_by(
    user: Any,
    items: np.ndarray,
    retrieval: np.ndarray,
    scores: np.ndarray,
    k: int,
    aspect: str,
    because: Callable[[np.ndarray], list[str | None]] | None = None,
) -> Ranking:
    """The top ``k`` of ``items`` by ``scores`` (stable), all credited to one ``aspect``."""
    order = np.argsort(-scores, kind="stable")[:k]
    n = len(order)
    reasons = because(order) if because is not None else [None] * n
    return Ranking(
        user, items[order], scores[order], retrieval[order], [aspect] * n, np.ones(n, np.float32), reasons
    )


def _id_kind(values: Any) -> str:
    return "int" if id_array(pd.unique(np.asarray(values))).dtype.kind == "i" else "str"


def fit(
    config: PipelineConfig,
    *,
    data: InteractionData | None = None,
    history: Any = None,
    path: str | Path | None = None,
    force: bool = False,
    extra_manifest: dict[str, Any] | None = None,
    variants: Sequence[str] = (),
) -> Bundle:
    """Train the whole chain on ``history`` (default: every interaction of the configured data) and write
    the bundle to ``path`` (default ``<output_dir>/model``). Refuses to overwrite a bundle unless
    ``force``. ``variants=["notext"]`` also trains the no-text ablation (for evaluation)."""
    unknown = sorted(set(variants) - {"notext"})
    if unknown:
        raise ValueError(f"unknown fit variants {unknown}; expected some of ['notext']")
    started = time.perf_counter()
    target = Path(path) if path is not None else bundle_path(config)
    if (target / MANIFEST).exists() and not force:
        raise BundleExistsError(
            f"a fitted bundle already exists at {target}; pass --force to replace it (or set another "
            "output_dir)"
        )
    if target.exists() and not (target / MANIFEST).exists() and any(target.iterdir()) and not force:
        raise BundleExistsError(f"{target} exists and is not empty (not a bundle); pass --force or clear it")
    config.llm_rerank()  # the stage section is validated before minutes of work
    data = data or load_data(config.data)
    from llm_rerank_plugin.data import check_columns

    check_columns(data, config)
    history = with_sequence_position(host_frame(data.interactions if history is None else history))
    if len(history) == 0:
        raise ValueError("no interactions to fit on")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        chain = Chain(config, data, history, staging / "work")
        trainer = RerankerTrainer(chain, seed=config.seed)
        reranker = trainer.train(staging / "work" / "scorer")
        notext = None
        if "notext" in variants:
            notext = trainer.train_without_text(staging / "work" / "notext")
            (staging / "notext").mkdir()
            notext.save(staging / "notext" / "scorer.pt")
        cross = None
        cross_info = None
        if config.llm_rerank().cross.enabled:
            cross, cross_info = trainer.train_cross_encoder()
            cross.save(staging / "cross-encoder")
        chain.preprocessor.save(staging / "workflow")
        retriever = chain.fit_retriever(history)
        adapter, text_items = None, None
        if config.retrieval.uses_text_items:
            adapter = fit_item_text_adapter(
                retriever, reranker.items, history, config.retrieval.text_items.min_interactions, config.seed
            )
            added = add_text_items(retriever, reranker.items, adapter)
            adapter.save(staging / "text-adapter")
            text_items = {**adapter.info, "items_added": len(added)}
        retriever.save(staging / "retriever")
        popularity = chain.fit_retriever(history, "popularity")
        popularity.save(staging / "popularity")
        reranker.save(staging / "reranker")
        shutil.rmtree(staging / "work", ignore_errors=True)
        summary = {
            "users": int(history["user_id"].nunique()),
            "items": int(len(data.items)),
            "interactions": int(len(history)),
        }
        manifest = {
            "package": "llm-rerank-plugin",
            "version": package_version(),
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.perf_counter() - started, 1),
            "config": config.model_dump(mode="json"),
            "data": {"source": getattr(data, "source", {"name": data.name}), "rows": summary},
            "ids": {
                "user": _id_kind(history["user_id"]),
                "item": _id_kind(host_frame(data.items)["item_id"]),
            },
            "training": {
                **trainer.info,
                **({"text_items": text_items} if text_items else {}),
                **({"cross": cross_info} if cross_info else {}),
            },
            **(extra_manifest or {}),
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, default=json_default))
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    workflow = Preprocessor.load(target / "workflow")
    return Bundle(target, config, manifest, workflow, retriever, popularity, reranker, cross, notext, adapter)


def load_user_list(path: str | Path, kind: str) -> list[Any]:
    """User ids from a file: parquet/CSV with a ``user_id`` column, or plain text with one id per line;
    converted to the bundle's id kind (``int`` ids must be integers)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--users {path}: no such file")
    if path.suffix == ".parquet":
        frame = pd.read_parquet(path)
    elif path.suffix == ".csv":
        frame = pd.read_csv(path, dtype=str if kind == "str" else None)
    else:
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        frame = pd.DataFrame({"user_id": lines})
    if "user_id" not in frame.columns:
        raise ConfigError(f"--users {path}: expected a user_id column, got {list(frame.columns)}")
    values = frame["user_id"].tolist()
    if kind == "str":
        return [str(v) for v in values]
    out = []
    for v in values:
        try:
            number = int(str(v).strip())
        except ValueError:
            raise ConfigError(
                f"--users {path}: user id {v!r} is not an integer, and this bundle's user ids are integers"
            ) from None
        out.append(number)
    return out


def json_default(value: Any) -> Any:
    """``json.dumps`` default for numpy values (and ``str`` of anything else)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
