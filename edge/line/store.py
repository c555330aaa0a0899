"""Traceability: a SQLite row for every part and, for the parts that need them, image files.

    <dir>/parts.sqlite                   one row per part: verdict, score, regions, findings,
                                         explanation, technician feedback, file paths
    <dir>/parts/<YYYY-MM-DD>/<part_id>/  image.png, overlay.jpg, mask.png

Retention runs by age (rows and files older than `retention_days` go) and by disk budget: image
files plus every SQLite database in the folder (parts, outbox, dialogue) with their WAL files; the
WALs are checkpointed first, then the oldest parts' files go until the folder fits (their rows stay,
marked `files_purged`). Below the free-space floor (`min_free_mb`) no image is written and old ones
go until the floor is met again; when that is not enough, `low_on_space()` tells the runtime to
refuse new parts (recorded as errors) until space returns. A file that cannot be written (disk
full, permissions) is logged and the row still lands.

Owns the parts and triggers tables (their SQL: edge.line.store_schema), the image files and the space
rules. Must not build MQTT payloads or publish: a part's messages are stored as the recorder gives them.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np

from edge.sqlite import SqliteStore
from edge.errors import EdgeError
from edge.line.store_schema import PARTS_INDEXES, PARTS_TABLE, SCHEMA

log = logging.getLogger(__name__)

FEEDBACK_LABELS = ("defect", "false_alarm")


class _BelowFloor(OSError):
    """An image not written because the free-space floor would be crossed."""


class StoreError(EdgeError):
    """The traceability database cannot be opened or a request names a part it does not hold."""


def iso_time(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class TraceStore(SqliteStore):
    """Part rows and files under one folder; one connection, shared by threads under a lock."""

    error = StoreError
    label = "traceability"

    def __init__(self, root: str | Path, retention_days: float = 30, disk_budget_mb: float = 2048,
                 min_free_mb: float = 0, free_space=None):
        self.root = Path(root)
        self.retention_days, self.disk_budget_mb, self.min_free_mb = retention_days, disk_budget_mb, min_free_mb
        # Free bytes on the store's file system; a parameter so a drill can stand for a smaller disk.
        self._free_space = free_space or self._disk_free
        self.siblings: list[SqliteStore] = []  # the other databases in the folder (outbox, dialogue): checkpointed too
        self._bytes_lock = threading.Lock()
        self._space_lock = threading.Lock()
        self.write_errors = 0
        self.images_skipped = 0   # parts whose images were not written: below the free-space floor
        self.low_space = False    # below the floor with no image file left to remove
        self.over_budget = False  # the databases alone exceed the budget (rows are never removed for it)
        self._last_room_at = 0.0
        try:
            (self.root / "parts").mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create traceability store in {self.root}: {e}") from e
        super().__init__(self.root / "parts.sqlite", SCHEMA)
        self._allow_null_score_and_threshold()
        self._files_bytes = self._sql("SELECT COALESCE(SUM(files_bytes), 0) FROM parts WHERE files_purged = 0")[0][0]

    def _allow_null_score_and_threshold(self) -> None:
        """Migrate a database made when `score` and `threshold` were NOT NULL (a part that could not be
        scored had no row then, and learn mode did not exist): SQLite cannot drop a constraint, so the
        table is rebuilt, rows kept, in one transaction."""
        columns = self._sql("PRAGMA table_info(parts)")
        if not any(name in ("score", "threshold") and notnull for _, name, _, notnull, _, _ in columns):
            return
        names = ", ".join(name for _, name, *_ in columns)
        with self._transaction() as conn:
            conn.execute("ALTER TABLE parts RENAME TO parts_before_null_score")
            conn.execute(PARTS_TABLE)
            conn.execute(f"INSERT INTO parts ({names}) SELECT {names} FROM parts_before_null_score")
            conn.execute("DROP TABLE parts_before_null_score")
            for statement in filter(str.strip, PARTS_INDEXES.split(";")):
                conn.execute(statement)
        log.info("traceability: %s migrated (parts.score and parts.threshold may be NULL: parts that could not "
                 "be scored, parts collected in learn mode)",
                 self.path)

    # -- writing ------------------------------------------------------------------------------

    def add_part(self, part_id: str, station: str, captured_at: float, trigger: str, summary: dict,
                 model_id: str, findings: dict | None = None, files: tuple[str | None, int] = (None, 0),
                 messages: list | None = None) -> None:
        """Record a scored part. `files` is what `write_files` returned. `messages` ([topic, payload]
        pairs) wait in the row until `mark_published`, so a crash between this row and the outbox is
        repaired at the next start (`unpublished`)."""
        files_dir, nbytes = files
        with self._transaction() as conn:  # the row lands and its trigger (if any) is served, together
            conn.execute(
                "INSERT OR REPLACE INTO parts (part_id, station, captured_at, trigger, verdict, score, threshold, "
                "regions, findings, latency_ms, model_id, files_dir, files_bytes, messages, published) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (part_id, station, captured_at, trigger, summary["verdict"], summary["score"], summary["threshold"],
                 json.dumps(summary.get("regions", [])), json.dumps(findings) if findings else None,
                 summary.get("latency_ms"), model_id, files_dir, nbytes, json.dumps(messages) if messages else None,
                 0 if messages else 1))
            conn.execute("DELETE FROM triggers WHERE part_id = ?", (part_id,))
        with self._bytes_lock:
            self._files_bytes += nbytes
        if self.used_bytes() > self.disk_budget_mb * 1e6 or self.over_budget:
            self.enforce_disk_budget()

    def add_trigger(self, part_id: str, request_id: str | None) -> None:
        """Make an accepted trigger durable (before it is acknowledged): it stays until the part's row
        lands (`add_part`), and `pending_triggers` hands it back after a stop or a crash."""
        self._sql("INSERT OR IGNORE INTO triggers (part_id, request_id, accepted_at) VALUES (?, ?, ?)",
                  (part_id, request_id, time.time()))

    def drop_trigger(self, part_id: str) -> None:
        """A trigger that was answered as not carried out (the source ended) is not replayed."""
        self._sql("DELETE FROM triggers WHERE part_id = ?", (part_id,))

    def pending_triggers(self) -> list[tuple[str, str | None]]:
        """(part_id, request_id) of accepted triggers with no part row yet, in the order they came."""
        return [(r[0], r[1]) for r in self._sql("SELECT part_id, request_id FROM triggers ORDER BY seq")]

    def write_files(self, part_id: str, captured_at: float, images: dict[str, np.ndarray]) -> tuple[str | None, int]:
        """Write a part's images ({"image": frame, "overlay": ..., "mask": ...}); returns (folder relative
        to the store, bytes), or (None, 0) when they could not be written."""
        day = datetime.fromtimestamp(captured_at, timezone.utc).strftime("%Y-%m-%d")
        rel = Path("parts") / day / part_id
        folder = self.root / rel
        nbytes = 0
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for name, img in images.items():
                ext = ".jpg" if name == "overlay" else ".png"
                ok, buf = cv2.imencode(ext, img, [cv2.IMWRITE_JPEG_QUALITY, 85] if ext == ".jpg" else [])
                if not ok:
                    raise OSError(f"could not encode {name}")
                if self._free_space() - buf.nbytes < self.min_free_mb * 1e6 and not self.make_room(buf.nbytes):
                    raise _BelowFloor(f"{self.free_mb():.1f} MB free, below storage.min_free_mb "
                                      f"{self.min_free_mb:g} with no older image left to remove")
                with open(folder / f"{name}{ext}", "wb") as f:
                    f.write(buf.tobytes())
                nbytes += buf.nbytes
        except _BelowFloor as e:
            self.images_skipped += 1
            if self.images_skipped == 1 or self.images_skipped % 100 == 0:
                log.error("traceability: images of part %s not written (%d parts so far): %s", part_id,
                          self.images_skipped, e)
            shutil.rmtree(folder, ignore_errors=True)
            return None, 0
        except OSError as e:
            # Losing a picture is bad; losing the part's row because of it would be worse.
            self.write_errors += 1
            log.error("traceability: could not write files of part %s to %s: %s", part_id, folder, e)
            shutil.rmtree(folder, ignore_errors=True)
            return None, 0
        return str(rel), nbytes

    def file_paths(self, files_dir: str | None) -> dict[str, str]:
        """{"image": path, "overlay": path, "mask": path} of what a part's folder holds."""
        folder = self.root / files_dir if files_dir else None
        return {p.stem: os.path.normpath(os.path.abspath(p)) for p in sorted(folder.glob("*"))} \
            if folder and folder.is_dir() else {}

    def mark_published(self, part_id: str) -> None:
        self._sql("UPDATE parts SET published = 1, messages = NULL WHERE part_id = ?", (part_id,))

    def unpublished(self) -> list[tuple[str, list]]:
        """(part_id, [[topic, payload], ...]) of parts whose messages may not have reached the outbox."""
        rows = self._sql("SELECT part_id, messages FROM parts WHERE published = 0 ORDER BY captured_at")
        return [(part_id, json.loads(m) if m else []) for part_id, m in rows]

    def set_explanation(self, part_id: str, text: str | None, status: str) -> None:
        self._sql("UPDATE parts SET explanation = COALESCE(?, explanation), explanation_status = ? WHERE part_id = ?",
                  (text, status, part_id))

    def set_explanation_waiting(self, part_id: str, status: str) -> None:
        """queued / pending / failed, unless the explanation has already arrived."""
        self._sql("UPDATE parts SET explanation_status = ? WHERE part_id = ? AND explanation IS NULL",
                  (status, part_id))

    def set_feedback(self, part_id: str, label: str, by: str, note: str | None = None) -> dict:
        if label not in FEEDBACK_LABELS:
            raise StoreError(f"feedback label {label!r} is not one of {', '.join(FEEDBACK_LABELS)}")
        if not by or not isinstance(by, str):
            raise StoreError("feedback needs who gives it ('by')")
        self.get(part_id)  # names the part when unknown
        self._sql("UPDATE parts SET feedback = ?, feedback_by = ?, feedback_at = ?, feedback_note = ? "
                  "WHERE part_id = ?", (label, by, time.time(), note, part_id))
        return self.get(part_id)

    # -- reading ------------------------------------------------------------------------------

    _COLUMNS = ("part_id", "station", "captured_at", "trigger", "verdict", "score", "threshold", "regions",
                "findings", "latency_ms", "model_id", "files_dir", "files_bytes", "files_purged", "explanation",
                "explanation_status", "feedback", "feedback_by", "feedback_at", "feedback_note", "published")

    def _row(self, r: tuple) -> dict:
        d = dict(zip(self._COLUMNS, r))
        d["regions"] = json.loads(d["regions"])
        d["findings"] = json.loads(d["findings"]) if d["findings"] else None
        d["time"] = iso_time(d["captured_at"])
        d["files_purged"] = bool(d["files_purged"])
        d["published"] = bool(d["published"])
        d["files"] = {} if d["files_purged"] else self.file_paths(d["files_dir"])
        return d

    def get(self, part_id: str) -> dict:
        rows = self._sql(f"SELECT {', '.join(self._COLUMNS)} FROM parts WHERE part_id = ?", (part_id,))
        if not rows:
            raise StoreError(f"no part with id {part_id!r} in {self.root / 'parts.sqlite'}")
        return self._row(rows[0])

    def query(self, limit: int = 20, verdict: str | None = None, since: float | None = None,
              until: float | None = None, station: str | None = None) -> list[dict]:
        """Newest first."""
        where, params = [], []
        for clause, value in (("verdict = ?", verdict), ("captured_at >= ?", since), ("captured_at <= ?", until),
                              ("station = ?", station)):
            if value is not None:
                where.append(clause)
                params.append(value)
        sql = f"SELECT {', '.join(self._COLUMNS)} FROM parts"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY captured_at DESC LIMIT ?"
        return [self._row(r) for r in self._sql(sql, (*params, int(limit)))]

    def count(self) -> int:
        self._last_count = self._sql("SELECT COUNT(*) FROM parts")[0][0]
        return self._last_count

    def count_nowait(self) -> tuple[int | None, bool]:
        """(rows, fresh): the row count, or the last one known (fresh False) while a write holds the
        database (another process has it locked): the health loop must never wait on the store."""
        rows = self._execute_nowait("SELECT COUNT(*) FROM parts")
        if rows is None:
            return getattr(self, "_last_count", None), False
        self._last_count = rows[0][0]
        return self._last_count, True

    @property
    def files_bytes(self) -> int:
        return self._files_bytes

    def db_bytes(self) -> int:
        """Every SQLite database in the folder with its WAL and shared-memory files."""
        total = 0
        for f in self.root.glob("*.sqlite*"):
            try:
                total += f.stat().st_size
            except OSError:  # a WAL removed by a checkpoint between glob and stat
                pass
        return total

    def used_bytes(self) -> int:
        """What the disk budget counts: image files and databases."""
        return self._files_bytes + self.db_bytes()

    def _disk_free(self) -> float:
        try:
            return shutil.disk_usage(self.root).free
        except OSError:  # the folder is gone or unreadable: the writes will say so themselves
            return float("inf")

    def free_mb(self) -> float:
        return self._free_space() / 1e6

    def checkpoint_all(self) -> None:
        """Truncate the WAL of this database and of the siblings (a busy one is left for next time)."""
        for store in (self, *self.siblings):
            try:
                store.checkpoint()
            except EdgeError as e:
                log.warning("traceability: checkpoint of %s failed: %s", store.path, e)

    def low_on_space(self) -> bool:
        """True while free space is below the floor and removing old image files could not lift it:
        the runtime then refuses new parts. Checks afresh each call, so it recovers by itself."""
        if self._free_space() >= self.min_free_mb * 1e6:
            if self.low_space:
                self.low_space = False
                log.warning("traceability: %.1f MB free again (floor %g MB): parts are accepted again",
                            self.free_mb(), self.min_free_mb)
            return False
        if time.monotonic() - self._last_room_at >= 1.0 or not self.low_space:
            self.make_room()
        low = self._free_space() < self.min_free_mb * 1e6
        if low and not self.low_space:
            log.error("traceability: %s has %.1f MB free, below storage.min_free_mb %g, and no image file is "
                      "left to remove: new parts are refused (recorded and published as errors) until space "
                      "returns", self.root, self.free_mb(), self.min_free_mb)
        self.low_space = low
        return low

    def make_room(self, need: int = 0) -> bool:
        """Checkpoint the databases, then remove the oldest parts' image files until `need` bytes fit
        above the free-space floor; True when they do."""
        floor = self.min_free_mb * 1e6 + need
        with self._space_lock:
            self._last_room_at = time.monotonic()
            self.checkpoint_all()
            # Whole batches of 16: the floor keeps some slack above the part that makes room (the WAL grows).
            removed = self._purge_oldest_files(lambda: self._free_space() >= floor, batch=16, stop_in_batch=False)
            if removed:
                log.warning("traceability: below the free-space floor (%g MB): removed the files of the %d "
                            "oldest parts", self.min_free_mb, removed)
                self._prune_empty_days()
            return self._free_space() >= floor

    # -- retention ----------------------------------------------------------------------------

    def enforce_retention(self, now: float | None = None) -> int:
        """Delete parts (rows and files) older than retention_days; returns how many."""
        cutoff = (now or time.time()) - self.retention_days * 86400
        old = self._sql("SELECT part_id, files_dir, files_bytes, files_purged FROM parts WHERE captured_at < ?",
                        (cutoff,))
        for part_id, files_dir, nbytes, purged in old:
            if files_dir and not purged:
                self._remove_files(files_dir, nbytes)
        self._sql("DELETE FROM parts WHERE captured_at < ?", (cutoff,))
        self._prune_empty_days()
        return len(old)

    def enforce_disk_budget(self) -> int:
        """Checkpoint the databases, then remove the oldest parts' files until files and databases fit
        the budget; returns how many parts lost files."""
        budget = self.disk_budget_mb * 1e6
        wal = sum(f.stat().st_size for f in self.root.glob("*.sqlite-wal") if f.exists())
        # A checkpoint costs a sync: at most one a second, unless the WALs are a tenth of the budget.
        if self.used_bytes() > budget and (wal > budget / 10 or time.monotonic() - self._last_room_at >= 1.0):
            self._last_room_at = time.monotonic()
            self.checkpoint_all()
        db = self.db_bytes()
        removed = self._purge_oldest_files(lambda: self._files_bytes + db <= budget, batch=64, stop_in_batch=True)
        over = self._files_bytes + db > budget
        if over and not self.over_budget:
            log.error("traceability: the databases in %s alone take %.1f MB, over storage.disk_budget_mb %g "
                      "(rows are kept; lower retention_days or raise the budget)", self.root, db / 1e6,
                      self.disk_budget_mb)
        self.over_budget = over
        if removed:
            log.info("traceability: disk budget %.0f MB reached; removed the files of the %d oldest parts",
                     self.disk_budget_mb, removed)
            self._prune_empty_days()
        return removed

    def _purge_oldest_files(self, enough, batch: int, stop_in_batch: bool) -> int:
        """Remove the oldest parts' image files (their rows stay, marked files_purged), `batch` rows at a
        time, until `enough()`; with `stop_in_batch` it is asked after every part, else after each batch.
        Returns how many parts lost their files."""
        removed = 0
        while not enough():
            rows = self._sql("SELECT part_id, files_dir, files_bytes FROM parts WHERE files_dir IS NOT NULL "
                             "AND files_purged = 0 ORDER BY captured_at LIMIT ?", (batch,))
            if not rows:
                break
            for part_id, files_dir, nbytes in rows:
                self._remove_files(files_dir, nbytes)
                self._sql("UPDATE parts SET files_purged = 1 WHERE part_id = ?", (part_id,))
                removed += 1
                if stop_in_batch and enough():
                    break
        return removed

    def _remove_files(self, files_dir: str, nbytes: int) -> None:
        shutil.rmtree(self.root / files_dir, ignore_errors=True)
        with self._bytes_lock:
            self._files_bytes = max(0, self._files_bytes - (nbytes or 0))

    def _prune_empty_days(self) -> None:
        for day in (self.root / "parts").glob("*"):
            if day.is_dir() and not any(day.iterdir()):
                day.rmdir()

    def _sql(self, sql: str, params: tuple = ()) -> list[tuple]:
        return self._execute(sql, params)
