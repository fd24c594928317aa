"""MovieLens-100k (``data.source: ml-100k``): read once, checked, cached as parquet.

Either the local path the user gives (GroupLens folder or zip, or a RecBole atomic folder), and nothing
else, or, without a path, the stock copies: the GroupLens ``ml-100k.zip``, then the copy inside the
``recbole==1.2.1`` wheel fetched with ``pip download --no-deps`` (RecBole is never imported or installed).
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from llm_rerank_plugin.data.base import (
    DataSourceError,
    InteractionData,
    MissingFileError,
    fingerprint,
    prune_superseded,
    read_cached,
    write_cache,
)

GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
RECBOLE_REQUIREMENT = "recbole==1.2.1"
EXPECTED_COUNTS = {"users": 943, "items": 1682, "interactions": 100_000}

_GENRES = [
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
]


def _grouplens_frames(read: Callable[[str], bytes]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Parse the GroupLens files ``u.data``, ``u.item``, ``u.user`` given a reader of member names."""
    inter = pd.read_csv(
        io.BytesIO(read("u.data")), sep="\t", header=None, names=["user_id", "item_id", "rating", "timestamp"]
    )
    raw_items = pd.read_csv(
        io.BytesIO(read("u.item")),
        sep="|",
        header=None,
        encoding="latin-1",
        names=["item_id", "raw_title", "release_date", "video_release", "url", *_GENRES],
    )
    # GroupLens titles carry the year: "Toy Story (1995)".
    parts = raw_items["raw_title"].str.extract(r"^(?P<title>.*?)\s*\((?P<year>\d{4})\)\s*$")
    title = parts["title"].fillna(raw_items["raw_title"]).str.strip()
    year = pd.to_numeric(parts["year"], errors="coerce")
    year = year.fillna(pd.to_datetime(raw_items["release_date"], errors="coerce").dt.year)
    genres = raw_items[_GENRES].apply(lambda row: ", ".join(g for g in _GENRES if row[g] == 1), axis=1)
    items = pd.DataFrame({"item_id": raw_items["item_id"], "title": title, "year": year, "genres": genres})
    users = pd.read_csv(
        io.BytesIO(read("u.user")),
        sep="|",
        header=None,
        names=["user_id", "age", "gender", "occupation", "zip_code"],
        dtype={"zip_code": str},
    )
    return inter, items, users


def _recbole_frames(folder: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Parse RecBole's atomic files (``ml-100k.inter/.item/.user``, typed headers like ``rating:float``)."""

    def read(suffix: str) -> pd.DataFrame:
        frame = pd.read_csv(folder / f"ml-100k.{suffix}", sep="\t", dtype=str, keep_default_na=False)
        frame.columns = [c.split(":")[0] for c in frame.columns]
        return frame

    inter = read("inter")
    inter = inter.astype(
        {"user_id": "int64", "item_id": "int64", "rating": "float64", "timestamp": "float64"}
    )
    inter["timestamp"] = inter["timestamp"].astype("int64")
    raw_items = read("item")
    items = pd.DataFrame(
        {
            "item_id": raw_items["item_id"].astype("int64"),
            "title": raw_items["movie_title"].str.strip(),
            "year": pd.to_numeric(raw_items["release_year"], errors="coerce"),
            "genres": raw_items["class"].str.split().str.join(", "),
        }
    )
    users = read("user").astype({"user_id": "int64", "age": "int64"})
    return inter, items, users


def _local_files(path: Path) -> tuple[str, list[Path]]:
    """The format of a local copy and the files it would be read from (the cache key takes these)."""
    if not path.exists():
        raise MissingFileError(f"{path} does not exist")
    if path.is_file() and zipfile.is_zipfile(path):
        return "zip", [path]
    grouplens = [path / name for name in ("u.data", "u.item", "u.user")]
    if path.is_dir() and all(p.is_file() for p in grouplens):
        return "grouplens", grouplens
    recbole = [path / f"ml-100k.{suffix}" for suffix in ("inter", "item", "user")]
    if path.is_dir() and all(p.is_file() for p in recbole):
        return "recbole", recbole
    raise DataSourceError(
        f"{path} holds neither GroupLens files (u.data, u.item, u.user), a GroupLens zip, "
        "nor RecBole atomic files (ml-100k.inter/.item/.user)"
    )


def _from_local(path: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    kind, _ = _local_files(path)
    if kind == "zip":
        with zipfile.ZipFile(path) as archive:
            return _grouplens_frames(lambda name: _read_zip_member(archive, name))
    if kind == "grouplens":
        return _grouplens_frames(lambda name: (path / name).read_bytes())
    return _recbole_frames(path)


def _read_zip_member(archive: zipfile.ZipFile, name: str) -> bytes:
    for member in archive.namelist():
        if member == name or member.endswith("/" + name):
            return archive.read(member)
    raise DataSourceError(f"the zip has no {name}")


def _from_grouplens(timeout: float) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    try:
        with urllib.request.urlopen(GROUPLENS_URL, timeout=timeout) as response:
            payload = response.read()
    except OSError as exc:
        raise DataSourceError(f"{GROUPLENS_URL}: {exc}") from exc
    with zipfile.ZipFile(io.BytesIO(payload)) as archive:
        return _grouplens_frames(lambda name: _read_zip_member(archive, name))


def _from_recbole_wheel(timeout: float) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-q",
            "-d",
            tmp,
            RECBOLE_REQUIREMENT,
        ]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout * 10)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DataSourceError(f"pip download {RECBOLE_REQUIREMENT}: {exc}") from exc
        wheels = list(Path(tmp).glob("recbole-*.whl"))
        if done.returncode != 0 or not wheels:
            raise DataSourceError(f"pip download {RECBOLE_REQUIREMENT} failed: {done.stderr.strip()[-500:]}")
        prefix = "recbole/dataset_example/ml-100k/"
        target = Path(tmp) / "ml-100k"
        target.mkdir()
        with zipfile.ZipFile(wheels[0]) as archive:
            for suffix in ("inter", "item", "user"):
                with (
                    archive.open(f"{prefix}ml-100k.{suffix}") as src,
                    open(target / f"ml-100k.{suffix}", "wb") as dst,
                ):
                    shutil.copyfileobj(src, dst)
        return _recbole_frames(target)


