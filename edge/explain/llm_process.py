"""The LLM in a child process of its own: a native crash inside llama.cpp costs one answer, never the
station, the shell command or the console.

llama.cpp is native code; on a CPU it was not built for it dies with SIGILL, on a bad GGUF it may die
with SIGSEGV or SIGABRT, and the OOM killer may SIGKILL it. `LlmProcess` owns one child
(`python -m edge.explain.llm_child`) that loads the pack's GGUF and answers questions about a session; the
parent talks to it over a socket pair (multiprocessing.connection framing) and watches it:

    llm = LlmProcess(pack, n_threads=1, max_tokens=48, time_limit_s=20).start()   # waits for the model
    answer = llm.answer(session, "Is there an anomaly?", on_token=print)          # streams, like Explainer
    llm.close()

A child that dies raises `LlmCrashed` naming the signal (and what the child last wrote to stderr); one
that sends nothing past its time limit plus a grace period is killed and raises `LlmHung`. Either way
the `LlmProcess` is dead afterwards: the caller decides whether to `start()` a new one (the explanation
worker does so with backoff, edge.explain.worker). Errors the child raises on purpose (a prompt too long, a GGUF
that does not load) come back as the same exception classes.

The child's side (`python -m edge.explain.llm_child`, and its drill hook for fault tests) is
edge.explain.llm_child; this module owns the parent's: starting, watching, killing, and reading answers.
It never loads a model in this process.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

from edge.errors import EdgeError
from edge.explain.answers import Answer, Cancelled
from edge.explain.llama_engine import ContextOverflow
from edge.explain.llama_model import LlmError

log = logging.getLogger(__name__)

START_TIMEOUT_S = 180.0   # import + model load (a 7B GGUF from a slow disk)
HANG_GRACE_S = 10.0       # past the engine's own time limit, before a silent child is killed
CANCEL_GRACE_S = 3.0      # a cancelled answer the child does not end by then: the child is killed
CLOSE_TIMEOUT_S = 3.0


class LlmProcessError(LlmError):
    """The LLM child process failed (crashed or hung); the answer in progress is lost."""


class LlmCrashed(LlmProcessError):
    """The child died: `signal_name` (SIGILL, SIGSEGV, SIGKILL, …) or `exit_code` says how."""

    def __init__(self, message: str, signal_name: str | None = None, exit_code: int | None = None):
        super().__init__(message)
        self.signal_name = signal_name
        self.exit_code = exit_code


class LlmHung(LlmProcessError):
    """The child stopped answering past its time limit and was killed."""


def describe_exit(returncode: int | None) -> tuple[str, str | None]:
    """('killed by SIGILL (illegal instruction)', 'SIGILL') for a child's return code."""
    if returncode is None:
        return "still running", None
    if returncode < 0:
        try:
            sig = signal.Signals(-returncode)
        except ValueError:
            return f"killed by signal {-returncode}", f"signal {-returncode}"
        what = {signal.SIGILL: "illegal instruction: llama.cpp built for another CPU",
                signal.SIGSEGV: "segmentation fault", signal.SIGABRT: "aborted",
                signal.SIGBUS: "bus error", signal.SIGFPE: "arithmetic fault",
                signal.SIGKILL: "killed from outside: the OOM killer, an operator or the supervisor"}.get(sig)
        return (f"killed by {sig.name} ({what})" if what else f"killed by {sig.name}"), sig.name
    return f"exited with status {returncode}", None


# The child lowers its priority before it imports anything (interpreter start, numpy, llama.cpp and the
# model load are a second of CPU that must not take the frame loop's cores), and loads at SCHED_IDLE
# where Linux allows it: it gets only CPU nobody else wants until its model is ready.
_CHILD_BOOT = ("import os, sys\n"
               "try:\n    os.nice(max(0, int(sys.argv[2])))\nexcept (OSError, ValueError):\n    pass\n"
               "try:\n    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\n"
               "except (AttributeError, OSError):\n    pass\n"
               "import runpy\nsys.argv = ['edge.explain.llm_child', *sys.argv[1:]]\n"
               "runpy.run_module('edge.explain.llm_child', run_name='__main__', alter_sys=True)\n")

_ERRORS = {"LlmError": LlmError, "ContextOverflow": ContextOverflow, "EdgeError": EdgeError}


