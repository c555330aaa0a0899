"""The explanation worker: `ExplainWorker` serves flagged parts from a bounded queue on its own thread, off
the frame path, through the supervised LLM child (edge.explain.llm_process) or a remote server
(edge.explain.remote_llm.RemoteFirst); it owns the queue, a technician's questions going ahead of the
backlog (preemption), crash bookkeeping, restarts with backoff and turning explanations off.

    store = DialogueStore(state_dir / "dialogue.sqlite")
    worker = ExplainWorker(pack, store, on_explanation=outbox_sink, queue_size=4, n_threads=1)
    worker.start()
    ...
    if result.anomalous:
        if not worker.submit(part_id, findings):     # never blocks
            mark_part(part_id, "explanation pending") # kept in the store, explained when the queue drains
    ...
    worker.ask(part_id, "How big is it?")             # a technician's follow-up, same session
    worker.stop()

It never writes an answer itself (edge.explain.answers: the runtime's opening and facts, the model's
description checked sentence by sentence) and never imports the line."""
from __future__ import annotations

import collections
import datetime as dt
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np

from edge.errors import EdgeError
from edge.explain.answers import Cancelled, respond
from edge.explain.dialogue import DialogueStore
from edge.explain.findings import Findings
from edge.explain.llama_model import LlmError
from edge.explain.llm_process import LlmProcess, LlmProcessError
from edge.explain.questions import FIRST_QUESTION, clean_question
from edge.explain.remote_llm import RemoteUnavailable
from edge.pack import Pack

log = logging.getLogger(__name__)


