"""edge.explain.dialogue: sessions survive a restart, turns stay in order, pending parts come back oldest first."""
import sqlite3

import numpy as np
import pytest

from edge.explain.dialogue import DialogueError, DialogueStore

FINDINGS = {"verdict": "anomalous", "score": 0.7, "threshold": 0.5, "severity": 1.4, "regions": []}


def test_session_and_turns_survive_reopening_the_database(tmp_path):
    db = tmp_path / "d" / "dialogue.sqlite"
    image, prompts = np.random.default_rng(0).standard_normal((2, 1, 8)).astype(np.float32)
    with DialogueStore(db) as store:
        store.open_session("part-1", FINDINGS, embeddings=(image, prompts[0][None].repeat(3, 0)))
        store.add_turn("part-1", "user", "Is there an anomaly in the image?")
        store.add_turn("part-1", "assistant", "Yes.", {"source": "findings"})
        store.set_status("part-1", "done")
    with DialogueStore(db) as store:
        s = store.session("part-1")
        assert s.findings == FINDINGS and s.status == "done"
        assert [(t.role, t.text) for t in s.turns] == [("user", "Is there an anomaly in the image?"),
                                                      ("assistant", "Yes.")]
        assert s.turns[1].meta == {"source": "findings"}
        assert s.exchanges() == [("Is there an anomaly in the image?", "Yes.")]
        np.testing.assert_array_equal(s.embeddings[0], image)
        assert s.embeddings[1].shape == (3, 8)
    assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_pending_parts_oldest_first_and_counts(tmp_path):
    with DialogueStore(tmp_path / "d.sqlite") as store:
        for i in range(4):
            store.open_session(f"p{i}", FINDINGS)
        store.set_status("p1", "done")
        store.set_status("p2", "failed", "LlmError: boom")
        assert store.pending() == ["p0", "p3"]
        assert store.pending(exclude={"p0"}) == ["p3"]
        assert store.counts() == {"pending": 2, "done": 1, "failed": 1}
        assert store.session("p2").error == "LlmError: boom"
        # a part scored again starts a fresh session
        store.add_turn("p1", "user", "How big is it?")
        store.open_session("p1", FINDINGS)
        s = store.session("p1")
        assert s.status == "pending" and s.turns == []


def test_misuse_is_refused_with_the_part_named(tmp_path):
    with DialogueStore(tmp_path / "d.sqlite") as store:
        with pytest.raises(DialogueError, match=r"no dialogue session for part 'ghost'"):
            store.add_turn("ghost", "user", "hello")
        with pytest.raises(DialogueError, match=r"no dialogue session for part 'ghost'"):
            store.session("ghost")
        store.open_session("p", FINDINGS)
        with pytest.raises(DialogueError, match=r"role must be 'user' or 'assistant', got 'system'"):
            store.add_turn("p", "system", "x")
        with pytest.raises(DialogueError, match=r"status must be one of pending, done, failed"):
            store.set_status("p", "maybe")
        with pytest.raises(DialogueError, match=r"findings of part q are not JSON-ready"):
            store.open_session("q", {"score": float("nan")})
    with pytest.raises(DialogueError, match=r"is closed"):
        store.get("p")
    (tmp_path / "dir.sqlite").mkdir()
    with pytest.raises(DialogueError, match=r"cannot open dialogue database .*dir\.sqlite"):
        DialogueStore(tmp_path / "dir.sqlite")
