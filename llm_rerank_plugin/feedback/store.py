"""Durable feedback storage: an append-only per-store event log plus one folded state per user."""

from __future__ import annotations

import abc
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .events import FeedbackEvent, parse_event


@dataclass(frozen=True, eq=False)
class UserState:
    """Feedback folded into vectors for one user.

    pos, neg: (d,) float32 accumulators of liked / disliked directions (norms <= FusionParams.max_norm).
    aspect_bias: (J,) float32 additive per-aspect gate bias for the scorer.
    last_seq: highest log seq folded in (0 = none). n_events: events folded (neutral ones included).
    n_skipped: events skipped because their item had no vector.
    The arrays are read-only float32 copies, so a state can be shared and never changes under a reader.
    """

    pos: np.ndarray
    neg: np.ndarray
    aspect_bias: np.ndarray
    last_seq: int = 0
    n_events: int = 0
    n_skipped: int = 0

    def __post_init__(self) -> None:
        for name in ("pos", "neg", "aspect_bias"):
            arr = np.array(getattr(self, name), dtype=np.float32)
            if arr.ndim != 1 or not np.isfinite(arr).all():
                raise ValueError(f"UserState.{name} must be a finite 1-D array, got shape {arr.shape}")
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)
        if self.pos.shape != self.neg.shape:
            raise ValueError(
                f"UserState.pos {self.pos.shape} and .neg {self.neg.shape} must have equal shape"
            )

    @property
    def dim(self) -> int:
        return int(self.pos.shape[0])

    @property
    def n_aspects(self) -> int:
        return int(self.aspect_bias.shape[0])


class UserStateStore(abc.ABC):
    """What a feedback backend (SQLite here; Redis or a SQL server later) must guarantee.

    - append(event): validates; durable once it returns; True if new, False if event_id was already stored.
    - events(user_id, after_seq): that user's events with seq > after_seq, ascending seq.
    - put_state: compare-and-set on last_seq, so a state never moves backwards.
    """

    @abc.abstractmethod
    def append(self, event: FeedbackEvent | dict[str, Any]) -> bool: ...

    @abc.abstractmethod
    def events(self, user_id: str, after_seq: int = 0) -> list[tuple[int, FeedbackEvent]]: ...

    @abc.abstractmethod
    def get_state(self, user_id: str) -> UserState | None: ...

    @abc.abstractmethod
    def put_state(self, user_id: str, state: UserState) -> bool:
        """Store `state` unless the stored one has a higher last_seq; return whether it was written."""

    def close(self) -> None:  # noqa: B027 - optional hook: backends without resources need not override
        """Release connections; the store is unusable afterwards."""

    def __enter__(self) -> UserStateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_SCHEMA = """
CREATE TABLE IF NOT EXISTS feedback_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    user_id TEXT NOT NULL,
    payload TEXT NOT NULL CHECK (json_valid(payload)),
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS feedback_events_user_seq ON feedback_events (user_id, seq);
CREATE TABLE IF NOT EXISTS user_state (
    user_id TEXT PRIMARY KEY,
    dim INTEGER NOT NULL,
    n_aspects INTEGER NOT NULL,
    pos BLOB NOT NULL,
    neg BLOB NOT NULL,
    aspect_bias BLOB NOT NULL,
    last_seq INTEGER NOT NULL,
    n_events INTEGER NOT NULL,
    n_skipped INTEGER NOT NULL,
    updated_at REAL NOT NULL
);
"""

_PUT_STATE = """
INSERT INTO user_state VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (user_id) DO UPDATE SET
    dim = excluded.dim, n_aspects = excluded.n_aspects, pos = excluded.pos, neg = excluded.neg,
    aspect_bias = excluded.aspect_bias, last_seq = excluded.last_seq, n_events = excluded.n_events,
    n_skipped = excluded.n_skipped, updated_at = excluded.updated_at
WHERE excluded.last_seq >= user_state.last_seq
"""


