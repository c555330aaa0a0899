"""One SQLite connection in WAL mode, shared by threads under a lock, with errors that name the file.

The outbox, the traceability store and the dialogue sessions each own one of these.
"""
from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from .errors import EdgeError


class Database:
    def __init__(self, path: str | Path, schema: str, error: type[EdgeError] = EdgeError, what: str = "database"):
        self.path = Path(path)
        self.error, self.what = error, what
        self.lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn: sqlite3.Connection | None = sqlite3.connect(str(self.path), check_same_thread=False,
                                                                    isolation_level=None)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.executescript(schema)
        except (sqlite3.Error, OSError) as e:
            raise error(f"cannot open {what} {self.path}: {e}") from e

    def execute(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self.lock:
            if self._conn is None:
                raise self.error(f"{self.what} {self.path} is closed")
            try:
                return self._conn.execute(sql, params).fetchall()
            except sqlite3.Error as e:
                raise self.error(f"{self.what} {self.path}: {e}") from e

    def close(self) -> None:
        with self.lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
