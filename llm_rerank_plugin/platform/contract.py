"""The request contract: one set of rules for every input a client can send, on every surface.

The platform stage (``LLMRerankStage.rank`` / ``.feedback``), the Merlin operator (``LLMRerank``), the
feedback path (``OnlineReranker.record``) and the serving path all normalise requests through this
module, so a request gets the same answer (or the same named error) wherever it enters.

Ids
    Item ids take the type of the reranker's catalogue (``reranker.items.item_ids``): integer catalogue
    -> ``int``; string catalogue -> ``str``. User ids take the type of the reranker's known users (the
    first key of ``reranker.histories``, else of ``reranker.profiles``; with no known user, the item id
    type). For an integer type: Python/numpy ints, floats with no fraction (``4.0``) and canonical
    integer strings (``"4"``, ``"-3"``; not ``"04"``, ``" 4"``, ``"4.0"``, ``"1_000"``) become ``int``;
    anything else is refused. For a string type: strings are kept exactly and ints become their decimal
    string; floats are refused. Everywhere ``None``, NaN, booleans, empty strings, strings with
    surrounding whitespace, control characters or unpaired surrogates, and other types are refused
    (:class:`InvalidUserIdError`, :class:`InvalidItemIdError`). So ``"4"`` and ``4`` are the same user
    of an integer-keyed reranker on every surface, and feedback for one lands in the other's state.

Candidates
    Item ids and retrieval scores are 1-D and of equal length (:class:`MalformedRequestError`), with at
    least one candidate. Duplicate ids (after normalisation) are merged into one candidate at the place
    of their first appearance, keeping the best retrieval score (NaN counts as missing). Scores are
    numbers; NaN means "no retrieval score" (the feature treats it as the list's lowest); ``+inf`` and
    ``-inf`` (and values beyond float32's range) are refused with :class:`InvalidScoreError`, since an
    infinite score is an upstream bug that no ranking could honour. Ids of the right type that the
    catalogue does not hold are dropped, with a WARNING log naming them (a catalogue lagging behind
    retrieval must not take a user's recommendations down); :class:`NoKnownCandidatesError` when none
    is left.

top_k
    An ``int`` (or numpy integer) >= 1; booleans, floats, strings and values < 1 are refused
    (:class:`InvalidTopKError`). Fewer rows come back when fewer distinct known candidates remain.

Feedback events (``feedback/events.py``)
    The same id rules; timestamps are unix seconds, finite and in ``[0, 1e11)`` (larger values are
    almost surely milliseconds); text is sanitised (:func:`sanitize_text`), cut to ``max_text_chars``
    and parsed into at most ``MAX_TEXT_PHRASES`` phrases. Every refusal is an ``InvalidFeedbackEvent``.

Every error is a :class:`RequestError` (a ``ValueError``) whose message names the bad input and what
was expected. This module imports only numpy, so the light ``feedback`` package can use it.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from numbers import Real
from typing import Any

import numpy as np

LOG = logging.getLogger(__name__)

DEFAULT_MAX_TEXT_CHARS = 2000  # LLMRerankConfig.max_text_chars' default
MAX_TEXT_PHRASES = 32  # phrases one text feedback may contribute (each costs an encoder pass)
MAX_TIMESTAMP = 1e11  # unix seconds; 1e11 s is year ~5100, while "now" in milliseconds is ~1.7e12
INT_KIND, STR_KIND, ANY_KIND = "int", "str", "any"
_INT64_MAX = 2**63 - 1
_FLOAT32_MAX = float(np.finfo(np.float32).max)

__all__ = [
    "DEFAULT_MAX_TEXT_CHARS",
    "MAX_TEXT_PHRASES",
    "MAX_TIMESTAMP",
    "Candidates",
    "FeedbackRoutingError",
    "InvalidIdError",
    "InvalidItemIdError",
    "InvalidScoreError",
    "InvalidTimestampError",
    "InvalidTopKError",
    "InvalidUserIdError",
    "MalformedRequestError",
    "NoKnownCandidatesError",
    "RequestError",
    "check_scores",
    "check_timestamp",
    "check_top_k",
    "item_id_kind",
    "merge_duplicates",
    "normalise_id",
    "normalise_item_ids",
    "normalise_user_id",
    "prepare_candidates",
    "sanitize_text",
    "timestamp_problem",
    "user_id_kind",
]


# ---------------------------------------------------------------------------------------------- errors
class RequestError(ValueError):
    """A request (ranking or feedback) the package refuses; the message names the input and what was
    expected. Nothing was written or changed when it is raised."""


class MalformedRequestError(RequestError):
    """The request's shape is wrong: not a dict, no user id, no candidates, lengths that differ."""


class InvalidTopKError(RequestError):
    """``top_k`` is not an integer >= 1."""


