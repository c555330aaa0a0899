"""A protocol server (OPC UA, Modbus) in its own thread and asyncio event loop, started and stopped from
the runtime's threads: `start()` returns once it serves (or raises why it cannot), `close()` stops it.

Owns that thread and loop. Must not know any protocol.
"""
from __future__ import annotations

import asyncio
import logging
import threading

from edge.errors import EdgeError

log = logging.getLogger(__name__)


class LoopServer:
    """Subclasses set `name` and `where`, and define `async _main()`, which calls `self._ready.set()` once
    it serves and returns when `_stopping` is set."""

    name = "server"
    where = ""

    def __init__(self):
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._failed: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, name=f"{self.name}-server", daemon=True)

    def start(self):
        self._thread.start()
        if not self._ready.wait(30):
            raise EdgeError(f"{self.name}: the server on {self.where} did not start within 30 s")
        if self._failed is not None:
            raise EdgeError(f"{self.name}: cannot serve on {self.where}: {self._failed}") from self._failed
        return self

    def close(self) -> None:
        if self.loop is not None and self._stopping is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(timeout=10)

    def in_loop(self, callback) -> None:
        """Run `callback()` (a plain function, or one returning a coroutine) on the server's loop."""
        def run():
            outcome = callback()
            if asyncio.iscoroutine(outcome):
                asyncio.ensure_future(outcome)

        if self.loop is not None and self.loop.is_running():
            self.loop.call_soon_threadsafe(run)

    def _serve(self) -> None:
        self.loop = asyncio.new_event_loop()
        try:
            self.loop.run_until_complete(self._run())
        except BaseException as e:  # noqa: BLE001 - reported to start(), or logged after it
            if not self._ready.is_set():
                self._failed = e
                self._ready.set()
            else:
                log.exception("%s: the server stopped", self.name)
        finally:
            self.loop.close()

    async def _run(self) -> None:
        self._stopping = asyncio.Event()
        await self._main()

    async def _main(self) -> None:
        raise NotImplementedError
