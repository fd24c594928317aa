import os
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from llm_rerank_plugin.feedback import (
    FeedbackEvent,
    InvalidFeedbackEvent,
    SQLiteUserStateStore,
    UserState,
    UserStateStore,
)

REPO = Path(__file__).resolve().parents[1]
WRITER = [sys.executable, str(REPO / "tests" / "feedback_writer.py")]


@pytest.fixture
def store(tmp_path):
    with SQLiteUserStateStore(tmp_path / "fb.db") as s:
        yield s


def click(event_id, user="u1", item="i1"):
    return {"event_id": event_id, "user_id": user, "kind": "click", "item_id": item}


def all_event_ids(path):
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        return [r[0] for r in conn.execute("SELECT event_id FROM feedback_events ORDER BY seq")]


def state(last_seq, d=4, j=3, fill=0.0):
    return UserState(np.full(d, fill), np.full(d, -fill), np.arange(j), last_seq=last_seq, n_events=last_seq)


def test_is_a_user_state_store_with_durable_pragmas(store):
    assert isinstance(store, UserStateStore)
    conn = store._conn()
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert conn.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] >= 1000


def test_append_and_read_back_in_seq_order_per_user(store):
    assert store.append(click("a", item=1))
    assert store.append(FeedbackEvent(event_id="b", user_id="u2", kind="like", item_id="2"))
    assert store.append({"event_id": "c", "user_id": "u1", "kind": "text", "text": "less horror"})
    got = store.events("u1")
    assert [e.event_id for _, e in got] == ["a", "c"]
    assert got[0][1].item_id == "1" and got[1][1].text == "less horror"
    seqs = [s for s, _ in got]
    assert seqs == sorted(seqs)
    assert [e.event_id for _, e in store.events("u1", after_seq=seqs[0])] == ["c"]
    assert store.events("nobody") == []


def test_duplicate_event_id_is_stored_once(store):
    assert store.append(click("dup")) is True
    assert store.append(click("dup", item="other")) is False
    assert [(e.event_id, e.item_id) for _, e in store.events("u1")] == [("dup", "i1")]


def test_malformed_event_raises_and_writes_nothing(store):
    store.append(click("ok"))
    for bad in [click("x", item=None), {"event_id": "y", "user_id": "u1", "kind": "rating", "item_id": "1"}]:
        with pytest.raises(InvalidFeedbackEvent):
            store.append(bad)
    assert all_event_ids(store.path) == ["ok"]


def test_state_round_trip(store):
    assert store.get_state("u1") is None
    rng = np.random.default_rng(0)
    s = UserState(rng.normal(size=384), rng.normal(size=384), rng.normal(size=4), 7, 6, 1)
    assert store.put_state("u1", s)
    got = store.get_state("u1")
    for name in ("pos", "neg", "aspect_bias"):
        assert getattr(got, name).dtype == np.float32
        np.testing.assert_array_equal(getattr(got, name), getattr(s, name))
    assert (got.last_seq, got.n_events, got.n_skipped) == (7, 6, 1)
    assert store.get_state("u2") is None


def test_put_state_never_moves_backwards(store):
    assert store.put_state("u1", state(5, fill=0.5))
    assert not store.put_state("u1", state(3, fill=0.1))
    got = store.get_state("u1")
    assert got.last_seq == 5 and got.pos[0] == pytest.approx(0.5)
    assert store.put_state("u1", state(5, fill=0.5))  # same seq: idempotent rewrite allowed
    assert store.put_state("u1", state(9, fill=0.9))
    assert store.get_state("u1").last_seq == 9


def test_concurrent_put_state_keeps_the_highest_seq(store):
    seqs = np.random.default_rng(1).permutation(60) + 1

    def worker(part):
        for s in part:
            store.put_state("u1", state(int(s), fill=float(s)))

    threads = [threading.Thread(target=worker, args=(seqs[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = store.get_state("u1")
    assert got.last_seq == 60 and got.pos[0] == 60.0


def test_closed_store_refuses_use(tmp_path):
    s = SQLiteUserStateStore(tmp_path / "c.db")
    s.close()
    s.close()
    with pytest.raises(RuntimeError, match="closed"):
        s.append(click("a"))


def _start_writer(db, prefix, count, n_shared=0):
    return subprocess.Popen(
        [*WRITER, str(db), prefix, str(count), str(n_shared)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )


def _wait_ready(proc):
    line = proc.stdout.readline()
    assert line == "ready\n", f"writer failed to start: {line!r} {proc.stderr.read()}"


def test_concurrent_threads_and_processes_store_every_event_once(tmp_path):
    db = tmp_path / "conc.db"
    n_proc, n_thread, per_writer, n_shared = 3, 4, 30, 10
    with SQLiteUserStateStore(db) as s:
        procs = [_start_writer(db, f"p{i}", per_writer, n_shared) for i in range(n_proc)]
        for p in procs:
            _wait_ready(p)
        go = threading.Barrier(n_thread + 1)
        dup_results = []

        def thread_writer(t):
            go.wait()
            for i in range(per_writer):
                assert s.append(click(f"t{t}-{i}", item=i))
            dup_results.extend(s.append(click(f"shared-{i}")) for i in range(n_shared))

        threads = [threading.Thread(target=thread_writer, args=(t,)) for t in range(n_thread)]
        for t in threads:
            t.start()
        for p in procs:  # release the processes while the threads are writing
            p.stdin.write("go\n")
            p.stdin.flush()
        go.wait()
        for t in threads:
            t.join()
        for p in procs:
            out, err = p.communicate(timeout=120)  # hang guard only
            assert p.returncode == 0, err
            assert len(out.split()) == per_writer + n_shared  # every append acknowledged
        ids = all_event_ids(db)
    expected = {f"p{i}-{k}" for i in range(n_proc) for k in range(per_writer)}
    expected |= {f"t{t}-{k}" for t in range(n_thread) for k in range(per_writer)}
    expected |= {f"shared-{k}" for k in range(n_shared)}
    assert len(ids) == len(set(ids)) and set(ids) == expected


def test_acknowledged_events_survive_sigkill(tmp_path):
    db = tmp_path / "kill.db"
    SQLiteUserStateStore(db).close()
    proc = _start_writer(db, "k", 1_000_000)  # far more than it can write before being killed
    try:
        _wait_ready(proc)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        acked = [proc.stdout.readline() for _ in range(40)]
        assert all(line.endswith("\n") for line in acked), proc.stderr.read()
        os.kill(proc.pid, signal.SIGKILL)
        rest = proc.stdout.read()  # lines printed before the kill are acknowledged too
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL  # killed mid-burst, not finished
    acked_ids = [line.strip() for line in acked] + [line for line in rest.split("\n")[:-1]]
    with SQLiteUserStateStore(db) as s:
        stored = {e.event_id for _, e in s.events("u1")}
    assert set(acked_ids) <= stored
    assert len(stored) - len(acked_ids) <= 1  # at most the one committed but not yet printed
    assert all_event_ids(db)  # integrity_check ok after the crash