class InvalidIdError(RequestError):
    """An id that cannot be normalised to the reranker's id type."""


class InvalidUserIdError(InvalidIdError):
    """A user id of the wrong type or form for the reranker's users."""


class InvalidItemIdError(InvalidIdError):
    """An item id of the wrong type or form for the reranker's catalogue."""


class InvalidScoreError(RequestError):
    """Retrieval scores that are not numbers, or are infinite."""


class InvalidTimestampError(RequestError):
    """An event time that is not finite unix seconds in [0, MAX_TIMESTAMP)."""


class NoKnownCandidatesError(RequestError):
    """None of a user's candidate item ids is in the reranker's catalogue."""


class FeedbackRoutingError(RequestError):
    """A feedback event names no live stage, or names none while several stages with different stores
    are live in the process (see ``platform/plugin.py``)."""


# ---------------------------------------------------------------------------------------------- text
_SURROGATE = re.compile("[\ud800-\udfff]")
# C0 controls except \t \n \r (turned into spaces / newlines below), DEL and the C1 controls.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_NEEDS_WORK = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_BAD_ID_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def sanitize_text(text: str, max_chars: int | None = None, keep_newlines: bool = False) -> str:
    """``text`` safe for the tokenizer, the SQLite log and JSON: surrogate pairs are joined into one
    character and unpaired surrogates removed; control characters are removed, except tab (-> space) and
    line breaks (-> ``\\n`` with ``keep_newlines``, else a space); then cut to ``max_chars``."""
    if not isinstance(text, str):
        raise TypeError(f"expected a str, got {type(text).__name__}")
    if max_chars is not None and len(text) > 4 * max_chars:
        text = text[: 4 * max_chars]  # bound the work below; the final cut comes after cleaning
    if _NEEDS_WORK.search(text):
        if _SURROGATE.search(text):
            # A pair split into two code points (e.g. from JSON "\ud83d\ude00") becomes the real
            # character; a lone half has no meaning and is dropped.
            text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "ignore")
        text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u2028", "\n").replace("\u2029", "\n")
        text = _CONTROL.sub("", text.replace("\t", " "))
        if not keep_newlines:
            text = text.replace("\n", " ")
    if max_chars is not None and len(text) > max_chars:
        text = text[:max_chars]
    return text


# ---------------------------------------------------------------------------------------------- ids
def _kind_of(value: Any) -> str:
    if isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_):
        return INT_KIND
    if isinstance(value, str):
        return STR_KIND
    return ANY_KIND


def item_id_kind(reranker: Any) -> str:
    """``"int"``, ``"str"`` or ``"any"``: the type of the reranker's catalogue ids."""
    ids = reranker.items.item_ids
    kind = ids.dtype.kind
    if kind in "iu":
        return INT_KIND
    if kind in "US":
        return STR_KIND
    if kind == "O" and len(ids):
        return _kind_of(ids[0])
    return ANY_KIND


def user_id_kind(reranker: Any) -> str:
    """The type of the reranker's known users (first key of its histories, else profiles); with no known
    user, the catalogue's item id type."""
    for users in (reranker.histories, reranker.profiles):
        for user in users:  # the first key only: O(1) per request
            return _kind_of(user)
    return item_id_kind(reranker)


_CANONICAL_INT = re.compile(r"-?(?:0|[1-9][0-9]*)")
_EXPECTED = {
    INT_KIND: "an int, a float with no fraction or a canonical integer string such as '42'",
    STR_KIND: "a non-empty string (or an int, used as its decimal string)",
    ANY_KIND: "an int or a non-empty string",
}


def normalise_id(value: Any, kind: str, what: str = "user_id") -> Any:
    """``value`` as the reranker's id type ``kind`` (see the module doc), or an InvalidUserIdError /
    InvalidItemIdError (by ``what``) naming the value and the expected form."""
    error = InvalidItemIdError if what.startswith("item") else InvalidUserIdError

    def refuse(why: str) -> InvalidIdError:
        owner = "catalogue's items" if error is InvalidItemIdError else "reranker's users"
        return error(
            f"{what} {value!r:.80} ({type(value).__name__}) {why}; the {owner} have {kind} ids, "
            f"expected {_EXPECTED[kind]}"
        )

    if value is None or isinstance(value, bool | np.bool_):
        raise refuse("is not an id")
    if isinstance(value, int | np.integer):
        number = int(value)
        if kind == STR_KIND:
            return str(number)
        if not -_INT64_MAX - 1 <= number <= _INT64_MAX:
            raise refuse("is outside the 64-bit integer range")
        return number
    if isinstance(value, float | np.floating):
        if not math.isfinite(value):
            raise refuse("is not a finite number")
        if kind == STR_KIND or not float(value).is_integer():
            raise refuse("is a float")
        return normalise_id(int(value), kind, what)
    if isinstance(value, str):
        if kind == INT_KIND:
            if _CANONICAL_INT.fullmatch(value):
                return normalise_id(int(value), kind, what)
            raise refuse("is not a canonical integer string")
        if value == "":
            raise refuse("is empty")
        if value != value.strip() or _BAD_ID_CHARS.search(value):
            raise refuse("has surrounding whitespace, control characters or unpaired surrogates")
        return str(value)  # a numpy str_ becomes a plain str
    raise refuse("has an unsupported type")


