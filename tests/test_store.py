"""Traceability store (real SQLite, real files) and the score queue's drop policy."""
import time
from pathlib import Path

import numpy as np
import pytest

from edge.line.pipeline import Part, PartQueue
from edge.line.sources import Frame
from edge.line.store import StoreError, TraceStore

SUMMARY = {"verdict": "anomalous", "score": 2.0, "threshold": 1.0, "regions": [{"x": 1}]}


def add(store: TraceStore, part_id: str, t: float, with_files: bool = True) -> None:
    images = {"image": np.full((64, 64, 3), 128, np.uint8), "mask": np.zeros((64, 64), np.uint8)}
    files = store.write_files(part_id, t, images) if with_files else (None, 0)
    store.add_part(part_id, "s1", t, "free_run", SUMMARY, "m", {"summary": "x"}, files)


def test_retention_by_age_deletes_rows_and_files(tmp_path):
    store = TraceStore(tmp_path, retention_days=1)
    now = time.time()
    add(store, "old", now - 2 * 86400)
    add(store, "new", now)
    old_files = store.get("old")["files"]
    assert store.enforce_retention(now) == 1
    assert store.count() == 1 and store.get("new")["files"]
    assert not any(Path(p).exists() for p in old_files.values())
    with pytest.raises(StoreError, match="no part with id 'old'"):
        store.get("old")


def test_rows_survive_a_reopen_and_feedback_is_recorded(tmp_path):
    store = TraceStore(tmp_path)
    add(store, "p1", time.time())
    store.close()
    store = TraceStore(tmp_path)
    row = store.set_feedback("p1", "defect", "jane", "confirmed at the bench")
    assert (row["feedback"], row["feedback_by"], row["feedback_note"]) == ("defect", "jane", "confirmed at the bench")
    with pytest.raises(StoreError, match="label 'meh'"):
        store.set_feedback("p1", "meh", "jane")
    assert store.files_bytes > 0  # counted again from the rows at open


def test_a_file_that_cannot_be_written_still_records_the_part(tmp_path):
    store = TraceStore(tmp_path)
    (tmp_path / "parts" / "2020-01-01").write_text("a file where a folder should be")
    files = store.write_files("p1", 1577880000.0, {"image": np.zeros((8, 8), np.uint8)})  # 2020-01-01
    assert files == (None, 0) and store.write_errors == 1
    store.add_part("p1", "s1", 1577880000.0, "free_run", SUMMARY, "m", None, files)
    assert store.get("p1")["files"] == {}


def part(i: int) -> Part:
    return Part(f"p{i}", Frame(np.zeros((2, 2), np.uint8), 0.0, i), "free_run")


def test_a_full_queue_drops_the_oldest_free_run_frame_and_never_a_triggered_part():
    q = PartQueue(3)
    q.put(part(0), droppable=True)
    q.put(part(1), droppable=False)
    q.put(part(2), droppable=True)
    q.put(part(3), droppable=True)       # full: p0 (oldest droppable) goes
    q.put(part(4), droppable=False)      # triggered: always enters, over the bound
    assert q.dropped == 1
    assert [p.part_id for p in q.get_batch(10, 0.1)] == ["p1", "p2", "p3", "p4"]
    for i in range(3):
        q.put(part(10 + i), droppable=False)
    q.put(part(20), droppable=True)      # full of triggered parts: the new frame is the one dropped
    assert q.dropped == 2 and len(q) == 3
