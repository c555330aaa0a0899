"""Dialogue sessions about flagged parts, in SQLite, so a technician can come back after a restart.

One session per part id: the part's findings (JSON, the facts every answer is grounded in), optional
AnomalyGPT embeddings, a status (pending until the first explanation is written, then done or failed)
and the turns, in order. One connection, WAL mode, shared between threads under a lock (edge.sqlite).
It stores what it is given: it writes no answer and runs no model.
"""
from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge.errors import EdgeError
from edge.sqlite import SqliteStore

STATUSES = ("pending", "done", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    part_id    TEXT PRIMARY KEY,
    findings   TEXT NOT NULL,
    embeddings BLOB,
    status     TEXT NOT NULL,
    error      TEXT,
    created    REAL NOT NULL,
    updated    REAL NOT NULL,
    crashes    INTEGER NOT NULL DEFAULT 0,
    reported   INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS sessions_status ON sessions (status, created);
CREATE TABLE IF NOT EXISTS turns (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    part_id TEXT NOT NULL REFERENCES sessions (part_id) ON DELETE CASCADE,
    role    TEXT NOT NULL,
    text    TEXT NOT NULL,
    time    REAL NOT NULL,
    meta    TEXT
);
CREATE INDEX IF NOT EXISTS turns_part ON turns (part_id, seq);
"""


class DialogueError(EdgeError):
    """The dialogue database cannot be opened or used, or a session is missing."""


@dataclass
class Turn:
    role: str        # "user" or "assistant"
    text: str
    time: float      # unix seconds
    meta: dict = field(default_factory=dict)


@dataclass
class Session:
    part_id: str
    findings: dict
    status: str
    created: float
    updated: float
    error: str | None = None
    embeddings: tuple[np.ndarray, np.ndarray] | None = None  # AnomalyGPT: (image rows, prompt rows)
    turns: list[Turn] = field(default_factory=list)

    def exchanges(self) -> list[tuple[str, str]]:
        """(question, answer) pairs so far."""
        out, question = [], None
        for t in self.turns:
            if t.role == "user":
                question = t.text
            elif question is not None:
                out.append((question, t.text))
                question = None
        return out


class DialogueStore(SqliteStore):
    """SQLite sessions keyed by part id; safe to share between threads."""

    error = DialogueError
    label = "dialogue"

    def __init__(self, path: str | Path):
        super().__init__(path, _SCHEMA)
        columns = {r[1] for r in self._execute("PRAGMA table_info(sessions)")}
        if "crashes" not in columns:  # databases written before the LLM ran in its own process
            self._execute("ALTER TABLE sessions ADD COLUMN crashes INTEGER NOT NULL DEFAULT 0")
        if "reported" not in columns:  # written before the handover was recorded: what is there was handed over
            self._execute("ALTER TABLE sessions ADD COLUMN reported INTEGER NOT NULL DEFAULT 1")

    def open_session(self, part_id: str, findings: dict, embeddings: tuple[np.ndarray, np.ndarray] | None = None
                     ) -> None:
        """Start (or restart, forgetting earlier turns) the session of a part, status pending."""
        if not part_id or not isinstance(part_id, str):
            raise DialogueError(f"dialogue {self.path}: part_id must be a non-empty string, got {part_id!r}")
        try:
            doc = json.dumps(findings, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise DialogueError(f"dialogue {self.path}: findings of part {part_id} are not JSON-ready: {e}") from None
        blob = _pack_embeddings(embeddings) if embeddings is not None else None
        now = time.time()
        with self._transaction() as conn:
            conn.execute("DELETE FROM turns WHERE part_id = ?", (part_id,))
            conn.execute("INSERT OR REPLACE INTO sessions (part_id, findings, embeddings, status, error, created, "
                         "updated, crashes, reported) VALUES (?, ?, ?, 'pending', NULL, ?, ?, 0, 0)",
                         (part_id, doc, blob, now, now))

    def get(self, part_id: str) -> Session | None:
        rows = self._execute("SELECT part_id, findings, embeddings, status, error, created, updated FROM sessions "
                             "WHERE part_id = ?", (part_id,))
        if not rows:
            return None
        pid, findings, blob, status, error, created, updated = rows[0]
        turns = [Turn(r[0], r[1], r[2], json.loads(r[3]) if r[3] else {}) for r in self._execute(
            "SELECT role, text, time, meta FROM turns WHERE part_id = ? ORDER BY seq", (part_id,))]
        return Session(pid, json.loads(findings), status, created, updated, error,
                       _unpack_embeddings(blob) if blob is not None else None, turns)

    def session(self, part_id: str) -> Session:
        """The session, or DialogueError naming the part."""
        s = self.get(part_id)
        if s is None:
            raise DialogueError(f"no dialogue session for part {part_id!r} in {self.path}")
        return s

    def add_turn(self, part_id: str, role: str, text: str, meta: dict | None = None) -> None:
        if role not in ("user", "assistant"):
            raise DialogueError(f"turn role must be 'user' or 'assistant', got {role!r}")
        now = time.time()
        try:
            self._execute("INSERT INTO turns (part_id, role, text, time, meta) VALUES (?, ?, ?, ?, ?)",
                          (part_id, role, text, now, json.dumps(meta) if meta else None))
        except DialogueError as e:
            if self.get(part_id) is None:
                raise DialogueError(f"no dialogue session for part {part_id!r} in {self.path}") from None
            raise e
        self._execute("UPDATE sessions SET updated = ? WHERE part_id = ?", (now, part_id))

    def set_status(self, part_id: str, status: str, error: str | None = None) -> None:
        if status not in STATUSES:
            raise DialogueError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
        self._execute("UPDATE sessions SET status = ?, error = ?, updated = ? WHERE part_id = ?",
                      (status, error, time.time(), part_id))

    def record_crash(self, part_id: str, reason: str) -> int:
        """One more explanation attempt of this part was lost to a crash of the LLM process (kept across
        restarts, so a part that crashes the engine cannot crash-loop it); returns how many so far."""
        with self._transaction() as conn:
            conn.execute("UPDATE sessions SET crashes = crashes + 1, error = ?, updated = ? WHERE part_id = ?",
                         (reason, time.time(), part_id))
            row = conn.execute("SELECT crashes FROM sessions WHERE part_id = ?", (part_id,)).fetchone()
        return int(row[0]) if row else 0

    def first_explanation(self, part_id: str) -> dict | None:
        """What the part's first explanation handed over (status done: the answer and its source, tokens and
        compute time; failed: the error), from the stored session; None while it is pending or unknown."""
        session = self.get(part_id)
        if session is None or session.status == "pending":
            return None
        if session.status == "failed":
            return {"status": "failed", "error": session.error, "answer": None}
        answer = next((t for t in reversed(self.session(part_id).turns) if t.role == "assistant"), None)
        meta = answer.meta if answer is not None else {}
        return {"status": "done", "answer": answer.text if answer is not None else None, "source": meta.get("source"),
                "n_tokens": meta.get("n_tokens"), "compute_ms": meta.get("compute_ms")}

    def mark_reported(self, part_id: str) -> None:
        """The part's first explanation (done or failed) was handed to the line."""
        self._execute("UPDATE sessions SET reported = 1 WHERE part_id = ?", (part_id,))

    def unreported(self, limit: int = 1000) -> list[str]:
        """Parts whose first explanation was written but not handed to the line (the process died between
        the two), oldest first."""
        rows = self._execute("SELECT part_id FROM sessions WHERE status IN ('done', 'failed') AND reported = 0 "
                             "ORDER BY updated LIMIT ?", (int(limit),))
        return [r[0] for r in rows]

    def pending(self, limit: int = 16, exclude: set[str] | frozenset = frozenset()) -> list[str]:
        """Part ids still waiting for their explanation, oldest first."""
        rows = self._execute("SELECT part_id FROM sessions WHERE status = 'pending' ORDER BY created LIMIT ?",
                             (int(limit) + len(exclude),))
        return [r[0] for r in rows if r[0] not in exclude][:limit]

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(STATUSES, 0)
        out.update({s: n for s, n in self._execute("SELECT status, COUNT(*) FROM sessions GROUP BY status", ())})
        return out


def _pack_embeddings(embeddings) -> bytes:
    try:
        image, prompts = embeddings
    except (TypeError, ValueError):
        raise DialogueError("embeddings must be a pair (image rows, prompt rows)") from None
    buf = io.BytesIO()
    np.savez(buf, image=np.asarray(image, np.float32), prompts=np.asarray(prompts, np.float32))
    return buf.getvalue()


def _unpack_embeddings(blob: bytes) -> tuple[np.ndarray, np.ndarray]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        return z["image"], z["prompts"]