def normalise_user_id(reranker: Any, value: Any) -> Any:
    """A request's user id as the reranker's user id type (module doc)."""
    return normalise_id(value, user_id_kind(reranker), "user_id")


def normalise_item_ids(values: Any, kind: str, what: str = "item_id") -> np.ndarray:
    """1-D candidate ids as the catalogue's id type: an int64 array (integer catalogue; integer input
    arrays are returned as they are, keeping their dtype) or an object array of str."""
    if hasattr(values, "to_numpy") and not isinstance(values, np.ndarray):  # pandas / cuDF series
        values = values.to_numpy()
    if isinstance(values, np.ndarray):
        if values.ndim != 1:
            raise MalformedRequestError(f"candidate {what}s must be 1-D; got shape {values.shape}")
        dtype_kind = values.dtype.kind
        if dtype_kind in "iu" and kind != STR_KIND:
            if dtype_kind == "u" and len(values) and values.max() > _INT64_MAX:
                raise InvalidItemIdError(f"candidate {what}s exceed the 64-bit integer range")
            return values
        if dtype_kind == "f" and kind == INT_KIND:
            integral = np.isfinite(values) & (np.mod(values, 1) == 0)
            if integral.all():
                return values.astype(np.int64)
            normalise_id(values[~integral][0].item(), kind, what)  # raises, naming the first bad one
        seq = values.tolist()
    elif isinstance(values, list | tuple):
        if kind != STR_KIND and all(type(v) is int for v in values):  # JSON's common case; not bools
            try:
                return np.array(values, dtype=np.int64)
            except OverflowError:
                pass  # an id beyond int64: normalise_id names it below
        seq = values
    elif isinstance(values, str | bytes) or not isinstance(values, Sequence):
        raise MalformedRequestError(
            f"candidate {what}s must be a list, tuple, 1-D array or series; got {type(values).__name__}"
        )
    else:
        seq = list(values)
    ids = [normalise_id(v, kind, what) for v in seq]
    if kind == STR_KIND or any(not isinstance(i, int) for i in ids):
        out = np.empty(len(ids), dtype=object)
        out[:] = ids
        return out
    return np.asarray(ids, dtype=np.int64)


# ---------------------------------------------------------------------------------------------- numbers
def check_top_k(value: Any, what: str = "top_k") -> int:
    """``value`` as an int >= 1, or InvalidTopKError (booleans, floats and strings are refused)."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer):
        raise InvalidTopKError(f"{what} must be an integer >= 1; got {value!r:.80} ({type(value).__name__})")
    if value < 1:
        raise InvalidTopKError(f"{what} must be an integer >= 1; got {int(value)}")
    return int(value)


def timestamp_problem(value: Any) -> str | None:
    """What is wrong with ``value`` as an event time (unix seconds), or None when it is fine."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, Real):
        return "must be a number (unix seconds)"
    t = float(value)
    if not math.isfinite(t) or t < 0:
        return "must be finite unix seconds >= 0"
    if t >= MAX_TIMESTAMP:
        return f"must be unix seconds below {MAX_TIMESTAMP:.0e} (year ~5100; is it in milliseconds?)"
    return None


def check_timestamp(value: Any, what: str = "timestamp") -> float:
    """``value`` as float unix seconds, finite and in [0, MAX_TIMESTAMP); else InvalidTimestampError."""
    problem = timestamp_problem(value)
    if problem:
        raise InvalidTimestampError(f"{what} {problem}; got {value!r:.80}")
    return float(value)