class LlmProcess:
    """One supervised child process holding a GGUF on llama.cpp. One caller at a time."""

    def __init__(self, pack, n_threads: int = 1, max_tokens: int = 48, time_limit_s: float = 20.0,
                 nice: int = 10, start_timeout_s: float = START_TIMEOUT_S, hang_grace_s: float = HANG_GRACE_S):
        if pack.llm is None:
            raise LlmError(f"pack {pack.model_id} ({pack.root}) has no llm section: it cannot explain parts")
        self.pack = pack
        self.settings = dict(n_threads=int(n_threads), max_tokens=int(max_tokens), time_limit_s=float(time_limit_s))
        self.nice = int(nice)
        self.start_timeout_s = float(start_timeout_s)
        self.hang_grace_s = float(hang_grace_s)
        self.info: dict = {}
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._stderr = None
        self._next_id = 0
        self._lock = threading.Lock()

    # -- life cycle ------------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def kind(self) -> str:
        return self.pack.llm.kind

    def start(self) -> "LlmProcess":
        """Start the child and wait until its model is loaded. LlmError: the GGUF does not load (the
        child's own message); LlmCrashed: the child died while loading."""
        if self.alive:
            raise EdgeError("LlmProcess already started")
        self._cleanup()
        parent_sock, child_sock = socket.socketpair()
        self._stderr = tempfile.TemporaryFile()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        # This checkout's edge package, whatever the interpreter would otherwise find first.
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", _CHILD_BOOT, str(child_sock.fileno()), str(self.nice)],
                pass_fds=(child_sock.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=self._stderr, env=env, close_fds=True)
        finally:
            child_sock.close()
        self._conn = Connection(parent_sock.detach())
        self._send({"op": "load", "pack": self.pack, **self.settings}, "loading the model")
        msg = self._receive(time.monotonic() + self.start_timeout_s, "loading the model")
        if msg["op"] == "error":
            self.close()
            raise _ERRORS.get(msg["type"], LlmError)(msg["message"])
        if msg["op"] != "ready":
            self.kill()
            raise LlmProcessError(f"LLM child sent {msg['op']!r} instead of 'ready'")
        self.info = {k: v for k, v in msg.items() if k != "op"}
        log.info("LLM child %d ready: %s", self.pid, self.info.get("model"))
        return self

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Ask the child to exit; kill it if it does not within `timeout`."""
        if self._proc is not None and self._proc.poll() is None:
            try:
                self._conn.send({"op": "close"})
            except (OSError, ValueError):
                pass
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._cleanup()

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                log.error("LLM child %d did not die after SIGKILL", self._proc.pid)

    def _cleanup(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def __enter__(self) -> "LlmProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- answers ---------------------------------------------------------------------------------------

    def answer(self, session, question: str, on_token: Callable[[str], None] | None = None,
               cancel: threading.Event | None = None):
        """The child's Explainer.answer for `session` (an edge.explain.dialogue.Session), streamed to `on_token`.
        A set `cancel` event is passed on to the child; the answer then raises edge.explain.answers.Cancelled."""
        with self._lock:
            if not self.alive:
                raise LlmProcessError("the LLM child process is not running")
            self._next_id += 1
            rid = self._next_id
            doing = f"answering about part {session.part_id}"
            self._send({"op": "answer", "id": rid, "session": session, "question": question}, doing)
            deadline = time.monotonic() + self.settings["time_limit_s"] + self.hang_grace_s
            cancel_sent = 0.0
            while True:
                if cancel is not None and cancel.is_set() and not cancel_sent:
                    self._send({"op": "cancel", "id": rid}, doing)
                    cancel_sent = time.monotonic()
                if cancel_sent and time.monotonic() - cancel_sent > CANCEL_GRACE_S:
                    self.kill()  # stuck in native code: a stop must not wait for it
                    raise Cancelled(f"part {session.part_id}: explanation cancelled (the LLM process did not "
                                    f"stop within {CANCEL_GRACE_S:g} s and was killed)")
                msg = self._receive(deadline, doing, poll_s=0.05, idle_ok=True)
                if msg is None:
                    continue
                if msg.get("id") != rid:
                    continue  # a late message of an earlier, abandoned request
                if msg["op"] == "token":
                    if on_token is not None:
                        on_token(msg["text"])
                elif msg["op"] == "done":
                    return Answer(**msg["answer"])
                elif msg["op"] == "error":
                    if msg["type"] == "Cancelled":
                        raise Cancelled(msg["message"])
                    raise _ERRORS.get(msg["type"], LlmError)(msg["message"])

    def _send(self, msg: dict, doing: str) -> None:
        """A request to the child; a child that died since the last look (a broken pipe) raises LlmCrashed
        naming its signal, never the bare OSError a caller could take for its own client going away."""
        try:
            self._conn.send(msg)
        except (OSError, ValueError):
            self._raise_crash(doing)

    def _receive(self, deadline: float, doing: str, poll_s: float = 0.1, idle_ok: bool = False) -> dict | None:
        """The next message from the child; raises LlmCrashed when it dies and LlmHung past the deadline.
        With idle_ok, returns None after one quiet poll so the caller can look at its cancel event."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pid = self.pid
                self.kill()
                raise LlmHung(f"the LLM child process {pid} sent nothing for too long while {doing}; "
                              "it was killed")
            try:
                ready = self._conn.poll(min(poll_s, remaining))
                if ready:
                    msg = self._conn.recv()
                    if msg.get("op") == "log":
                        log.log(msg["level"], "llm child: %s", msg["text"])
                        continue
                    return msg
            except (EOFError, OSError):
                ready = False
            if self._proc.poll() is not None or ready:
                self._raise_crash(doing)
            if idle_ok:
                return None

    def _raise_crash(self, doing: str):
        try:
            rc = self._proc.wait(5)
        except subprocess.TimeoutExpired:
            self.kill()
            rc = self._proc.returncode
        how, sig = describe_exit(rc)
        tail = self._stderr_tail()
        raise LlmCrashed(f"the LLM child process {self._proc.pid} {how} while {doing}"
                         + (f"; it said: {tail}" if tail else ""), signal_name=sig, exit_code=rc)

    def _stderr_tail(self, n: int = 3) -> str:
        if self._stderr is None:
            return ""
        try:
            self._stderr.seek(0)
            lines = [ln.strip() for ln in self._stderr.read()[-4000:].decode("utf-8", "replace").splitlines()]
        except (OSError, ValueError):
            return ""
        lines = [ln for ln in lines if ln and not ln.startswith(("File ", "Current thread", "Thread 0x"))]
        return " | ".join(lines[-n:])
