"""One SQLite connection in WAL mode, owned by a store and shared between its threads under a lock.

The outbox, the traceability store and the dialogue store build on it; errors are raised as the store's own error class
and name the database file."""
from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from edge.errors import EdgeError


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
            self._not_world_readable()
        except (sqlite3.Error, OSError) as exc:
            raise self.error(f"cannot open {self.label} database {self.path}: {exc}") from exc

    def _not_world_readable(self) -> None:
        """Part rows, dialogues and queued messages are the plant's records: the database and its WAL
        and shared-memory files (SQLite gives those the database's mode) lose the bits for others
        that a umask such as 022 leaves them (0644 -> 0640)."""
        for f in self.files():
            st = f.stat()
            if st.st_mode & 0o007 and st.st_uid == os.getuid():
                os.chmod(f, st.st_mode & 0o770)

    def files(self) -> list[Path]:
        """The database file and the WAL and shared-memory files beside it, those that exist."""
        return [f for f in (self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm")) if f.exists()]

    def disk_bytes(self) -> int:
        """Bytes the database takes on disk, its WAL and shared-memory files included."""
        total = 0
        for f in self.files():
            try:
                total += f.stat().st_size
            except OSError:
                pass
        return total

    def checkpoint(self) -> bool:
        """Copy the WAL into the database and truncate it to zero bytes (the WAL otherwise keeps its
        high-water size, ~4 MB, for good); False when a reader kept it from finishing."""
        rows = self._execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return not (rows and rows[0][0])

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
                self._rollback(conn)
                raise self.error(f"{self.label} database {self.path}: {exc}") from exc
            except BaseException:
                self._rollback(conn)
                raise

    @staticmethod
    def _rollback(conn: sqlite3.Connection) -> None:
        """Roll back what is open: SQLite has already rolled back a transaction that a full disk
        (SQLITE_FULL) or an I/O error ended, and a second ROLLBACK would raise over the real error."""
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise self.error(f"{self.label} database {self.path} is closed")
        return self._conn