def _check_counts(inter: pd.DataFrame, items: pd.DataFrame, users: pd.DataFrame) -> None:
    found = {
        "users": users["user_id"].nunique(),
        "items": items["item_id"].nunique(),
        "interactions": len(inter),
    }
    if found != EXPECTED_COUNTS:
        raise DataSourceError(f"unexpected counts {found}, expected {EXPECTED_COUNTS}")


def load_movielens_100k(
    path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    *,
    allow_network: bool = True,
    timeout: float = 15.0,
) -> InteractionData:
    """Load MovieLens-100k as frames (cuDF where Merlin found a GPU, pandas otherwise).

    With ``path``, that local copy is the only source: if it cannot be read or is not MovieLens-100k the
    error names it (no fallback to the network copies). Without ``path``, the GroupLens zip and then the
    ``recbole`` wheel are tried (when ``allow_network``). The result is cached as parquet under
    ``<cache_dir>/ml-100k/<fingerprint>/`` (default ``cache_dir``: ``$LLM_RERANK_CACHE`` or
    ``~/.cache/llm_rerank_plugin``), keyed by the local files' paths, sizes and modification times, or by
    the stock network source; ``InteractionData.source`` says which was read.
    """
    root = Path(cache_dir or default_cache_dir()) / "ml-100k"
    if path is not None:
        local = Path(path).expanduser()
        try:
            fmt, files = _local_files(local)
        except DataSourceError as exc:
            raise type(exc)(
                f"data.path {path}: {exc}. Expected a GroupLens ml-100k folder or zip, or RecBole atomic "
                "files; fix or remove data.path (it is never replaced by another copy)."
            ) from None
        key = fingerprint("ml-100k", {"ml-100k": files})
        source = {
            "kind": "ml-100k",
            "origin": f"local path {local.resolve()} ({fmt})",
            "paths": {"ml-100k": [str(f.resolve()) for f in files]},
            "fingerprint": key,
        }
        cached = read_cached(root / key, "ml-100k", key)
        if cached is not None:
            return cached
        try:
            inter, items, users = _from_local(local)
            _check_counts(inter, items, users)
        except (DataSourceError, OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            raise DataSourceError(
                f"Could not load MovieLens-100k from data.path {path}: {exc}. "
                "For a filtered or other copy of the data use `data.source: files`."
            ) from exc
        return _cache_and_read(root / key, inter, items, users, source)

    key = fingerprint("ml-100k", {}, {"network": [GROUPLENS_URL, RECBOLE_REQUIREMENT]})
    cached = read_cached(root / key, "ml-100k", key)
    if cached is not None:
        return cached
    sources: list[tuple[str, Callable[[], tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]]]] = []
    if allow_network:
        sources.append((f"GroupLens {GROUPLENS_URL}", lambda: _from_grouplens(timeout)))
        sources.append(
            (f"the {RECBOLE_REQUIREMENT} wheel via pip download", lambda: _from_recbole_wheel(timeout))
        )
    failures = []
    for label, fetch in sources:
        try:
            inter, items, users = fetch()
            _check_counts(inter, items, users)
        except (DataSourceError, OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            failures.append(f"  - {label}: {exc}")
            continue
        source = {"kind": "ml-100k", "origin": label, "paths": {}, "fingerprint": key}
        return _cache_and_read(root / key, inter, items, users, source)
    none_tried = "  (none: no data.path given and data.allow_network is false)"
    tried = "\n".join(failures) if failures else none_tried
    raise DataSourceError(
        "Could not load MovieLens-100k from any source. Tried, in order:\n"
        f"{tried}\nGive a local copy with `data.path` (GroupLens ml-100k folder or zip, or RecBole "
        "atomic files)."
    )


def _cache_and_read(
    folder: Path, inter: pd.DataFrame, items: pd.DataFrame, users: pd.DataFrame, source: dict[str, Any]
) -> InteractionData:
    source = {
        **source,
        "rows": {"interactions": len(inter), "items": len(items), "users": len(users)},
        "cache": str(folder.resolve()),
        "cached": False,
    }
    write_cache(folder, inter, items, users, source=source)
    prune_superseded(folder)
    loaded = read_cached(folder, "ml-100k", source["fingerprint"])
    if loaded is None:
        raise DataSourceError(f"the cache just written to {folder} cannot be read back")
    loaded.source["cached"] = False
    return loaded


def default_cache_dir() -> Path:
    """``$LLM_RERANK_CACHE`` or ``~/.cache/llm_rerank_plugin``."""
    return Path(os.environ.get("LLM_RERANK_CACHE", Path.home() / ".cache" / "llm_rerank_plugin"))
