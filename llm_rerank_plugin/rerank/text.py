"""Turn item rows, user profiles and interaction histories into the short texts the reranker reads.

Everything here is plain pandas/numpy: frames come in as they are (no type conversion), and each
function returns python strings or lists, one per input row and in input order.

Every rendered text is safe for the tokenizer: unpaired surrogates and control characters are removed
from each value (``platform.contract.sanitize_text``; tabs and line breaks become spaces), and a text is
cut to ``max_chars`` characters (default 2000, ``LLMRerankConfig.max_text_chars``; the encoder reads far
fewer tokens anyway, so the cut only bounds the work spent on a pathological value).
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Hashable, Mapping, Sequence
from numbers import Integral, Real
from typing import Any

import numpy as np
import pandas as pd

from llm_rerank_plugin.platform.contract import DEFAULT_MAX_TEXT_CHARS, sanitize_text

__all__ = [
    "HistoryIndex",
    "ItemTemplate",
    "MissingFieldError",
    "UserTemplate",
    "field_texts",
    "recent_history",
]


class MissingFieldError(ValueError):
    """A template names a field (column / key) that the data does not have."""


def _is_missing(value: Any) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    if isinstance(value, float | np.floating):
        return math.isnan(value)
    if isinstance(value, str):
        return value.strip() == ""
    return False


def _to_text(value: Any) -> str:
    """Render one cell; NA and blanks become "" so the cleanup below can drop their scaffolding."""
    if isinstance(value, list | tuple | np.ndarray):
        # genres sometimes arrive already split into a list
        return ", ".join(t for t in (_to_text(v) for v in value) if t)
    if _is_missing(value):
        return ""
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, Integral):
        return str(int(value))
    if isinstance(value, Real) and float(value).is_integer():
        # a year read from a float column (because of NAs) should read "1977", not "1977.0"
        return str(int(value))
    return sanitize_text(str(value)).strip()


_EMPTY_BRACKETS = re.compile(r"\(\s*\)|\[\s*\]")
# A clause label whose value came out empty, e.g. the "Genres: ." left when genres is NA.
_EMPTY_LABEL = re.compile(r"(^|[.;!?]\s+)[A-Z][\w\- ]{0,40}:\s*(?:[.;,]\s*|$)")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,;:!?)\]])")
_SPACE_AFTER_OPEN = re.compile(r"([(\[])\s+")
_DOUBLE_PUNCT = re.compile(r"([.,;])(?:\s*[.,;])+")
_LEADING_PUNCT = re.compile(r"^[\s.,;:!?]+")
_WHITESPACE = re.compile(r"\s+")


def _clean(text: str) -> str:
    text = _EMPTY_BRACKETS.sub("", text)
    text = _EMPTY_LABEL.sub(r"\1", text)
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
    text = _SPACE_AFTER_OPEN.sub(r"\1", text)
    text = _DOUBLE_PUNCT.sub(r"\1", text)
    text = _LEADING_PUNCT.sub("", text)
    return _WHITESPACE.sub(" ", text).strip()


_HYPHEN_FRAGMENT = re.compile(r"^-[\w-]*")


class _Template:
    """A ``str.format``-style template over named fields with NA-tolerant rendering."""

    def __init__(self, template: str, what: str, max_chars: int = DEFAULT_MAX_TEXT_CHARS) -> None:
        if not isinstance(template, str):
            raise TypeError(f"{what} must be a str, got {type(template).__name__}")
        if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1:
            raise ValueError(f"max_chars must be an int >= 1, got {max_chars!r}")
        self.max_chars = max_chars
        parts: list[tuple[str, str | None, str, str | None]] = []
        try:
            parsed = list(string.Formatter().parse(template))
        except ValueError as exc:
            raise ValueError(f"{what} {template!r} is not a valid format string: {exc}") from None
        for literal, field, spec, conversion in parsed:
            if field is not None:
                if field == "" or field.isdigit():
                    raise ValueError(
                        f"{what} {template!r} uses a positional field '{{{field}}}'; "
                        "expected named fields such as '{title}'"
                    )
                if any(c in field for c in ".[]"):
                    raise ValueError(
                        f"{what} {template!r} uses '{{{field}}}'; expected plain column names, "
                        "without attribute or index access"
                    )
                if spec and "{" in spec:
                    raise ValueError(f"{what} {template!r}: nested fields in format specs are not supported")
            parts.append((literal, field, spec or "", conversion))
        self.template = template
        self._parts = parts
        self.fields: tuple[str, ...] = tuple(dict.fromkeys(p[1] for p in parts if p[1] is not None))
        self._what = what

    def check_fields(self, available: Sequence[Hashable]) -> None:
        have = set(available)
        missing = [f for f in self.fields if f not in have]
        if missing:
            raise MissingFieldError(
                f"{self._what} {self.template!r} names {missing} which the data lacks; "
                f"available columns: {sorted(map(str, have))}"
            )

    def render_values(self, values: Mapping[str, str]) -> str:
        """Render from already-stringified values ("" = missing); at most ``max_chars`` characters."""
        if self.fields and all(values[f] == "" for f in self.fields):
            return ""
        # Cut each value first, so a pathological one costs no more than max_chars of cleanup work.
        values = {f: v[: self.max_chars] for f, v in values.items()}
        out: list[str] = []
        previous_empty = False
        for literal, field, spec, conversion in self._parts:
            if previous_empty:
                # "{age}-year-old" with no age: drop the dangling "-year-old" too
                literal = _HYPHEN_FRAGMENT.sub("", literal)
            out.append(literal)
            if field is None:
                continue
            text = values[field]
            previous_empty = text == ""
            if text:
                if conversion == "r":
                    text = repr(text)
                if spec:
                    text = format(text, spec)
            out.append(text)
        return _clean(sanitize_text("".join(out)))[: self.max_chars]


class ItemTemplate:
    """Render an item row (title, year, genres, ...) into one sentence.

    Missing or NA fields render as empty, and the scaffolding they leave behind ("()", "Genres: .",
    double spaces) is cleaned up, so ``"{title} ({year}). Genres: {genres}."`` gives
    ``"Toy Story (1995). Genres: Animation, Comedy."`` or, with no year and genres, ``"Toy Story."``.
    An item whose every field is missing renders as ``""``. Values are sanitised and the text is cut to
    ``max_chars`` (module doc).
    """

    def __init__(
        self, template: str = "{title} ({year}). Genres: {genres}.", max_chars: int = DEFAULT_MAX_TEXT_CHARS
    ) -> None:
        self._tpl = _Template(template, "item template", max_chars)

    @property
    def template(self) -> str:
        return self._tpl.template

    @property
    def fields(self) -> tuple[str, ...]:
        """Column names the template reads, in first-use order."""
        return self._tpl.fields

    def render(self, row: Mapping[str, Any]) -> str:
        """Render one row (a dict, or a ``pd.Series`` indexed by column name)."""
        keys = row.index if isinstance(row, pd.Series) else row.keys()
        self._tpl.check_fields(list(keys))
        return self._tpl.render_values({f: _to_text(row[f]) for f in self.fields})

    def render_frame(self, items: pd.DataFrame) -> list[str]:
        """Render every row of ``items``; returns ``len(items)`` strings in row order."""
        self._tpl.check_fields(list(items.columns))
        fields = self.fields
        if not fields:
            return [self._tpl.render_values({})] * len(items)
        # itertuples over just the needed columns avoids building a Series per row
        return [
            self._tpl.render_values({f: _to_text(v) for f, v in zip(fields, values, strict=True)})
            for values in items[list(fields)].itertuples(index=False, name=None)
        ]


def field_texts(items: pd.DataFrame, fields: Mapping[str, str]) -> dict[str, list[str]]:
    """Render one text per named aspect, e.g. ``{"title": "{title}", "era": "released in {year}"}``.

    Returns ``{aspect: [text per row of items]}`` in the order of ``fields``; each list has
    ``len(items)`` entries. A row whose aspect fields are all missing gives ``""`` for that aspect.
    Every template is checked against the columns before anything is rendered.
    """
    if not fields:
        raise ValueError("fields is empty; expected a mapping like {'title': '{title}'}")
    templates = {name: ItemTemplate(tpl) for name, tpl in fields.items()}
    for tpl in templates.values():
        tpl._tpl.check_fields(list(items.columns))
    return {name: tpl.render_frame(items) for name, tpl in templates.items()}


class UserTemplate:
    """Render a user (profile + recent history) into the query side of the reranker.

    ``render(profile_row, history_titles)`` gives e.g.
    ``"A 24-year-old man technician. Recently watched: Star Wars (1977); Fargo (1996)."``.
    ``history_titles`` must already be ordered newest first (see :func:`recent_history`); only the
    first ``max_history`` are used. ``gender_words`` maps raw codes ("M"/"F") to words; codes not in
    the map are used as they are. ``value_words`` does the same for any other profile field
    (``{"occupation": {"none": ""}}``). Values and titles are sanitised and the text is cut to
    ``max_chars`` (module doc).
    """

    def __init__(
        self,
        profile: str = "A {age}-year-old {gender} {occupation}.",
        history_prefix: str = " Recently watched: ",
        max_history: int = 20,
        separator: str = "; ",
        gender_words: Mapping[str, str] | None = None,
        value_words: Mapping[str, Mapping[str, str]] | None = None,
        history_suffix: str = ".",
        max_chars: int = DEFAULT_MAX_TEXT_CHARS,
    ) -> None:
        if max_history < 0:
            raise ValueError(f"max_history must be >= 0, got {max_history}")
        self._tpl = _Template(profile, "user profile template", max_chars)
        self.max_chars = max_chars
        self.history_prefix = history_prefix
        self.history_suffix = history_suffix
        self.max_history = int(max_history)
        self.separator = separator
        words: dict[str, dict[str, str]] = {k: dict(v) for k, v in (value_words or {}).items()}
        words.setdefault("gender", {}).update(
            {"M": "man", "F": "woman"} if gender_words is None else dict(gender_words)
        )
        self._words = words

    @property
    def fields(self) -> tuple[str, ...]:
        return self._tpl.fields

    def render_profile(self, profile_row: Mapping[str, Any] | None) -> str:
        if profile_row is None:
            return ""
        keys = profile_row.index if isinstance(profile_row, pd.Series) else profile_row.keys()
        self._tpl.check_fields(list(keys))
        values = {}
        for f in self.fields:
            text = _to_text(profile_row[f])
            values[f] = self._words.get(f, {}).get(text, text)
        return self._tpl.render_values(values)

    def render(self, profile_row: Mapping[str, Any] | None, history_titles: Sequence[str]) -> str:
        """One user text; ``profile_row`` may be None (unknown user) and the history may be empty."""
        if isinstance(history_titles, str):
            raise TypeError("history_titles must be a sequence of titles, not a single str")
        titles = [t for t in (_to_text(t) for t in list(history_titles)[: self.max_history]) if t]
        text = self.render_profile(profile_row)
        if titles:
            text += self.history_prefix + self.separator.join(titles) + self.history_suffix
        return _WHITESPACE.sub(" ", sanitize_text(text, self.max_chars)).strip()


_HISTORY_COLUMNS = ("user_id", "item_id", "timestamp")


def _check_history_columns(interactions: pd.DataFrame) -> None:
    missing = [c for c in _HISTORY_COLUMNS if c not in interactions.columns]
    if missing:
        raise MissingFieldError(
            f"interactions lack {missing}; expected columns {list(_HISTORY_COLUMNS)}, "
            f"available: {list(map(str, interactions.columns))}"
        )


def _cut(
    item_ids: np.ndarray,
    timestamps: np.ndarray,
    before_timestamp: float | None,
    before_position: int | None,
    n: int,
) -> list[Any]:
    """item_ids/timestamps are one user's history in chronological order (stable on ties)."""
    end = len(item_ids)
    if before_position is not None:
        if before_position < 0:
            raise ValueError(f"before_position must be >= 0, got {before_position}")
        end = min(end, int(before_position))
    if before_timestamp is not None:
        # side="left": an interaction AT the cutoff time counts as not-before; with second-resolution
        # timestamps a same-second interaction may well be the one being predicted or come after it.
        end = min(end, int(np.searchsorted(timestamps, before_timestamp, side="left")))
    if n <= 0 or end <= 0:
        return []
    return item_ids[max(0, end - n) : end][::-1].tolist()


