"""The line's stages and what flows between them:

    capture thread ──PartQueue──▶ score thread ──output queue──▶ output thread ──▶ PartRecorder

Capture never waits on scoring: free-run frames from a live source make room by dropping the oldest
(counted), triggered parts always enter. The output thread hands each scored part to the recorder
(edge.line.recorder), so scoring never waits on the disk or the outbox unless the output queue is full.
`drain()` is the ordered shutdown: capture first, then what is queued is scored and recorded.

Owns Part, ScoredPart, PartQueue, Rolling, the trigger queue and the three stage threads. Must not
build payloads (edge.line.messages), write the store or publish (edge.line.recorder), or swap models
(edge.line.station_manager): it reads the runtime's current scorer and config at each turn.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import queue
import threading
import time
from datetime import datetime, timezone

import numpy as np

from edge.errors import EdgeError
from edge.line.sources import Frame
from edge.scoring.decide import Result

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Part:
    part_id: str
    frame: Frame
    trigger: str                 # free_run, mqtt, interval
    request_id: str | None = None
    queued_at: float = 0.0       # time.monotonic() when it entered the score queue


@dataclasses.dataclass
class ScoredPart:
    part: Part
    result: Result | None
    error: str | None
    score_ms: float
    scored_at: float             # time.monotonic()
    learning: bool = False       # learn mode: collected to build the state, not scored


class PartQueue:
    """Bounded FIFO feeding the score stage. A droppable part (free-run from a live source) that finds
    the queue full pushes out the oldest droppable part; a non-droppable one always enters."""

    def __init__(self, maxsize: int):
        self.maxsize = maxsize
        self._items: collections.deque[tuple[Part, bool]] = collections.deque()
        self._cond = threading.Condition()
        self.dropped = 0

    def put(self, part: Part, droppable: bool) -> None:
        with self._cond:
            if droppable and len(self._items) >= self.maxsize:
                for i, (_, d) in enumerate(self._items):
                    if d:
                        del self._items[i]
                        self.dropped += 1
                        break
                else:
                    self.dropped += 1  # full of triggered parts: this frame is the one to go
                    return
            part.queued_at = time.monotonic()
            self._items.append((part, droppable))
            self._cond.notify()

    def wait_for_room(self, stop: threading.Event) -> None:
        """Back-pressure for replays taken as fast as scoring goes (nothing of theirs is dropped)."""
        with self._cond:
            while len(self._items) >= self.maxsize and not stop.is_set():
                self._cond.wait(0.1)

    def get_batch(self, max_n: int, timeout: float) -> list[Part]:
        with self._cond:
            if not self._items:
                self._cond.wait(timeout)
            batch = []
            while self._items and len(batch) < max_n:
                batch.append(self._items.popleft()[0])
            self._cond.notify_all()
            return batch

    def __len__(self) -> int:
        return len(self._items)


class Rolling:
    """Recent samples (value, at) for rates and percentiles over the last `window_s` seconds."""

    def __init__(self, window_s: float = 30.0, maxlen: int = 20000):
        self.window_s = window_s
        self._samples: collections.deque[tuple[float, float]] = collections.deque(maxlen=maxlen)
        self._lock = threading.Lock()

    def add(self, value: float = 0.0) -> None:
        with self._lock:
            self._samples.append((time.monotonic(), value))

    def _recent(self) -> list[tuple[float, float]]:
        cutoff = time.monotonic() - self.window_s
        with self._lock:
            while self._samples and self._samples[0][0] < cutoff:
                self._samples.popleft()
            return list(self._samples)

    def rate(self) -> float:
        s = self._recent()
        if len(s) < 2:
            return 0.0
        span = s[-1][0] - s[0][0]
        return (len(s) - 1) / span if span > 0 else 0.0

    def percentiles(self) -> dict | None:
        s = self._recent()
        if not s:
            return None
        v = np.array([x for _, x in s])
        return {"p50": round(float(np.percentile(v, 50)), 2), "p99": round(float(np.percentile(v, 99)), 2)}


def utc_stamp(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y%m%dT%H%M%S.%f")[:-3]


def score_batch(scorer, batch: list[Part]) -> list[tuple[Result | None, str | None]]:
    """(result, None) or (None, reason) per part. A batch that fails is scored again part by part, so
    one frame the scorer cannot take (an ROI outside a smaller frame, ...) costs only that part."""
    try:
        results = scorer.score([p.frame.image for p in batch])
    except Exception as e:
        if len(batch) == 1:
            log.warning("scoring failed for part %s: %s", batch[0].part_id, e)
            return [(None, f"scoring failed: {type(e).__name__}: {e}")]
        return [out for p in batch for out in score_batch(scorer, [p])]
    outcomes = []
    for p, r in zip(batch, results):
        if not np.isfinite(r.score):
            log.warning("scoring gave part %s a non-finite score (%s)", p.part_id, r.score)
            outcomes.append((None, f"scoring failed: the scorer returned a non-finite score ({r.score})"))
        else:
            outcomes.append((r, None))
    return outcomes


class Pipeline:
    """The capture, score and output threads of one station. `rt` is the composition root
    (edge.line.runtime): its config, source, scorer, store, counts, recorder and replies are read here."""

    def __init__(self, rt, capture_queue: int, output_queue: int):
        self.rt = rt
        self.stop_event = threading.Event()   # stop capturing
        self.source_done = threading.Event()
        self.queue = PartQueue(capture_queue)
        self.output: queue.Queue[ScoredPart | None] = queue.Queue(output_queue)
        self.triggers: queue.Queue[tuple[str, str, str | None]] = queue.Queue()
        self.queued_ids: set[str] = set()
        self.ids_lock = threading.Lock()
        self.threads: list[threading.Thread] = []
        self.crashed: dict[str, str] = {}  # stage -> the error that ended its thread
        self.in_scoring: list[Part] = []  # the batch inside scorer.score() right now
        self.heartbeat = {"score": time.monotonic(), "output": time.monotonic()}
        self.captured = Rolling()
        self.scored = Rolling()
        self.score_ms = Rolling()
        self.end_to_end_ms = Rolling()
        self.queue_ms = Rolling()
        self._seq = 0

    def start(self) -> None:
        for name, target in (("capture", self._capture_loop), ("score", self._score_loop),
                             ("output", self._output_loop)):
            t = threading.Thread(target=self._guarded, args=(name, target), name=f"edge-{name}", daemon=True)
            t.start()
            self.threads.append(t)

    def _guarded(self, name: str, loop) -> None:
        """A stage's loop; one that dies of an unforeseen error says so loudly (and `stages_alive` turns
        false, so the health loop stops feeding the systemd watchdog and the service is restarted)."""
        try:
            loop()
        except BaseException as e:
            self.crashed[name] = f"{type(e).__name__}: {e}"
            log.critical("the %s thread died: %s; the station no longer %s", name, self.crashed[name],
                         {"capture": "captures", "score": "scores", "output": "records"}[name], exc_info=True)

    def stages_alive(self) -> bool:
        """Every stage runs, or ended as it should (capture after its source ended or a stop)."""
        if len(self.threads) < 3:
            return False
        capture, score, output = self.threads
        return (capture.is_alive() or "capture" not in self.crashed) and score.is_alive() and output.is_alive()

    def scoring_alive(self) -> bool:
        return len(self.threads) > 1 and self.threads[1].is_alive()

    def idle(self) -> bool:
        return not len(self.queue) and self.output.empty()

    def drain(self, deadline: float, then=None) -> None:
        """Stop capturing, let the queued parts be scored and recorded (until `deadline`), end the threads;
        `then()` runs once the queues are empty (or the deadline passed), before the threads are joined."""
        self.stop_event.set()
        capture = self.threads[0] if self.threads else None
        if capture:
            capture.join(max(0.1, deadline - time.monotonic()))
        while (len(self.queue) or not self.output.empty()) and time.monotonic() < deadline:
            time.sleep(0.02)
        self.output.put(None)
        if then is not None:
            then()
        for t in self.threads[1:]:
            t.join(max(0.1, deadline - time.monotonic()))

    def leftovers(self) -> tuple[list[ScoredPart], int]:
        """What a drain cut short: parts scored but not recorded, and parts still queued or inside the
        scorer (as errors that say so); and how many of them were not scored."""
        left: list[ScoredPart] = []
        while True:
            try:
                item = self.output.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                left.append(item)
        unscored = list(self.in_scoring) if self.scoring_alive() else []
        unscored += self.queue.get_batch(1 << 30, 0)
        now = time.monotonic()
        return left + [ScoredPart(p, None, "not scored: the station stopped before it was scored", 0.0, now)
                       for p in unscored], len(unscored)

    # -- capture ------------------------------------------------------------------------------

    def next_id(self, t: float) -> str:
        self._seq += 1
        return f"{self.rt.station}-{utc_stamp(t)}-{self._seq:06d}"

    def _capture_loop(self) -> None:
        rt = self.rt
        mode = rt.config.trigger.mode
        live = rt.source.live
        next_due = time.monotonic()
        while not self.stop_event.is_set():
            pending: list[tuple[str, str, str | None]] = []
            if mode == "mqtt":
                if live:
                    pending = self._drain_triggers()
                else:
                    try:
                        pending = [self.triggers.get(timeout=0.2)]
                    except queue.Empty:
                        continue
            elif mode == "interval":
                now = time.monotonic()
                if now < next_due and not live:
                    self.stop_event.wait(min(next_due - now, 0.2))
                    continue
                if now >= next_due:
                    pending = [(None, "interval", None)]
                    next_due = max(next_due + rt.config.trigger.interval_s, now)
            elif not live:
                self.queue.wait_for_room(self.stop_event)
            try:
                frame = rt.source.read()
            except EdgeError as e:  # SourceError: misconfigured, retrying will not help
                log.error("source %s failed: %s", rt.source.name, e)
                frame = None
            if frame is None:
                for part_id, _, request_id in pending:
                    rt.store.drop_trigger(part_id)
                    rt.commands.reply("trigger", request_id, False, error=f"source {rt.source.name} has ended; "
                                      f"part {part_id} was not inspected", part_id=part_id)
                if self.stop_event.is_set():
                    break
                self.source_done.set()
                log.info("source %s ended after %d frames", rt.source.name, rt.counts["captured"])
                break
            rt.counts["captured"] += 1
            self.captured.add()
            if mode == "free_run":
                self.queue.put(Part(self.next_id(frame.captured_at), frame, "free_run"), droppable=live)
            for part_id, trigger, request_id in pending:
                self.queue.put(Part(part_id or self.next_id(frame.captured_at), frame, trigger, request_id),
                               droppable=False)
            rt.counts["dropped"] = self.queue.dropped

    def _drain_triggers(self) -> list:
        out = []
        while True:
            try:
                out.append(self.triggers.get_nowait())
            except queue.Empty:
                return out

    # -- score --------------------------------------------------------------------------------

    def _score_loop(self) -> None:
        batch_size = self.rt.config.pipeline.batch_size
        while True:
            self.heartbeat["score"] = time.monotonic()
            batch = self.queue.get_batch(batch_size, timeout=0.2)
            if not batch:
                if self.stop_event.is_set() and not self.threads[0].is_alive():
                    break
                continue
            scorer = self.rt.scorer  # swapped whole by enrollments and reloads; None while learning
            t0 = time.perf_counter()
            self.in_scoring = batch
            outcomes = score_batch(scorer, batch) if scorer is not None else [(None, None)] * len(batch)
            ms = (time.perf_counter() - t0) * 1000 / len(batch)
            now = time.monotonic()
            for p, (r, error) in zip(batch, outcomes):
                self.queue_ms.add((now - p.queued_at) * 1000 - ms)
                self.score_ms.add(ms)
                self.scored.add()
                self.output.put(ScoredPart(p, r, error, ms, now, learning=scorer is None))
            self.in_scoring = []

    # -- output -------------------------------------------------------------------------------

    def _output_loop(self) -> None:
        recorder = self.rt.recorder
        while True:
            self.heartbeat["output"] = time.monotonic()
            try:
                item = self.output.get(timeout=0.5)
            except queue.Empty:
                continue
            if item is None:
                break
            try:
                recorder.record_retrying(item, self.heartbeat)
            except Exception as e:
                recorder.record_after_failure(item, e)
            finally:
                with self.ids_lock:
                    self.queued_ids.discard(item.part.part_id)
