"""Your own catalogue and logs (``data.source: files``): interactions, items and, optionally, users.

Each path is a parquet file, a CSV (``.csv``) or TSV (``.tsv``) file, or a folder of parquet parts (read in
natural name order: ``part.2`` before ``part.10``). Files are read through ``merlin.core.dispatch`` (cuDF
where Merlin found a GPU, pandas otherwise), checked and normalised on the host with pandas once, and
cached as parquet under ``<cache_dir>/files/<fingerprint>/``, keyed by the files' paths, sizes and
modification times and by the column mapping.

What comes out (``InteractionData``):

* interactions: ``user_id``, ``item_id``, ``timestamp`` (epoch seconds: int64, or float64 when a datetime
  has sub-second parts), ``rating`` (float64; 1.0 for every event when ``data.columns.rating`` is not set),
  in file order; other interaction columns are not kept.
* items: ``item_id`` plus every other column as read (text, numbers, list columns such as tags).
* users: ``user_id`` plus every other column; an empty ``user_id`` frame without ``data.users``.

Ids keep their type: integer ids are int64, string ids stay strings (in a CSV, an id column whose every
value is a plain integer like ``42`` is read as integers; ``00042`` or ``C42`` stay strings).
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from merlin.core.dispatch import read_dispatch

from llm_rerank_plugin.config import DataConfig
from llm_rerank_plugin.data.base import (
    DataSourceError,
    DataValidationError,
    DuplicateIdError,
    EmptyDataError,
    IdTypeError,
    InteractionData,
    MissingColumnError,
    MissingFileError,
    MissingIdError,
    TimestampError,
    UnknownItemError,
    fingerprint,
    prune_superseded,
    read_cached,
    to_pandas,
    write_cache,
)

logger = logging.getLogger(__name__)

PARQUET_SUFFIXES = (".parquet", ".pq")
CSV_SEPARATORS = {".csv": ",", ".tsv": "\t"}
_PLAIN_INT = re.compile(r"-?(?:0|[1-9]\d{0,17})")
_EXAMPLES = 5


class DroppedInteractionsWarning(UserWarning):
    """Interactions whose item is not in the catalogue were dropped (``data.strict: false``)."""


def _natural_key(path: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def resolve_files(role: str, raw: str | Path) -> list[Path]:
    """The files a ``data.<role>`` path stands for: itself, or the parquet parts of a folder."""
    path = Path(raw).expanduser()
    if not path.exists():
        raise MissingFileError(
            f"data.{role}: {raw} does not exist (resolved to {path.resolve()}); expected a parquet or CSV "
            "file, or a folder of parquet parts"
        )
    if path.is_dir():
        parts = sorted(
            (p for p in path.iterdir() if p.is_file() and p.suffix.lower() in PARQUET_SUFFIXES),
            key=_natural_key,
        )
        if not parts:
            present = sorted(p.name for p in path.iterdir())[:10]
            raise MissingFileError(
                f"data.{role}: folder {raw} holds no parquet parts (*.parquet, *.pq); it holds {present}"
            )
        return parts
    if path.suffix.lower() not in (*PARQUET_SUFFIXES, *CSV_SEPARATORS):
        raise DataSourceError(
            f"data.{role}: {raw} has an unknown format ({path.suffix or 'no extension'}); expected "
            ".parquet / .pq, .csv or .tsv, or a folder of parquet parts"
        )
    return [path]


def _read_one(role: str, path: Path, id_columns: list[str]) -> pd.DataFrame:
    try:
        sep = CSV_SEPARATORS.get(path.suffix.lower())
        if sep is None:
            frame = read_dispatch(fmt="parquet")(str(path))
        else:
            # Ids are read as text so that "00042" keeps its zeros; plain integers are converted back later.
            header = pd.read_csv(path, sep=sep, nrows=0).columns
            frame = read_dispatch(fmt="csv")(
                str(path), sep=sep, dtype={c: str for c in id_columns if c in header}
            )
    except pd.errors.EmptyDataError:
        raise EmptyDataError(f"data.{role}: {path} is empty; expected a header row and data rows") from None
    except Exception as exc:  # pyarrow, pandas and cuDF each raise their own types for unreadable files
        raise DataSourceError(f"data.{role}: cannot read {path}: {type(exc).__name__}: {exc}") from exc
    frame = to_pandas(frame)
    if any(name is not None for name in frame.index.names):
        # a frame saved with set_index("sku") keeps its id in the index: make it a column again
        frame = frame.reset_index()
    return frame


def _read(role: str, files: list[Path], id_columns: list[str]) -> pd.DataFrame:
    frames = [_read_one(role, f, id_columns) for f in files]
    first = list(frames[0].columns)
    for path, frame in zip(files[1:], frames[1:], strict=True):
        if list(frame.columns) != first:
            raise DataValidationError(
                f"data.{role}: the parts of {files[0].parent} differ in columns: {files[0].name} has "
                f"{first}, {path.name} has {list(frame.columns)}; expected the same columns in every part"
            )
    frame = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
    if len(frame) == 0:
        where = str(files[0]) if len(files) == 1 else f"the {len(files)} parts in {files[0].parent}"
        raise EmptyDataError(f"data.{role}: {where} has no rows; expected at least one")
    return frame.reset_index(drop=True)


def _where(role: str, files: list[Path], column: str) -> str:
    place = str(files[0]) if len(files) == 1 else f"{files[0].parent} ({len(files)} parts)"
    return f"data.{role} {place}, column {column!r}"


def _examples(values: pd.Series) -> str:
    shown = [repr(v) for v in values.head(_EXAMPLES).tolist()]
    return ", ".join(shown) + (", ..." if len(values) > _EXAMPLES else "")


def _require(frame: pd.DataFrame, role: str, files: list[Path], wanted: dict[str, str]) -> None:
    """``wanted``: config key -> column it names."""
    missing = {key: col for key, col in wanted.items() if col not in frame.columns}
    if missing:
        names = ", ".join(f"{key} = {col!r}" for key, col in missing.items())
        place = files[0] if len(files) == 1 else files[0].parent
        raise MissingColumnError(
            f"data.{role} {place} has no column for {names}; columns present: {list(frame.columns)}"
        )


def _ids(series: pd.Series, where: str, from_text: bool) -> pd.Series:
    """int64 or str ids, as given; NaN ids and other types are errors."""
    missing = series.isna()
    if missing.any():
        rows = pd.Series(series.index[missing])
        raise MissingIdError(
            f"{where}: {int(missing.sum())} of {len(series)} rows have no id (rows {_examples(rows)}); "
            "expected an id in every row"
        )
    if isinstance(series.dtype, pd.CategoricalDtype):
        series = series.astype(series.cat.categories.dtype)
    kind = series.dtype.kind
    if kind in "iu":
        return series.astype("int64")
    if kind == "f":
        if np.all(np.mod(series.to_numpy(), 1) == 0):
            return series.astype("int64")
        raise IdTypeError(
            f"{where}: ids are fractional numbers ({_examples(series[np.mod(series, 1) != 0])}); "
            "expected integers or strings"
        )
    if kind == "O" or pd.api.types.is_string_dtype(series.dtype):
        series = series.astype(object)
        inferred = pd.api.types.infer_dtype(series, skipna=False)
        if inferred == "integer":
            return series.astype("int64")
        if inferred == "string":
            if from_text and series.str.fullmatch(_PLAIN_INT).all():
                return series.astype("int64")
            return series
        odd = series[~series.map(lambda v: isinstance(v, str))]
        raise IdTypeError(
            f"{where}: ids of mixed or unsupported types ({inferred}: {_examples(odd)}); "
            "expected all integers or all strings"
        )
    raise IdTypeError(f"{where}: ids of type {series.dtype}; expected integers or strings")


def _id_kind(series: pd.Series) -> str:
    return "integers" if series.dtype.kind in "iu" else "strings"


def _same_id_kind(a: pd.Series, a_where: str, b: pd.Series, b_where: str) -> None:
    if len(a) and len(b) and _id_kind(a) != _id_kind(b):
        raise IdTypeError(
            f"{a_where} holds {_id_kind(a)} ({_examples(a)}) but {b_where} holds {_id_kind(b)} "
            f"({_examples(b)}); the same ids must be written the same way in both files"
        )


def _seconds_from_ns(ns: np.ndarray) -> np.ndarray:
    if np.all(ns % 1_000_000_000 == 0):
        return ns // 1_000_000_000
    return ns / 1e9


def _timestamps(series: pd.Series, where: str) -> pd.Series:
    """Epoch seconds from epoch numbers, datetime columns or datetime strings; anything else is an error."""
    expected = (
        "expected epoch seconds (numbers) or datetimes (a datetime column, or strings such as "
        "'2024-05-01 12:30:00' / '2024-05-01T12:30:00+02:00')"
    )
    index = series.index
    if pd.api.types.is_datetime64_any_dtype(series.dtype):
        parsed = series
        if getattr(series.dtype, "tz", None) is not None:
            parsed = series.dt.tz_convert("UTC").dt.tz_localize(None)
        bad = parsed.isna()
    elif pd.api.types.is_bool_dtype(series.dtype):
        raise TimestampError(f"{where}: timestamps are booleans; {expected}")
    elif pd.api.types.is_numeric_dtype(series.dtype):
        bad = series.isna() | ~np.isfinite(series.astype("float64"))
        if not bad.any():
            return series.astype("int64" if series.dtype.kind in "iu" else "float64")
        parsed = None
    elif series.dtype.kind == "O" or pd.api.types.is_string_dtype(series.dtype):
        text = series.astype(object)
        numbers = pd.to_numeric(text, errors="coerce")
        if numbers.notna().all():
            return _timestamps(numbers, where)
        parsed = pd.to_datetime(text, errors="coerce", utc=True).dt.tz_localize(None)
        bad = parsed.isna()
    else:
        raise TimestampError(f"{where}: timestamps of type {series.dtype}; {expected}")
    if bad.any():
        raise TimestampError(
            f"{where}: {int(bad.sum())} of {len(series)} timestamps cannot be read "
            f"(e.g. {_examples(series[bad])} in rows {_examples(pd.Series(index[bad]))}); {expected}"
        )
    ns = parsed.to_numpy().astype("datetime64[ns]").astype("int64")
    return pd.Series(_seconds_from_ns(ns), index=index)


def _ratings(series: pd.Series, where: str) -> pd.Series:
    numbers = pd.to_numeric(series, errors="coerce")
    bad = numbers.isna() | ~np.isfinite(numbers.astype("float64"))
    if bad.any():
        raise DataValidationError(
            f"{where}: {int(bad.sum())} of {len(series)} ratings are not numbers "
            f"(e.g. {_examples(series[bad])}); expected a number in every row"
        )
    return numbers.astype("float64")


def _unique_ids(ids: pd.Series, where: str) -> None:
    dup = ids.duplicated(keep=False)
    if dup.any():
        repeated = ids[dup].drop_duplicates()
        raise DuplicateIdError(
            f"{where}: {len(repeated)} ids occur more than once ({int(dup.sum())} rows), e.g. "
            f"{_examples(repeated)}; expected one row per id"
        )


def _with_id(frame: pd.DataFrame, id_column: str, canonical: str, ids: pd.Series, where: str) -> pd.DataFrame:
    """The frame with its id column renamed to ``canonical`` (first) and replaced by the normalised ids."""
    if id_column != canonical and canonical in frame.columns:
        raise DataValidationError(
            f"{where}: the file also has a column named {canonical!r}, which the id column would be renamed "
            f"to; rename or drop that column, or use it as the id column"
        )
    rest = [c for c in frame.columns if c != id_column]
    out = frame[rest].copy()
    out.insert(0, canonical, ids.to_numpy())
    return out


def _settings(cfg: DataConfig) -> dict[str, Any]:
    """Canonical column -> the file's column, per file (part of the cache key and of ``source``)."""
    return {
        "interactions": cfg.columns.model_dump(),
        "items": {"item_id": item_id_column(cfg)},
        "users": {"user_id": user_id_column(cfg)},
    }