def recent_history(
    interactions: pd.DataFrame,
    user_id: Any,
    before_timestamp: float | None = None,
    before_position: int | None = None,
    n: int = 20,
) -> list[Any]:
    """The user's most recent ``n`` item ids strictly before the interaction being predicted, newest first.

    This is the no-future-leak guarantee for every text the reranker sees:

    * the user's rows are ordered by ``timestamp`` with a *stable* sort, so equal timestamps keep
      their original row order (a later row counts as later);
    * ``before_timestamp``: only interactions with ``timestamp < before_timestamp`` are kept; an
      interaction at exactly the cutoff is excluded, since it may be the target or come after it;
    * ``before_position``: only the first ``before_position`` interactions of that chronological
      order are kept (0-based position of the target in the user's sequence; ties resolved as above);
    * both may be given (both apply); neither gives the whole history (serving time).

    Requires columns ``user_id``, ``item_id``, ``timestamp`` (numeric, e.g. unix seconds). Returns a
    list of python item ids (at most ``n``), empty for an unknown user. For many look-ups on one frame
    use :class:`HistoryIndex`, which sorts once.
    """
    _check_history_columns(interactions)
    rows = interactions.loc[interactions["user_id"] == user_id, ["item_id", "timestamp"]]
    order = np.argsort(rows["timestamp"].to_numpy(), kind="stable")
    return _cut(
        rows["item_id"].to_numpy()[order],
        rows["timestamp"].to_numpy()[order],
        before_timestamp,
        before_position,
        n,
    )


