"""systemd's notify protocol: READY=1, WATCHDOG=1, STATUS=..., STOPPING=1 as datagrams to $NOTIFY_SOCKET.

A no-op when the service does not run under systemd (no NOTIFY_SOCKET). The protocol is a single
datagram per message, so it is written here rather than pulled in as a dependency.

Owns the datagrams. Must not decide when to send them (edge.line.health and edge.line.runtime do).
"""
from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


class SystemdNotifier:
    def __init__(self, address: str | None = None):
        self.address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        self._sock = None
        if self.address:
            # "@name" is Linux's abstract namespace (a leading NUL byte).
            self._target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    @staticmethod
    def watchdog_interval() -> float | None:
        """Seconds between WATCHDOG=1 pings: half of systemd's WatchdogSec, None when not asked for."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or (pid and pid.isdigit() and int(pid) != os.getpid()):
            return None
        try:
            return max(int(usec) / 2e6, 0.05)
        except ValueError:
            return None

    def notify(self, *fields: str) -> bool:
        if self._sock is None:
            return False
        try:
            self._sock.sendto("\n".join(fields).encode(), self._target)
            return True
        except OSError as e:
            log.warning("systemd notify to %s failed: %s", self.address, e)
            return False

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
