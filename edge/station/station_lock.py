"""One station per storage folder: an exclusive `flock` on `<storage.dir>/station.lock`, holding the PID.

Two runtimes on one folder would share the traceability database, the outbox and the part files, and
publish each other's parts; the second one is refused with the owner's PID. The kernel drops a flock
when its process dies, however it dies (SIGKILL, power loss of the process), so a lock is never stale:
the file may stay, with an old PID in it, but nobody holds it.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from edge.errors import EdgeError

LOCK_NAME = "station.lock"


class StationLockError(EdgeError):
    """Another process runs a station on this storage folder."""


class StationLock:
    def __init__(self, folder: str | Path):
        self.path = Path(folder) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> "StationLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StationLockError(f"cannot open the station lock {self.path}: {e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise StationLockError(f"storage folder {self.path.parent} is in use by another station (PID {owner}, "
                                   f"holding {self.path}); stop it, or give this station its own storage.dir") from None
        except OSError as e:
            os.close(fd)
            raise StationLockError(f"cannot lock {self.path}: {e}") from e
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Unlock; the file stays (removing it would let a third process lock a file nobody else sees)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None