class HistoryIndex:
    """:func:`recent_history` for many look-ups: sorts the interactions once, then O(log n) per query.

    Same ordering and cutoff rules (and the same results) as :func:`recent_history`.
    """

    def __init__(self, interactions: pd.DataFrame) -> None:
        _check_history_columns(interactions)
        frame = interactions[list(_HISTORY_COLUMNS)]
        # stable sort by (user, timestamp): ties in time keep row order, as in recent_history
        frame = frame.iloc[np.argsort(frame["timestamp"].to_numpy(), kind="stable")]
        frame = frame.iloc[np.argsort(frame["user_id"].to_numpy(), kind="stable")]
        users = frame["user_id"].to_numpy()
        self._items = frame["item_id"].to_numpy()
        self._times = frame["timestamp"].to_numpy()
        starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]]) if len(users) else np.array([], int)
        ends = np.r_[starts[1:], len(users)]
        self._span = {
            u: (int(s), int(e)) for u, s, e in zip(users[starts].tolist(), starts, ends, strict=True)
        }

    def __contains__(self, user_id: Any) -> bool:
        return user_id in self._span

    def __len__(self) -> int:
        return len(self._span)

    def recent(
        self,
        user_id: Any,
        before_timestamp: float | None = None,
        before_position: int | None = None,
        n: int = 20,
    ) -> list[Any]:
        """Same contract as :func:`recent_history` for one user."""
        span = self._span.get(user_id)
        if span is None:
            return []
        s, e = span
        return _cut(self._items[s:e], self._times[s:e], before_timestamp, before_position, n)