def _now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class ExplainWorker:
    """Explains flagged parts from a bounded queue, on its own thread, with the LLM in a supervised child
    process (edge.explain.llm_process): a native crash or hang in llama.cpp costs the answer in progress, never
    the station.

    `submit` never waits: the part's session is written to the store (status pending) and its id put on
    the queue; when the queue is full it returns False and the part stays pending in the store, to be
    explained when the queue drains (or after a restart). `ask` puts a technician's follow-up ahead of
    the queue and waits for the answer.

    When the child dies or hangs, the part it was explaining goes back to pending and is tried again;
    after `max_attempts` crashes (counted in the store, so across restarts too) it is marked failed with
    the reason and a failed explanation is reported. The child is restarted with backoff; after
    `max_crashes` crashes in a row explanations turn off, with the reason in `stats()` and the log."""

    IDLE_POLL_S = 0.2
    BACKOFF_S = (0.5, 2.0, 5.0, 15.0, 30.0)

    def __init__(self, pack: Pack, store: DialogueStore, on_explanation: Callable[[dict], None],
                 queue_size: int = 4, n_threads: int = 1, max_tokens: int = 48, time_limit_s: float = 20.0,
                 question: str = FIRST_QUESTION, nice: int = 10, max_attempts: int = 2, max_crashes: int = 4,
                 hang_grace_s: float | None = None, llm=None):
        """`llm`: the answerer to use instead of a local LLM child (edge.explain.remote_llm.RemoteFirst)."""
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        if max_attempts < 1 or max_crashes < 1:
            raise ValueError(f"max_attempts and max_crashes must be >= 1, got {max_attempts}, {max_crashes}")
        if pack.llm is None and llm is None:
            raise LlmError(f"pack {pack.model_id} ({pack.root}) has no llm section: it cannot explain parts")
        self.pack = pack
        self.store = store
        self.on_explanation = on_explanation
        self.question = clean_question(question)
        self.max_attempts = int(max_attempts)
        self.max_crashes = int(max_crashes)
        extra = {} if hang_grace_s is None else {"hang_grace_s": hang_grace_s}
        self._llm = llm if llm is not None else LlmProcess(pack, n_threads=n_threads, max_tokens=max_tokens,
                                                           time_limit_s=time_limit_s, nice=nice, **extra)
        self._queue: queue.Queue[str] = queue.Queue(maxsize=queue_size)
        self._asks: queue.Queue[tuple] = queue.Queue()
        self._retries: collections.deque[str] = collections.deque()  # lost to a crash: served first
        self._stop = threading.Event()
        self._cancel = threading.Event()
        # Set by stop(), and by a technician's question while a backlog part is being explained: that
        # explanation is cut short (its part stays pending and is explained right after the answer).
        self._preempt = threading.Event()
        self._thread: threading.Thread | None = None
        self._check_store = threading.Event()
        self._lock = threading.Lock()
        self._submitted_at: dict[str, float] = {}
        self._crashes_in_row = 0
        self._restart_at = 0.0
        self.off_reason: str | None = None
        self._stats = {"overflowed": 0, "explained": 0, "failed": 0, "last_latency_ms": None,
                       "last_compute_ms": None, "busy": False, "busy_part": None, "crashes": 0, "restarts": 0,
                       "last_crash": None, "preempted": 0}

    # -- life cycle --------------------------------------------------------------------------------------

    def start(self) -> "ExplainWorker":
        """Start the LLM process (a GGUF that does not load, or a child that dies loading it, raises here)
        and the thread; pending parts from before are served."""
        if self._thread is not None:
            raise EdgeError("ExplainWorker already started")
        self._llm.start()
        self._stop.clear()
        self._cancel.clear()
        self._check_store.set()
        self._thread = threading.Thread(target=self._run, name="explain-worker", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after cancelling the explanation in progress (its part stays pending); end the LLM process."""
        self._stop.set()
        self._cancel.set()
        self._preempt.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                log.warning("explain worker did not stop within %.1f s: killing the LLM process", timeout)
                self._llm.kill()
                thread.join(2.0)
        self._llm.close(timeout=2.0)

    def __enter__(self) -> "ExplainWorker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def worker_pid(self) -> int | None:
        """The LLM child process's pid while it runs."""
        return self._llm.pid if self._llm.alive else None

    # -- frame side -----------------------------------------------------------------------------------------

    def submit(self, part_id: str, findings: Findings | dict,
               embeddings: tuple[np.ndarray, np.ndarray] | None = None) -> bool:
        """Queue a flagged part for explanation. Never waits for the LLM: returns False when the queue is
        full, and the part is then pending in the store and explained later."""
        doc = findings.to_dict() if isinstance(findings, Findings) else dict(findings)
        if self._llm.kind == "anomalygpt" and embeddings is None:
            raise LlmError(f"part {part_id}: this AnomalyGPT pack needs the image and prompt embeddings "
                           "(submit(..., embeddings=(image_rows, prompt_rows)))")
        self.store.open_session(part_id, doc, embeddings)
        with self._lock:
            self._submitted_at[part_id] = time.time()
        try:
            self._queue.put_nowait(part_id)
            return True
        except queue.Full:
            with self._lock:
                self._stats["overflowed"] += 1
            self._check_store.set()
            return False

    # -- console side ---------------------------------------------------------------------------------------

    def ask(self, part_id: str, question: str, on_token: Callable[[str], None] | None = None,
            timeout: float | None = None) -> str:
        """A follow-up in the part's session (recorded in the store); waits for the worker's answer."""
        clean_question(question)  # refuse bad questions here, not on the worker
        self.store.session(part_id)
        if self.off_reason:
            raise EdgeError(f"explanations are off: {self.off_reason}")
        if self._thread is None or not self._thread.is_alive():
            raise EdgeError("ExplainWorker is not running: start() it first")
        future: Future = Future()
        self._asks.put((part_id, question, on_token, future))
        with self._lock:
            if self._stats["busy"] and self._stats.get("busy_kind") == "backlog":
                self._preempt.set()  # questions go ahead of the backlog: the part in progress waits
        return future.result(timeout)

    def stats(self) -> dict:
        counts = self.store.counts()
        with self._lock:
            s = dict(self._stats)
        state = "off" if self.off_reason else ("running" if self._llm.alive else "restarting")
        out = {"state": state, "queue_depth": self._queue.qsize(), "queue_size": self._queue.maxsize,
               "pending": counts["pending"], "done": counts["done"], "failed": counts["failed"], **s,
               "worker_pid": self.worker_pid}
        if self.off_reason:
            out["error"] = self.off_reason
        if hasattr(self._llm, "status"):
            out["remote"] = self._llm.status()
        return out

    # -- the thread -----------------------------------------------------------------------------------------

    def _run(self) -> None:
        self._report_unreported()
        while not self._stop.is_set():
            if not self._llm_ready():
                continue
            wait = self._llm.retry_in_s() if hasattr(self._llm, "retry_in_s") else 0.0
            if wait > 0:  # the remote server failed: parts stay pending until its backoff is over
                self._stop.wait(min(wait, self.IDLE_POLL_S))
                continue
            try:
                job = self._asks.get_nowait()
            except queue.Empty:
                job = None
            if job is not None:
                self._serve_ask(*job)
                continue
            part_id = self._next_part()
            if part_id is not None:
                self._explain(part_id)

    def _llm_ready(self) -> bool:
        """True when the LLM process runs; otherwise restart it when its backoff is over (or wait)."""
        if self._llm.alive:
            return True
        if self.off_reason:
            self._refuse_asks()
            self._stop.wait(self.IDLE_POLL_S)
            return False
        wait = self._restart_at - time.monotonic()
        if wait > 0:
            self._stop.wait(min(wait, self.IDLE_POLL_S))
            return False
        try:
            self._llm.start()
        except LlmProcessError as e:
            self._crashed(None, e)
            return False
        except EdgeError as e:  # the GGUF no longer loads: nothing a restart will fix
            self._turn_off(f"the LLM process could not load the model again: {e}")
            return False
        with self._lock:
            self._stats["restarts"] += 1
        log.warning("LLM process restarted (pid %d)", self._llm.pid)
        return True

    def _refuse_asks(self) -> None:
        while True:
            try:
                *_, future = self._asks.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                future.set_exception(EdgeError(f"explanations are off: {self.off_reason}"))

    def _crashed(self, part_id: str | None, error: LlmProcessError) -> None:
        """Book a crash or hang of the LLM process: the part's attempt, the backoff, maybe turning off."""
        reason = str(error)
        log.error("LLM process failed%s: %s", f" explaining part {part_id}" if part_id else "", reason)
        if part_id is not None:
            attempts = self.store.record_crash(part_id, reason)
            if attempts >= self.max_attempts:
                self._fail(part_id, f"the LLM process failed on it {attempts} times; last: {reason}")
            else:
                self._retries.append(part_id)  # still pending: tried again first, after the restart
        with self._lock:
            self._crashes_in_row += 1
            self._stats["crashes"] += 1
            self._stats["last_crash"] = reason
            n = self._crashes_in_row
        if n >= self.max_crashes:
            self._turn_off(f"the LLM process failed {n} times in a row; last: {reason}")
            return
        self._restart_at = time.monotonic() + self.BACKOFF_S[min(n, len(self.BACKOFF_S)) - 1]

    def _turn_off(self, reason: str) -> None:
        self.off_reason = reason
        self._llm.kill()
        log.error("explanations off: %s (flagged parts stay pending; restart the service to try again)", reason)

    def _fail(self, part_id: str, reason: str) -> None:
        self.store.set_status(part_id, "failed", reason)
        with self._lock:
            self._stats["failed"] += 1
        self._report(part_id, {"status": "failed", "error": reason, "answer": None})

    def _next_part(self) -> str | None:
        if self._retries:
            return self._retries.popleft()
        try:
            return self._queue.get_nowait()
        except queue.Empty:
            pass
        if self._check_store.is_set():
            waiting = self.store.pending(limit=1)
            if waiting:
                return waiting[0]
            self._check_store.clear()
        try:
            return self._queue.get(timeout=self.IDLE_POLL_S)
        except queue.Empty:
            return None

    def _explain(self, part_id: str, backlog: bool = True) -> None:
        """The first explanation of a flagged part. A backlog part (not the one a question is about) is
        cut short by a technician's question and explained again right after the answer."""
        session = self.store.get(part_id)
        if session is None or session.status != "pending":
            return  # served already (it was both queued and found pending in the store)
        with self._lock:
            self._stats["busy"] = True
            self._stats["busy_part"] = part_id
            self._stats["busy_kind"] = "backlog" if backlog else "question"
            if not self._stop.is_set():
                self._preempt.clear()
            if backlog and not self._asks.empty():  # a question came in between: it goes first
                self._stats["busy"] = False
                self._retries.appendleft(part_id)
                return
        try:
            answer = respond(self._llm, self.store, part_id, self.question,
                             cancel=self._preempt if backlog else self._cancel)
        except Cancelled:
            if backlog and not self._stop.is_set():  # cut short for a technician's question: explained right after it
                with self._lock:
                    self._stats["preempted"] += 1
                self._retries.appendleft(part_id)
                log.info("explanation of part %s paused for a technician's question", part_id)
            return
        except LlmProcessError as e:
            self._crashed(part_id, e)
            return
        except RemoteUnavailable as e:  # the server is down, slow or refuses us: the part stays pending
            log.warning("part %s stays pending: %s", part_id, e)
            self._retries.append(part_id)
            self._check_store.set()
            return
        except Exception as e:  # a bad part must not stop the worker
            log.warning("explanation of part %s failed: %s", part_id, e)
            self._fail(part_id, f"{type(e).__name__}: {e}")
            return
        finally:
            with self._lock:
                self._stats["busy"] = False
                self._stats["busy_part"] = None
                self._stats["busy_kind"] = None
        with self._lock:
            self._crashes_in_row = 0
        self._report(part_id, {"status": "done", "answer": answer.text, "source": answer.source,
                               "n_tokens": answer.n_tokens, "compute_ms": answer.compute_ms}, session.created)

    def _report_unreported(self) -> None:
        """Hand over the explanations written before the last stop but not handed to the line then (the
        process died between writing the answer and handing it over): from the stored session, once."""
        for part_id in self.store.unreported():
            fields, session = self.store.first_explanation(part_id), self.store.get(part_id)
            if fields is not None:
                log.warning("part %s: handing over its explanation written before the last stop", part_id)
                self._report(part_id, fields, session.created, count=False)

    def _report(self, part_id: str, fields: dict, created: float | None = None, count: bool = True) -> None:
        """Hand a part's first explanation (or its failure) to the line, then record that it was handed over."""
        with self._lock:
            submitted = self._submitted_at.pop(part_id, created if created is not None else time.time())
        latency = round((time.time() - submitted) * 1000, 1)
        if fields["status"] == "done" and count:
            with self._lock:
                self._stats.update(explained=self._stats["explained"] + 1, last_latency_ms=latency,
                                   last_compute_ms=fields["compute_ms"])
        session = self.store.get(part_id)
        message = {"part_id": part_id, "question": self.question, **fields,
                   "verdict": session.findings.get("verdict") if session else None, "model_id": self.pack.model_id,
                   "llm": getattr(self._llm, "name", None) or self.pack.manifest.files[self.pack.llm.file].path,
                   "latency_ms": latency,
                   "time": _now_iso()}
        try:
            self.on_explanation(message)
        except Exception:
            log.exception("on_explanation failed for part %s (handed over again at the next start)", part_id)
            return
        self.store.mark_reported(part_id)

    def _serve_ask(self, part_id: str, question: str, on_token, future: Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            if self.store.session(part_id).status == "pending":
                self._explain(part_id, backlog=False)  # the first explanation comes first, and is published
                if not self._llm.alive:
                    raise EdgeError(f"part {part_id}: the LLM process failed while explaining it "
                                    f"({self._stats['last_crash']}); ask again in a moment")
            answer = respond(self._llm, self.store, part_id, question, on_token, self._cancel)
            with self._lock:
                self._crashes_in_row = 0
            future.set_result(answer.text)
        except LlmProcessError as e:
            self._crashed(None, e)
            future.set_exception(e)
        except Exception as e:
            future.set_exception(e)
