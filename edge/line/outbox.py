"""Durable outbox: outgoing messages wait in SQLite until the broker acknowledges them.

One connection, owned by the `Outbox`, in WAL mode (edge.sqlite). Rows keep an autoincrement sequence so
the sender replays them in the order they were put, also after a process restart. Each message
carries a uuid4 `message_id`; dict payloads get it injected so subscribers can de-duplicate
the redeliveries a reconnect may cause (delivery is at least once).

Owns the outbox table and its order. Must not talk to the broker (edge.line.publish does).
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from edge.errors import EdgeError
from edge.sqlite import SqliteStore

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id TEXT    NOT NULL UNIQUE,
    topic      TEXT    NOT NULL,
    payload    BLOB    NOT NULL,
    qos        INTEGER NOT NULL,
    retain     INTEGER NOT NULL,
    created    REAL    NOT NULL
)
"""


class OutboxError(EdgeError):
    """The outbox database cannot be opened or used, or a message is invalid."""


@dataclass(frozen=True)
class Message:
    """One stored outgoing message."""

    seq: int
    message_id: str
    topic: str
    payload: bytes
    qos: int
    retain: bool
    created: float


class Outbox(SqliteStore):
    """SQLite-backed FIFO of outgoing MQTT messages; safe to share between threads."""

    error = OutboxError
    label = "outbox"

    def __init__(self, path: str | Path):
        super().__init__(path, _SCHEMA)

    def put(self, topic: str, payload: bytes | str | dict, qos: int = 1, retain: bool = False,
            message_id: str | None = None) -> str:
        """Store a message and return its message id. Putting a message id that is already waiting
        is a no-op, so a producer can safely re-put what it is not sure it put."""
        if not topic or not isinstance(topic, str):
            raise OutboxError(f"outbox {self.path}: topic must be a non-empty string, got {topic!r}")
        if qos not in (0, 1, 2):
            raise OutboxError(f"outbox {self.path}: qos must be 0, 1 or 2, got {qos!r}")
        message_id = message_id or uuid.uuid4().hex
        if isinstance(payload, dict):
            body = json.dumps({**payload, "message_id": message_id}).encode()
        elif isinstance(payload, str):
            body = payload.encode()
        elif isinstance(payload, (bytes, bytearray, memoryview)):
            body = bytes(payload)
        else:
            raise OutboxError(
                f"outbox {self.path}: payload must be bytes, str or dict, got {type(payload).__name__}"
            )
        self._execute(
            "INSERT OR IGNORE INTO outbox (message_id, topic, payload, qos, retain, created) VALUES (?, ?, ?, ?, ?, ?)",
            (message_id, topic, body, qos, int(bool(retain)), time.time()),
        )
        return message_id

    def pending(self, limit: int = 100) -> list[Message]:
        """The oldest `limit` unsent messages, oldest first."""
        rows = self._execute(
            "SELECT seq, message_id, topic, payload, qos, retain, created FROM outbox ORDER BY seq LIMIT ?",
            (int(limit),),
        )
        return [Message(r[0], r[1], r[2], bytes(r[3]), r[4], bool(r[5]), r[6]) for r in rows]

    def mark_sent(self, message_id: str) -> None:
        """Forget a message the broker has acknowledged."""
        self._execute("DELETE FROM outbox WHERE message_id = ?", (message_id,))

    def size(self) -> int:
        """Number of messages still waiting."""
        return self._execute("SELECT COUNT(*) FROM outbox", ())[0][0]