class SQLiteUserStateStore(UserStateStore):
    """UserStateStore on one SQLite file, safe for many threads and processes at once.

    WAL lets readers run beside the single writer; synchronous=FULL fsyncs every commit, so a returned
    append survives a crash or power loss; busy_timeout makes concurrent writers queue instead of failing.
    Each statement runs in autocommit mode, i.e. is its own transaction.
    """

    def __init__(self, path: str | os.PathLike[str], busy_timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        self._timeout = float(busy_timeout_s)
        self._closed = False
        self._reset_connections()
        self._conn().executescript(_SCHEMA)

    def _reset_connections(self) -> None:
        self._pid = os.getpid()
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: list[sqlite3.Connection] = []

    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise RuntimeError(f"SQLiteUserStateStore({str(self.path)!r}) is closed")
        if os.getpid() != self._pid:
            # Forked child: SQLite connections must not cross fork(), so open fresh ones here.
            self._reset_connections()
        conn = getattr(self._local, "conn", None)
        if conn is None:
            # check_same_thread=False only so close() can close every thread's connection.
            conn = sqlite3.connect(
                self.path, timeout=self._timeout, isolation_level=None, check_same_thread=False
            )
            conn.execute(f"PRAGMA busy_timeout = {int(self._timeout * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def append(self, event: FeedbackEvent | dict[str, Any]) -> bool:
        ev = parse_event(event)  # raises InvalidFeedbackEvent before anything is written
        cur = self._conn().execute(
            "INSERT OR IGNORE INTO feedback_events (event_id, user_id, payload, received_at) "
            "VALUES (?, ?, ?, ?)",
            (ev.event_id, ev.user_id, ev.model_dump_json(), time.time()),
        )
        return cur.rowcount == 1

    def events(self, user_id: str, after_seq: int = 0) -> list[tuple[int, FeedbackEvent]]:
        rows = self._conn().execute(
            "SELECT seq, payload FROM feedback_events WHERE user_id = ? AND seq > ? ORDER BY seq",
            (str(user_id), int(after_seq)),
        )
        # Read back as logged: checks added after an event was written must not make an old log unreadable.
        logged = {"logged": True}
        return [(seq, FeedbackEvent.model_validate_json(payload, context=logged)) for seq, payload in rows]

    def get_state(self, user_id: str) -> UserState | None:
        row = (
            self._conn()
            .execute(
                "SELECT dim, n_aspects, pos, neg, aspect_bias, last_seq, n_events, n_skipped "
                "FROM user_state WHERE user_id = ?",
                (str(user_id),),
            )
            .fetchone()
        )
        if row is None:
            return None
        dim, n_aspects, pos, neg, bias, last_seq, n_events, n_skipped = row
        pos, neg, bias = (np.frombuffer(b, dtype="<f4") for b in (pos, neg, bias))
        if pos.shape != (dim,) or neg.shape != (dim,) or bias.shape != (n_aspects,):
            raise ValueError(f"corrupt state row for user {user_id!r}: blob sizes do not match dim/n_aspects")
        return UserState(pos, neg, bias, last_seq=last_seq, n_events=n_events, n_skipped=n_skipped)

    def put_state(self, user_id: str, state: UserState) -> bool:
        blobs = [a.astype("<f4").tobytes() for a in (state.pos, state.neg, state.aspect_bias)]
        cur = self._conn().execute(
            _PUT_STATE,
            (str(user_id), state.dim, state.n_aspects, *blobs, int(state.last_seq), int(state.n_events),
             int(state.n_skipped), time.time()),
        )  # fmt: skip
        return cur.rowcount == 1

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if os.getpid() == self._pid:  # a forked child's inherited connections belong to the parent
            with self._lock:
                for conn in self._all:
                    conn.close()
                self._all.clear()

    def __repr__(self) -> str:
        return f"SQLiteUserStateStore({str(self.path)!r})"
