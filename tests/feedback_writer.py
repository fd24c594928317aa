"""Subprocess helper for tests/test_feedback_store.py (not a test module).

usage: python tests/feedback_writer.py DB PREFIX COUNT [N_SHARED]

Prints "ready", waits for a line on stdin (so several writers start together), then appends COUNT events
PREFIX-0.. and N_SHARED events shared-0.. (the same ids in every writer), printing each event_id only after
append() returned, i.e. once it is acknowledged.
"""

import sys

from llm_rerank_plugin.feedback import SQLiteUserStateStore


def main() -> None:
    db, prefix, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    n_shared = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    ids = [f"{prefix}-{i}" for i in range(count)] + [f"shared-{i}" for i in range(n_shared)]
    with SQLiteUserStateStore(db) as store:
        print("ready", flush=True)
        sys.stdin.readline()
        for i, event_id in enumerate(ids):
            store.append({"event_id": event_id, "user_id": "u1", "kind": "click", "item_id": str(i % 97)})
            print(event_id, flush=True)


if __name__ == "__main__":
    main()