def item_id_column(cfg: DataConfig) -> str:
    """The items file's id column: ``data.item_id_column``, else the interactions' one
    (``data.columns.item_id``)."""
    return cfg.item_id_column or cfg.columns.item_id


def user_id_column(cfg: DataConfig) -> str:
    """The users file's id column: ``data.user_id_column``, else the interactions' one
    (``data.columns.user_id``)."""
    return cfg.user_id_column or cfg.columns.user_id


def _parse(
    cfg: DataConfig, files: dict[str, list[Path]]
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    cols = cfg.columns
    mapped = {"data.columns.user_id": cols.user_id, "data.columns.item_id": cols.item_id}
    mapped["data.columns.timestamp"] = cols.timestamp
    if cols.rating is not None:
        mapped["data.columns.rating"] = cols.rating

    inter_files = files["interactions"]
    raw = _read("interactions", inter_files, [cols.user_id, cols.item_id])
    _require(raw, "interactions", inter_files, mapped)
    inter_text = inter_files[0].suffix.lower() in CSV_SEPARATORS
    where = lambda column: _where("interactions", inter_files, column)  # noqa: E731
    inter = pd.DataFrame(
        {
            "user_id": _ids(raw[cols.user_id], where(cols.user_id), inter_text),
            "item_id": _ids(raw[cols.item_id], where(cols.item_id), inter_text),
            "timestamp": _timestamps(raw[cols.timestamp], where(cols.timestamp)),
        }
    )
    if cols.rating is not None:
        inter["rating"] = _ratings(raw[cols.rating], where(cols.rating))
    else:
        if "rating" in raw.columns:
            warnings.warn(
                "data.interactions has a 'rating' column but data.columns.rating is not set: every event "
                "counts 1.0. Set data.columns.rating: rating to use it.",
                UserWarning,
                stacklevel=4,
            )
        inter["rating"] = 1.0
    inter = inter[["user_id", "item_id", "rating", "timestamp"]]
    del raw

    item_files = files["items"]
    item_col = item_id_column(cfg)
    items = _read("items", item_files, [item_col])
    key = "data.item_id_column" + ("" if cfg.item_id_column else " (default: data.columns.item_id)")
    _require(items, "items", item_files, {key: item_col})
    item_where = _where("items", item_files, item_col)
    item_ids = _ids(items[item_col], item_where, item_files[0].suffix.lower() in CSV_SEPARATORS)
    _unique_ids(item_ids, item_where)
    _same_id_kind(inter["item_id"], where(cols.item_id), item_ids, item_where)
    items = _with_id(items, item_col, "item_id", item_ids, item_where)

    user_col = user_id_column(cfg)
    if "users" in files:
        user_files = files["users"]
        users = _read("users", user_files, [user_col])
        key = "data.user_id_column" + ("" if cfg.user_id_column else " (default: data.columns.user_id)")
        _require(users, "users", user_files, {key: user_col})
        user_where = _where("users", user_files, user_col)
        user_ids = _ids(users[user_col], user_where, user_files[0].suffix.lower() in CSV_SEPARATORS)
        _unique_ids(user_ids, user_where)
        _same_id_kind(inter["user_id"], where(cols.user_id), user_ids, user_where)
        users = _with_id(users, user_col, "user_id", user_ids, user_where)
    else:
        users = pd.DataFrame({"user_id": pd.Series([], dtype=inter["user_id"].dtype)})

    known = inter["item_id"].isin(items["item_id"])
    unknown = inter.loc[~known, "item_id"]
    report = {
        "dropped_interactions": int(len(unknown)),
        "dropped_examples": [str(v) for v in unknown.drop_duplicates().head(_EXAMPLES).tolist()],
        "read_interactions": int(len(inter)),
    }
    if len(unknown) == len(inter):
        raise UnknownItemError(
            f"none of the {len(inter)} interactions' items ({where(cols.item_id)}, e.g. "
            f"{_examples(unknown)}) is in the catalogue ({item_where}, e.g. "
            f"{_examples(items['item_id'])}); expected the same ids in both files"
        )
    if len(unknown):
        inter = inter[known].reset_index(drop=True)
    return inter, items, users, report


def _check_unknown(report: dict[str, Any], strict: bool, interactions_path: str, items_path: str) -> None:
    dropped = report.get("dropped_interactions", 0)
    if not dropped:
        return
    message = (
        f"{dropped} of {report['read_interactions']} interactions in {interactions_path} name items that "
        f"are not in the catalogue {items_path} (e.g. {', '.join(report['dropped_examples'])})"
    )
    if strict:
        raise UnknownItemError(f"{message}; data.strict is true, so this is an error")
    logger.warning("%s; they are dropped", message)
    warnings.warn(
        f"{message}; they are dropped (set data.strict: true to make this an error)",
        DroppedInteractionsWarning,
        stacklevel=3,
    )


def load_files(cfg: DataConfig, cache_dir: str | Path | None = None) -> InteractionData:
    """Load ``data.source: files`` (see the module doc); raises a ``DataError`` subclass naming the file,
    the column and what was expected when a check fails."""
    from llm_rerank_plugin.data.movielens import default_cache_dir

    if cfg.interactions is None or cfg.items is None:
        raise DataSourceError("source: files needs data.interactions and data.items")
    files = {"interactions": resolve_files("interactions", cfg.interactions)}
    files["items"] = resolve_files("items", cfg.items)
    if cfg.users is not None:
        files["users"] = resolve_files("users", cfg.users)
    key = fingerprint("files", files, _settings(cfg))
    folder = Path(cache_dir or cfg.cache_dir or default_cache_dir()) / "files" / key

    loaded = read_cached(folder, "files", key)
    if loaded is None:
        inter, items, users, report = _parse(cfg, files)
        source = {
            "kind": "files",
            "origin": "data.interactions / data.items" + (" / data.users" if "users" in files else ""),
            "paths": {role: [str(p.resolve()) for p in paths] for role, paths in files.items()},
            "fingerprint": key,
            "columns": _settings(cfg),
            "rows": {"interactions": len(inter), "items": len(items), "users": len(users)},
            **report,
            "cache": str(folder.resolve()),
            "cached": False,
        }
        write_cache(folder, inter, items, users, source=source)
        prune_superseded(folder)
        loaded = read_cached(folder, "files", key)
        if loaded is None:
            raise DataSourceError(f"the cache just written to {folder} cannot be read back")
        loaded.source["cached"] = False
    _check_unknown(loaded.source, cfg.strict, cfg.interactions, cfg.items)
    return loaded
