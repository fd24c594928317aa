"""Feedback events: the validated unit that the store logs and the fusion step folds into a user state.

An event is checked here without knowing any catalogue: ids are non-empty strings (ints are turned into
their decimal string) with no surrounding whitespace, control characters or unpaired surrogates; the
timestamp is finite unix seconds in [0, 1e11); text has its control characters and unpaired surrogates
removed. ``OnlineReranker.record`` then normalises the ids to the reranker's id types (the request
contract, ``platform/contract.py``) and cuts the text to ``max_text_chars`` before the event is logged.
Events already in a log are read back without the range checks added since they were written, so an old
log always loads.
"""

from __future__ import annotations

import math
import re
import time
from numbers import Integral, Real
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from llm_rerank_plugin.platform.contract import (
    _BAD_ID_CHARS,
    MAX_TEXT_PHRASES,
    RequestError,
    sanitize_text,
    timestamp_problem,
)

EventKind = Literal["click", "like", "rating", "skip", "dislike", "text"]
ITEM_KINDS = frozenset({"click", "like", "rating", "skip", "dislike"})
# MovieLens ratings are half-stars from 0.5 to 5.
RATING_MIN, RATING_MAX = 0.5, 5.0


class InvalidFeedbackEvent(RequestError):
    """Validation failed; the message names each bad field, its value and the expected form."""


