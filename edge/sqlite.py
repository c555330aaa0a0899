"""One SQLite connection in WAL mode, owned by a store and shared between its threads under a lock.

The outbox, the traceability store and the dialogue store build on it; errors are raised as the store's own error class
and name the database file."""
from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import EdgeError


class SqliteStore:
    error: type[EdgeError] = EdgeError
    label = "database"  # what the errors call it: "outbox", "dialogue"

    def __init__(self, path: str | Path, schema: str):
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn: sqlite3.Connection | None = sqlite3.connect(
                str(self.path), check_same_thread=False, isolation_level=None)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.executescript(schema)
        except (sqlite3.Error, OSError) as exc:
            raise self.error(f"cannot open {self.label} database {self.path}: {exc}") from exc

    def close(self) -> None:
        """Close the database connection; further use raises the store's error."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _execute(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._lock:
            try:
                return self._connection().execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise self.error(f"{self.label} database {self.path}: {exc}") from exc

    def _execute_nowait(self, sql: str, params: tuple = (), wait_s: float = 0.2) -> list[tuple] | None:
        """`_execute`, or None when another thread holds the connection for longer than `wait_s` (a
        write waiting on a locked database): for readers that must not stall, such as a health check."""
        if not self._lock.acquire(timeout=wait_s):
            return None
        try:
            return self._connection().execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise self.error(f"{self.label} database {self.path}: {exc}") from exc
        finally:
            self._lock.release()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """The connection inside BEGIN ... COMMIT, rolled back if the block raises."""
        with self._lock:
            conn = self._connection()
            try:
                conn.execute("BEGIN")
                yield conn
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                conn.execute("ROLLBACK")
                raise self.error(f"{self.label} database {self.path}: {exc}") from exc
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise self.error(f"{self.label} database {self.path} is closed")
        return self._conn