def check_scores(scores: Any, item_ids: np.ndarray) -> np.ndarray:
    """Retrieval scores as float32, one per candidate: numbers or NaN ("no score"); infinite values,
    values beyond float32's range, booleans and strings are refused (InvalidScoreError)."""
    if hasattr(scores, "to_numpy") and not isinstance(scores, np.ndarray):
        scores = scores.to_numpy()
    if isinstance(scores, list | tuple) and any(isinstance(v, bool | np.bool_) for v in scores):
        # np.asarray would quietly turn [0.5, True] into [0.5, 1.0]
        raise InvalidScoreError(f"retrieval scores must be numbers (or NaN); got booleans in {scores!r:.200}")
    if isinstance(scores, np.ndarray):
        raw = scores
    else:
        try:
            raw = np.asarray(scores)
        except (OverflowError, ValueError, TypeError):  # e.g. an int beyond float64: checked one by one
            raw = np.empty(len(scores), dtype=object) if hasattr(scores, "__len__") else np.asarray(None)
            if raw.ndim == 1:
                raw[:] = list(scores)
    if raw.ndim != 1 or len(raw) != len(item_ids):
        raise MalformedRequestError(
            f"item ids and retrieval scores must be 1-D of equal length; got {len(item_ids)} ids and "
            f"scores of shape {raw.shape}"
        )
    if raw.dtype.kind == "O":
        bad = [s for s in raw.tolist() if s is not None and (isinstance(s, bool) or not isinstance(s, Real))]
        if bad:
            raise InvalidScoreError(f"retrieval scores must be numbers (or NaN); got e.g. {bad[:5]!r:.200}")
        # float() of an int beyond the float range overflows: such a score is as infinite as inf.
        raw = np.array([np.nan if s is None else _to_float(s) for s in raw.tolist()], dtype=np.float64)
    elif raw.dtype.kind not in "iuf":
        raise InvalidScoreError(
            f"retrieval scores must be numbers (or NaN); got dtype {raw.dtype} e.g. {raw[:5].tolist()!r:.200}"
        )
    # Values beyond float32's range would become inf in the cast: refused with the infinite ones.
    if raw.dtype.kind == "f" and raw.dtype.itemsize > 4:
        infinite = np.abs(raw) > _FLOAT32_MAX  # NaN compares False: it stays "no score"
    else:
        infinite = np.isinf(raw)
    if infinite.any():
        raise InvalidScoreError(
            f"retrieval scores must be finite (NaN = no score); {int(infinite.sum())} are infinite or "
            f"beyond float32's range (3.4e38), for items {item_ids[infinite][:10].tolist()}: "
            f"{raw[infinite][:10].tolist()}"
        )
    return raw.astype(np.float32)


def _to_float(value: Real) -> float:
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


# ---------------------------------------------------------------------------------------------- candidates
def merge_duplicates(item_ids: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """(unique ids in order of first appearance, the best score of each, how many rows were merged).

    NaN is a missing score: an id seen with a number and with NaN keeps the number."""
    n = len(item_ids)
    if n < 2:
        return item_ids, scores, 0
    keys = item_ids.tolist()
    if len(set(keys)) == n:  # the common case, a few microseconds
        return item_ids, scores, 0
    index: dict[Any, int] = {}
    codes = np.fromiter((index.setdefault(i, len(index)) for i in keys), np.int64, n)
    best = np.full(len(index), np.nan, np.float32)
    np.fmax.at(best, codes, scores)
    first = np.full(len(index), n, np.int64)
    np.minimum.at(first, codes, np.arange(n))
    return item_ids[first], best, n - len(index)


@dataclass(frozen=True)
class Candidates:
    """One user's candidates after the contract: normalised user id, unique known item ids (catalogue
    type), their float32 scores and item-table rows; what was dropped or merged on the way."""

    user_id: Any
    item_ids: np.ndarray
    scores: np.ndarray
    rows: np.ndarray
    unknown: list[Any] = field(default_factory=list)
    merged: int = 0


def prepare_candidates(reranker: Any, user_id: Any, item_ids: Any, scores: Any) -> Candidates:
    """Apply the whole candidate contract (module doc) for one user of ``reranker``."""
    user = normalise_user_id(reranker, user_id)
    ids = normalise_item_ids(item_ids, item_id_kind(reranker))
    if len(ids) == 0:
        raise MalformedRequestError(f"user {user!r} has no candidates; expected at least one")
    values = check_scores(scores, ids)
    ids, values, merged = merge_duplicates(ids, values)
    if merged:
        LOG.debug("user %r: merged %d duplicate candidate rows (best score kept)", user, merged)
    rows = reranker.items.rows(ids, strict=False)
    known = rows >= 0
    unknown: list[Any] = []
    if not known.all():
        unknown = ids[~known].tolist()
        if not known.any():
            raise NoKnownCandidatesError(
                f"user {user!r}: none of the {len(ids)} candidate item ids are in the reranker's "
                f"catalogue, e.g. {unknown[:10]}; add them with LLMReranker.add_items"
            )
        LOG.warning(
            "user %r: dropping %d candidate ids not in the reranker's catalogue, e.g. %s",
            user, len(unknown), unknown[:10],
        )  # fmt: skip
        ids, values, rows = ids[known], values[known], rows[known]
    return Candidates(user, ids, values, rows, unknown, merged)