class FeedbackEvent(BaseModel):
    """One user action. `event_id` is the idempotency key: the store applies each id once."""

    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True, allow_inf_nan=False)

    event_id: str = Field(min_length=1)
    user_id: str = Field(min_length=1)
    kind: EventKind
    # validate_default so the per-kind checks below also run when the field is omitted.
    item_id: str | None = Field(default=None, validate_default=True)
    rating: float | None = Field(default=None, validate_default=True)
    text: str | None = Field(default=None, validate_default=True)
    timestamp: float = Field(default_factory=time.time)

    @field_validator("user_id", "item_id", mode="before")
    @classmethod
    def _int_id_to_str(cls, v: Any) -> Any:
        # MovieLens ids are ints upstream (floats with no fraction where a frame had NaNs); bool is an int
        # subclass but never a valid id.
        if isinstance(v, Integral) and not isinstance(v, bool | np.bool_):  # numpy ints from frames too
            return str(int(v))
        if (
            isinstance(v, Real)
            and not isinstance(v, bool | np.bool_)
            and math.isfinite(v)
            and float(v).is_integer()
        ):
            return str(int(v))
        return v

    @field_validator("event_id", "user_id", "item_id", mode="before")
    @classmethod
    def _exact_id(cls, v: Any, info: ValidationInfo) -> Any:
        # Ids are exact keys (str_strip_whitespace would otherwise make " 4" silently equal "4"), and
        # SQLite cannot store a str holding an unpaired surrogate.
        if isinstance(v, str) and not _logged(info) and (v != v.strip() or _BAD_ID_CHARS.search(v)):
            raise ValueError(
                "must not have surrounding whitespace, control characters or unpaired surrogates"
            )
        return v

    @field_validator("timestamp", mode="before")
    @classmethod
    def _unix_seconds(cls, v: Any, info: ValidationInfo) -> Any:
        if _logged(info):
            return v
        if isinstance(v, str):  # JSON clients may quote numbers; the range check below still applies
            try:
                v = float(v)
            except ValueError:
                raise ValueError("must be a number (unix seconds)") from None
        problem = timestamp_problem(v)
        if problem:
            raise ValueError(problem)
        return v

    @field_validator("item_id")
    @classmethod
    def _item_required(cls, v: str | None, info: ValidationInfo) -> str | None:
        kind = info.data.get("kind")
        if kind in ITEM_KINDS and not v:
            raise ValueError(f"kind={kind!r} requires a non-empty item_id (the item the user acted on)")
        return v

    @field_validator("rating")
    @classmethod
    def _rating_range(cls, v: float | None, info: ValidationInfo) -> float | None:
        if v is None and info.data.get("kind") == "rating":
            raise ValueError(
                f"kind='rating' requires a rating in [{RATING_MIN}, {RATING_MAX}] (MovieLens scale)"
            )
        if v is not None and not RATING_MIN <= v <= RATING_MAX:
            raise ValueError(f"must be in [{RATING_MIN}, {RATING_MAX}] (MovieLens star scale)")
        return v

    @field_validator("text", mode="before")
    @classmethod
    def _sanitize_text(cls, v: Any) -> Any:
        # Before pydantic's own str check, which refuses unpaired surrogates outright. Newlines separate
        # clauses (parse_text_feedback); other control characters would reach the tokenizer and the log.
        return sanitize_text(v, keep_newlines=True) if isinstance(v, str) else v

    @field_validator("text")
    @classmethod
    def _text_required(cls, v: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("kind") == "text" and not v:
            raise ValueError("kind='text' requires non-empty text (e.g. 'less horror, more comedies')")
        return v

    @property
    def polarity(self) -> int:
        """+1 (more like this), -1 (less like this) or 0 (neutral: logged, moves nothing).

        Ratings 2.5-3.5 are neutral; text is 0 because each parsed clause carries its own sign.
        """
        if self.kind in ("click", "like"):
            return 1
        if self.kind in ("skip", "dislike"):
            return -1
        if self.kind == "rating":
            assert self.rating is not None  # guaranteed by validation
            return 1 if self.rating >= 4 else -1 if self.rating <= 2 else 0
        return 0

    sign = polarity


def _logged(info: ValidationInfo) -> bool:
    """Whether the event is being read back from a log (``context={"logged": True}``)."""
    return bool(info.context and info.context.get("logged"))


def _describe(err: dict[str, Any]) -> str:
    field = ".".join(str(p) for p in err["loc"]) or "event"
    if err["type"] == "missing":
        return f"{field}: required field is missing"
    if err["type"] == "extra_forbidden":
        return f"{field}: unknown field (expected only {', '.join(FeedbackEvent.model_fields)})"
    msg = err["msg"].removeprefix("Value error, ")
    got = repr(err.get("input"))
    return f"{field}: {msg}; got {got[:80] + '...' if len(got) > 80 else got}"


def parse_event(obj: dict[str, Any] | FeedbackEvent) -> FeedbackEvent:
    """Validate a raw event (e.g. decoded JSON) into a FeedbackEvent.

    Raises InvalidFeedbackEvent listing every bad field with its value and the expected form.
    """
    if isinstance(obj, FeedbackEvent):
        return obj
    if not isinstance(obj, dict):
        raise InvalidFeedbackEvent(f"feedback event must be a dict/JSON object, got {type(obj).__name__}")
    try:
        return FeedbackEvent.model_validate(obj)
    except ValidationError as e:
        where = f" {obj.get('event_id')!r}" if isinstance(obj.get("event_id"), str) else ""
        details = "; ".join(_describe(err) for err in e.errors())
        raise InvalidFeedbackEvent(f"invalid feedback event{where}: {details}") from None


_NEGATIVE_CUES = {"less", "fewer", "no", "not", "don't", "dont", "stop", "without", "avoid", "never", "hate"}
# Words that carry no content; skipped before the sign is read ("please no ...", "a bit less ...").
_PRE_SIGN_FILLER = {
    "please", "i", "i'd", "id", "we", "just", "also", "really", "maybe", "so", "much", "many", "too", "of",
    "the", "a", "an", "bit", "little", "lot", "lots", "some", "any", "with",
}  # fmt: skip
# Positive-intent words: stripped with the fillers after the sign is read.
_LEADING_FILLER = _PRE_SIGN_FILLER | {
    "more", "want", "like", "love", "prefer", "show", "showing", "me", "give", "recommend", "recommending",
}  # fmt: skip
_TRAILING_FILLER = {"please", "thanks", "thank", "you", "pls"}
_CLAUSE_SPLIT = re.compile(r"[,;\n]|\s+(?:and|but)\s+")


def parse_text_feedback(text: str, max_phrases: int = MAX_TEXT_PHRASES) -> list[tuple[int, str]]:
    """Split a free-text request into signed phrases (at most ``max_phrases``; later clauses are ignored,
    so one long text costs a bounded number of encoder passes).

    "less horror, more 80s comedies" -> [(-1, "horror"), (1, "80s comedies")]. Clauses split on commas,
    semicolons, newlines, " and " and " but "; a clause is -1 when its first word (after fillers such as
    "please"/"i") is a negative cue (less, fewer, no, not, don't, stop, without, avoid, never, hate), else
    +1. Cue and filler words are stripped from the ends; clauses left empty are dropped. Deliberately
    simple: "rock and roll" is split in two, and negation inside a clause ("more not-scary") is not seen.
    """
    if not isinstance(text, str):
        raise TypeError(f"text feedback must be a str, got {type(text).__name__}")
    if max_phrases < 1:
        raise ValueError(f"max_phrases must be >= 1, got {max_phrases!r}")
    out: list[tuple[int, str]] = []
    for clause in _clauses(sanitize_text(text, keep_newlines=True).lower().replace("\u2019", "'")):
        if len(out) >= max_phrases:
            break
        words = [w.strip('.!?"()') for w in clause.split()]
        words = [w for w in words if w]
        while words and words[0] in _PRE_SIGN_FILLER:
            words.pop(0)
        sign = -1 if words and words[0] in _NEGATIVE_CUES else 1
        while words and (words[0] in _NEGATIVE_CUES or words[0] in _LEADING_FILLER):
            words.pop(0)
        while words and words[-1] in _TRAILING_FILLER:
            words.pop()
        if words:
            out.append((sign, " ".join(words)))
    return out


def _clauses(text: str):
    """The clauses of ``text`` (``_CLAUSE_SPLIT``), lazily: a long text is only scanned as far as needed."""
    start = 0
    for match in _CLAUSE_SPLIT.finditer(text):
        yield text[start : match.start()]
        start = match.end()
    yield text[start:]
