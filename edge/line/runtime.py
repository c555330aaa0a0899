"""The line runtime: `anomaly-edge run --config station.yaml`.

    capture thread ──PartQueue──▶ score thread ──output queue──▶ output thread ──▶ store, outbox→MQTT,
                                                                                  explain queue
Capture never waits on scoring: free-run frames from a live source make room by dropping the oldest
(counted), triggered parts always enter. The output thread owns the disk and the outbox, so scoring
never waits on them unless the output queue is full. A maintenance thread runs enrollments and
reloads; a health thread publishes status, pings the systemd watchdog and applies retention.
"""
from __future__ import annotations

import base64
import collections
import dataclasses
import logging
import queue
import signal
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np

from edge.scoring import visual
from edge.line.commands import (CommandError, DeployCommand, EnrollGoodCommand, ReloadCommand, RollbackCommand, TriggerCommand,
                       parse_command, request_id_of)
from edge.line.config import StationConfig, load_config, mqtt_password
from edge.line.config_reload import changed_keys, needs_restart, with_reloaded
from edge.inference.backend import create_backend, scoring_device
from edge.scoring.decide import Result
from edge.station.engine_calibration import follow_engine
from edge.errors import EdgeError
from edge.explain.findings import describe
from edge.station.line_learning import LineLearner
from edge.line.notify import SystemdNotifier
from edge.pack import load_pack
from edge.scoring.scorer import FeatureExtractor
from edge.scoring.factory import build_scorer
from edge.line.sources import Frame, ReconnectingSource, make_source
from edge.station.station_lock import StationLock
from edge.station.enrollment import enroll
from edge.station.state import load_state
from edge.station.deploy import deploy_health, keep_deployed, run_deploy, run_rollback, start_models
from edge.scoring.student import StudentScorer
from edge.line.store import TraceStore, iso_time

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


def jpeg_within(image: np.ndarray, max_bytes: int) -> bytes:
    """JPEG of `image` no larger than `max_bytes`: lower quality first, then smaller sizes."""
    img = image
    while True:
        for quality in (85, 70, 50, 35):
            ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
            if ok and buf.nbytes <= max_bytes:
                return buf.tobytes()
        if min(img.shape[:2]) <= 32:
            return buf.tobytes()
        img = cv2.resize(img, None, fx=0.7, fy=0.7, interpolation=cv2.INTER_AREA)


def _utc_stamp(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y%m%dT%H%M%S.%f")[:-3]


class Runtime:
    """One station: source, scorer, store, MQTT, local API, health. `start()`, then `stop()`."""

    def __init__(self, config: StationConfig, config_path: str | Path | None = None, exit_at_end: bool = False):
        self.config = config
        self.config_path = Path(config_path) if config_path else None
        self.exit_at_end = exit_at_end
        self.station = config.station.name
        # The encoder backend of the whole station (TensorRT engines and GPU banks live on the process's
        # device thread, edge.inference.device); the state's threshold must have been calibrated with its numerics.
        # The pack and state deployed last (edge.station.deploy), the previous ones if those fail to load.
        self.config, models, self.deploy_note = start_models(config, load_models)
        config = self.config
        self.pack, self.backend, self.state, self.scorer = models
        self.deploy_last: dict | None = None
        if self.deploy_note:
            log.error("%s", self.deploy_note)
        self.learner: LineLearner | None = None
        if self.scorer is None:
            # Learn mode: no state yet; the first learn.parts parts build it (edge.station.line_learning).
            self.learner = LineLearner(self.pack, config.state, config.storage.dir, config.learn.parts,
                                       config.learn.suspect_z, config.target_false_reject)
        self.store = TraceStore(config.storage.dir, config.storage.retention_days, config.storage.disk_budget_mb,
                                config.storage.min_free_mb)
        self.publisher = None
        self.sinks: list = []  # edge.line.plc: Sparkplug B, OPC UA
        self.explainer = None
        self.explain_error: str | None = None
        self._projector = None
        self.api = None
        self.notifier = SystemdNotifier()
        self.lock = StationLock(config.storage.dir)

        self._stop = threading.Event()       # stop capturing
        self._stopped = threading.Event()    # everything is down
        self._source_done = threading.Event()
        self._queue = PartQueue(config.pipeline.capture_queue)
        self._output: queue.Queue[ScoredPart | None] = queue.Queue(config.pipeline.output_queue)
        self._triggers: queue.Queue[tuple[str, str, str | None]] = queue.Queue()
        self._jobs: queue.Queue = queue.Queue()
        self._queued_ids: set[str] = set()
        self._ids_lock = threading.Lock()
        self._state_lock = threading.Lock()  # one enrollment or reload at a time
        self._seq = 0
        self._in_scoring: list[Part] = []  # the batch inside scorer.score() right now
        self._threads: list[threading.Thread] = []
        self._heartbeat = {"score": time.monotonic(), "output": time.monotonic()}
        self.started_at = time.time()
        self.counts = collections.Counter()
        self.captured = Rolling()
        self.scored = Rolling()
        self.score_ms = Rolling()
        self.end_to_end_ms = Rolling()
        self.queue_ms = Rolling()

        source = make_source(config.source)
        rc = config.source.reconnect
        self.source = ReconnectingSource(source, rc.initial_delay_s, rc.max_delay_s, self._on_source_state, self._stop)

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> "Runtime":
        """Refuses (StationLockError, naming the owner's PID) when another station runs on storage.dir."""
        self.lock.acquire()
        try:
            return self._start()
        except BaseException:
            self.lock.release()
            raise

    def _start(self) -> "Runtime":
        c = self.config
        self.store.enforce_retention()
        self._replay_triggers()  # before the broker can hand over new ones
        if c.mqtt.enabled:
            from edge.line.publish import MqttPublisher

            tls = c.mqtt.tls
            self.publisher = MqttPublisher(
                Path(c.storage.dir) / "outbox.sqlite", host=c.mqtt.host, port=c.mqtt.port,
                topic_prefix=c.topic_prefix, client_id=c.mqtt.client_id or f"anomaly-edge-{c.station.line}-{self.station}",
                username=c.mqtt.username, password=mqtt_password(c), keepalive=c.mqtt.keepalive,
                tls_ca=tls.ca if tls else None, tls_cert=tls.cert if tls else None, tls_key=tls.key if tls else None,
                reconnect_min_delay=1, reconnect_max_delay=10, persistent_session=True, connect=False,
                online_status=self.health)
            self.store.siblings.append(self.publisher.outbox)
            self._replay_unpublished()
            self.publisher.subscribe("cmd/+", self._on_command)
            # Connected once the handler is in place: the persistent session hands over at once the
            # commands the broker kept for us while we were away.
            self.publisher.connect()
        from edge.line.plc import start_sinks

        self.sinks = start_sinks(self)
        self._start_explainer()
        if c.api.enabled:
            from edge.line.api import LocalApi

            self.api = LocalApi(self, c.api_socket, mode=int(c.api.mode, 8), group=c.api.group,
                                tcp=(c.api.tcp_host, c.api.tcp_port) if c.api.tcp_port else None,
                                token_file=c.api.token_file, read_timeout_s=c.api.read_timeout_s).start()
        for name, target in (("capture", self._capture_loop), ("score", self._score_loop),
                             ("output", self._output_loop), ("maintenance", self._maintenance_loop),
                             ("health", self._health_loop)):
            t = threading.Thread(target=target, name=f"edge-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        self.notifier.ready(self._status_line(self.health()))
        if self.backend is not None:
            log.info("%s", scoring_device(self.backend, getattr(self.scorer, "bank", None)))
        log.info("station %s running: pack %s, source %s, trigger %s, threshold %.4f", self.station,
                 self.pack.model_id, self.source.name, c.trigger.mode,
                 self.scorer.threshold if self.scorer is not None else float("nan"))
        if self.learner is not None:
            log.info("learn mode: no state in %s yet; building it from the first %d parts (%d collected)",
                     c.state, self.learner.parts, self.learner.progress()["collected"])
            if self.learner.full():  # collected before a restart, not built yet
                self._jobs.put(("learn", None))
        return self

    def _start_explainer(self) -> None:
        """The LLM worker, when the pack has a language model and explanations are enabled. The model
        runs in a supervised child process (edge.explain.llm_process); one that cannot be loaded, or whose process
        dies loading it, turns explanations off (logged, in health); the line keeps running."""
        spec = self.config.explain
        if not (spec.enabled and (self.pack.llm is not None or spec.backend == "remote")):
            return
        try:
            from edge.explain.dialogue import DialogueStore
            from edge.explain.worker import ExplainWorker

            local_llm = spec.backend == "local" or spec.remote.fallback_local  # a remote server gets findings only
            if local_llm and self.pack.llm is not None and self.pack.llm.kind == "anomalygpt":
                from edge.scoring.anomalygpt import Projector

                self._projector = Projector(self.pack, threads=1)
            store = DialogueStore(Path(self.config.storage.dir) / "dialogue.sqlite")
            self.store.siblings.append(store)
            self.explainer = ExplainWorker(self.pack, store, self.on_explanation, queue_size=spec.queue_size,
                                           n_threads=spec.threads, max_tokens=spec.max_tokens,
                                           time_limit_s=spec.time_limit_s, max_attempts=spec.max_attempts,
                                           max_crashes=spec.max_crashes, llm=remote_answerer(self.pack, spec)).start()
        except (ImportError, EdgeError) as e:
            self.explain_error = str(e)
            log.error("explanations off: %s", e)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop capturing, score and output what is queued, flush the outbox, close everything."""
        if self._stopped.is_set():
            return
        self.notifier.stopping()
        self._stop.set()
        deadline = time.monotonic() + timeout
        capture = self._threads[0] if self._threads else None
        if capture:
            capture.join(max(0.1, deadline - time.monotonic()))
        while (len(self._queue) or not self._output.empty()) and time.monotonic() < deadline:
            time.sleep(0.02)
        self._output.put(None)
        self._jobs.put(None)
        for t in self._threads[1:]:
            t.join(max(0.1, deadline - time.monotonic()))
        self._record_leftovers()
        if self.explainer is not None:
            self.explainer.stop(timeout=2.0)
            self.explainer.store.close()
        waiting = len(self.store.pending_triggers())
        if waiting:
            log.warning("%d accepted trigger(s) not inspected before the stop: they are replayed at the next start",
                        waiting)
        if self.api is not None:
            self.api.stop()
        from edge.line.plc import close_sinks

        close_sinks(self.sinks)
        if self.publisher is not None:
            # The retained source must not say "streaming" after the station is gone.
            self.publisher.publish_now("source", {"source": self.source.name, "state": "stopped",
                                                  "detail": "the station stopped", "time": iso_time(time.time())},
                                       retain=True)
            self.publisher.close(flush_timeout=max(0.5, deadline - time.monotonic()))
        self.source.close()
        self.store.close()
        self.notifier.close()
        self.lock.release()
        self._stopped.set()
        log.info("station %s stopped", self.station)

    def _record_leftovers(self) -> None:
        """What a stop bounded by its timeout could not finish still leaves with a result: parts scored
        but not yet recorded are recorded as they are; parts still queued, or inside the scorer, are
        recorded and published as errors that say so (triggered ones thus answer their PLC)."""
        left: list[ScoredPart] = []
        while True:
            try:
                item = self._output.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                left.append(item)
        score_thread = self._threads[1] if len(self._threads) > 1 else None
        unscored = (list(self._in_scoring) if score_thread is not None and score_thread.is_alive() else [])
        unscored += self._queue.get_batch(1 << 30, 0)
        now = time.monotonic()
        left += [ScoredPart(p, None, "not scored: the station stopped before it was scored", 0.0, now)
                 for p in unscored]
        for item in left:
            try:
                self._emit(item)
            except Exception as e:
                self.counts["output_errors"] += 1
                log.exception("stopping: could not record part %s", item.part.part_id)
                self._publish_unrecorded(item, f"not recorded: {type(e).__name__}: {e}")
        if left:
            log.warning("stopping: recorded %d part(s) the stop timeout cut short (%d of them as not scored)",
                        len(left), len(unscored))

    def run_forever(self) -> int:
        """Serve until SIGTERM/SIGINT (or the end of a finite source with exit_at_end); SIGHUP reloads."""
        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        signal.signal(signal.SIGINT, lambda *_: self._stop.set())
        signal.signal(signal.SIGHUP, lambda *_: self._jobs.put(("reload", None)))
        self.start()
        try:
            while not self._stop.is_set():
                if self.exit_at_end and self._source_done.is_set() and not len(self._queue) and self._output.empty():
                    break
                self._stop.wait(0.2)
        finally:
            self.stop()
        return 0

    # -- capture ------------------------------------------------------------------------------

    def _next_id(self, t: float) -> str:
        self._seq += 1
        return f"{self.station}-{_utc_stamp(t)}-{self._seq:06d}"

    def _capture_loop(self) -> None:
        mode = self.config.trigger.mode
        live = self.source.live
        next_due = time.monotonic()
        while not self._stop.is_set():
            pending: list[tuple[str, str, str | None]] = []
            if mode == "mqtt":
                if live:
                    pending = self._drain_triggers()
                else:
                    try:
                        pending = [self._triggers.get(timeout=0.2)]
                    except queue.Empty:
                        continue
            elif mode == "interval":
                now = time.monotonic()
                if now < next_due and not live:
                    self._stop.wait(min(next_due - now, 0.2))
                    continue
                if now >= next_due:
                    pending = [(None, "interval", None)]
                    next_due = max(next_due + self.config.trigger.interval_s, now)
            elif not live:
                self._queue.wait_for_room(self._stop)
            try:
                frame = self.source.read()
            except EdgeError as e:  # SourceError: misconfigured, retrying will not help
                log.error("source %s failed: %s", self.source.name, e)
                frame = None
            if frame is None:
                for part_id, _, request_id in pending:
                    self.store.drop_trigger(part_id)
                    self._reply("trigger", request_id, False, error=f"source {self.source.name} has ended; "
                                f"part {part_id} was not inspected", part_id=part_id)
                if self._stop.is_set():
                    break
                self._source_done.set()
                log.info("source %s ended after %d frames", self.source.name, self.counts["captured"])
                break
            self.counts["captured"] += 1
            self.captured.add()
            if mode == "free_run":
                self._queue.put(Part(self._next_id(frame.captured_at), frame, "free_run"), droppable=live)
            for part_id, trigger, request_id in pending:
                self._queue.put(Part(part_id or self._next_id(frame.captured_at), frame, trigger, request_id),
                                droppable=False)
            self.counts["dropped"] = self._queue.dropped

    def _drain_triggers(self) -> list:
        out = []
        while True:
            try:
                out.append(self._triggers.get_nowait())
            except queue.Empty:
                return out

    def trigger(self, part_id: str, request_id: str | None = None) -> None:
        """Inspect the next frame as part `part_id` (trigger.mode mqtt)."""
        if self.config.trigger.mode != "mqtt":
            raise CommandError(f"trigger: this station runs trigger.mode {self.config.trigger.mode}; "
                               "set trigger.mode: mqtt to inspect parts on command")
        with self._ids_lock:
            if part_id in self._queued_ids:
                raise CommandError(f"trigger: part {part_id!r} is already waiting to be inspected")
            try:
                self.store.get(part_id)
                known = True
            except EdgeError:
                known = False
            if known:
                raise CommandError(f"trigger: part {part_id!r} was already inspected; send a new part id")
            self._queued_ids.add(part_id)
            # Durable before it is acknowledged: a stop or crash from here on replays it at the next start.
            self.store.add_trigger(part_id, request_id)
        self._triggers.put((part_id, "mqtt", request_id))

    def _replay_triggers(self) -> int:
        """Triggers accepted before the last stop or crash whose part was never recorded: inspected now,
        before new ones, under the part ids the PLC sent."""
        pending = self.store.pending_triggers()
        if pending and self.config.trigger.mode != "mqtt":
            log.warning("%d trigger(s) accepted before the last stop are kept for trigger.mode mqtt "
                        "(this start runs %s)", len(pending), self.config.trigger.mode)
            return 0
        with self._ids_lock:
            for part_id, request_id in pending:
                self._queued_ids.add(part_id)
                self._triggers.put((part_id, "mqtt", request_id))
        if pending:
            log.warning("replaying %d trigger(s) accepted before the last stop", len(pending))
        return len(pending)

    # -- score --------------------------------------------------------------------------------

    def _score_loop(self) -> None:
        batch_size = self.config.pipeline.batch_size
        while True:
            self._heartbeat["score"] = time.monotonic()
            batch = self._queue.get_batch(batch_size, timeout=0.2)
            if not batch:
                if self._stop.is_set() and not self._threads[0].is_alive():
                    break
                continue
            scorer = self.scorer  # swapped whole by enrollments and reloads; None while learning
            t0 = time.perf_counter()
            self._in_scoring = batch
            outcomes = self._score_batch(scorer, batch) if scorer is not None else [(None, None)] * len(batch)
            ms = (time.perf_counter() - t0) * 1000 / len(batch)
            now = time.monotonic()
            for p, (r, error) in zip(batch, outcomes):
                self.queue_ms.add((now - p.queued_at) * 1000 - ms)
                self.score_ms.add(ms)
                self.scored.add()
                self._output.put(ScoredPart(p, r, error, ms, now, learning=scorer is None))
            self._in_scoring = []

    @staticmethod
    def _score_batch(scorer, batch: list[Part]) -> list[tuple[Result | None, str | None]]:
        """(result, None) or (None, reason) per part. A batch that fails is scored again part by part, so
        one frame the scorer cannot take (an ROI outside a smaller frame, ...) costs only that part."""
        try:
            results = scorer.score([p.frame.image for p in batch])
        except Exception as e:
            if len(batch) == 1:
                log.warning("scoring failed for part %s: %s", batch[0].part_id, e)
                return [(None, f"scoring failed: {type(e).__name__}: {e}")]
            return [out for p in batch for out in Runtime._score_batch(scorer, [p])]
        outcomes = []
        for p, r in zip(batch, results):
            if not np.isfinite(r.score):
                log.warning("scoring gave part %s a non-finite score (%s)", p.part_id, r.score)
                outcomes.append((None, f"scoring failed: the scorer returned a non-finite score ({r.score})"))
            else:
                outcomes.append((r, None))
        return outcomes

    # -- output -------------------------------------------------------------------------------

    def _output_loop(self) -> None:
        while True:
            self._heartbeat["output"] = time.monotonic()
            try:
                item = self._output.get(timeout=0.5)
            except queue.Empty:
                continue
            if item is None:
                break
            try:
                self._emit_retrying(item)
            except Exception as e:
                if self._recorded(item.part.part_id):
                    # Its row holds its messages: they are replayed from there at the next start.
                    self.counts["output_errors"] += 1
                    log.exception("could not publish part %s (recorded; re-queued at the next start)",
                                  item.part.part_id)
                    continue
                # Never lose the part: record and publish it as an error (no images, no findings).
                log.exception("could not record part %s; recording it as an error", item.part.part_id)
                try:
                    self._emit(dataclasses.replace(item, result=None, error=f"output failed: {type(e).__name__}: {e}"))
                except Exception as e2:
                    self.counts["output_errors"] += 1
                    log.exception("could not record part %s even as an error", item.part.part_id)
                    self._publish_unrecorded(item, f"not recorded: {type(e2).__name__}: {e2}")
            finally:
                with self._ids_lock:
                    self._queued_ids.discard(item.part.part_id)

    def _publish_unrecorded(self, item: ScoredPart, reason: str) -> None:
        """Last resort for a part with no row (a disk that is full past its floor): its error result
        straight to the broker, not stored, so the PLC still hears of it while the station is connected."""
        p = item.part
        result = {"message_id": uuid.uuid4().hex, "part_id": p.part_id, "station": self.station,
                  "line": self.config.station.line, "timestamp": iso_time(p.frame.captured_at), "trigger": p.trigger,
                  "verdict": "error", "score": None, "error": reason, "recorded": False,
                  **({"request_id": p.request_id} if p.request_id else {})}
        if self.publisher is None or not self.publisher.publish_now("result", result):
            log.error("part %s has no row and its error result could not be published: %s", p.part_id, reason)

    STORE_RETRY_S = (0.2, 0.5, 1.0, 2.0, 5.0)

    def _emit_retrying(self, item: ScoredPart) -> None:
        """`_emit`, tried again from memory while the database is locked or busy (another process holds
        it, a slow disk), for up to `storage.write_retry_s`; each retry is counted in the health."""
        deadline = time.monotonic() + self.config.storage.write_retry_s
        attempt = 0
        while True:
            try:
                return self._emit(item)
            except EdgeError as e:
                text = str(e).lower()
                if not ("locked" in text or "busy" in text or "full" in text) or time.monotonic() > deadline:
                    raise
                if "full" in text:  # the disk: checkpoint and remove old images, then try again
                    self.store.make_room()
            self.counts["store_retries"] += 1
            wait = self.STORE_RETRY_S[min(attempt, len(self.STORE_RETRY_S) - 1)]
            attempt += 1
            if attempt == 1:
                log.warning("part %s: the traceability database is locked or its disk full; retrying (up to "
                            "%.0f s)", item.part.part_id, self.config.storage.write_retry_s)
            self._heartbeat["output"] = time.monotonic()  # waiting on the disk, not hung
            time.sleep(wait)

    def _recorded(self, part_id: str) -> bool:
        try:
            self.store.get(part_id)
            return True
        except EdgeError:
            return False

    def _emit(self, item: ScoredPart) -> None:
        c = self.config
        if item.result is not None and self.store.low_on_space():
            # Refused loudly rather than lost: a small error row and result fit in what the floor keeps.
            self.counts["refused_storage"] += 1
            item = dataclasses.replace(item, result=None, error=(
                f"refused: storage {c.storage.dir} has {self.store.free_mb():.1f} MB free, below "
                f"storage.min_free_mb {c.storage.min_free_mb:g}, with no image file left to remove"))
        p, r = item.part, item.result
        learning = self._collect_for_learning(p) if item.learning else None
        if learning is not None:
            summary = {"verdict": "learning", "score": None, "threshold": None, "regions": []}
        elif r is None:
            summary = {"verdict": "error", "score": None, "threshold": self._threshold(), "regions": []}
        else:
            summary = r.summary(c.station.mm_per_pixel)
        flagged = r is not None and r.anomalous
        findings = None
        images = None
        if flagged:
            findings = describe(p.frame.image, r, c.station.mm_per_pixel).to_dict()
        if r is not None and (c.storage.keep_images == "all" or (flagged and c.storage.keep_images == "flagged")):
            overlay = visual.result_overlay(p.frame.image, r)
            images = {"image": p.frame.image, "overlay": overlay, "mask": r.mask_at_frame().astype(np.uint8) * 255}
        files = self.store.write_files(p.part_id, p.frame.captured_at, images) if images else (None, 0)
        e2e_ms = (time.time() - p.frame.captured_at) * 1000
        self.end_to_end_ms.add(e2e_ms)
        result = {
            "message_id": uuid.uuid4().hex, "part_id": p.part_id, "station": self.station, "line": c.station.line,
            "timestamp": iso_time(p.frame.captured_at), "trigger": p.trigger,
            "verdict": summary["verdict"], "score": summary["score"] if r is not None else None,
            "threshold": summary["threshold"], "severity": round(r.severity, 4) if r is not None else None,
            "regions": summary["regions"], "frame_size": list(r.frame_size) if r is not None else None,
            "latency_ms": {"queue": round((item.scored_at - p.queued_at) * 1000 - item.score_ms, 2),
                           "score": round(item.score_ms, 2), "capture_to_publish": round(e2e_ms, 2)},
            "model_id": self.pack.model_id, "source": {"name": self.source.name, "index": p.frame.index,
                                                       **p.frame.meta},
        }
        if c.station.mm_per_pixel:
            result["mm_per_pixel"] = c.station.mm_per_pixel
        if p.request_id:
            result["request_id"] = p.request_id
        if learning is not None:
            result["learning"] = learning
        elif r is None:
            result["error"] = item.error or "scoring failed"
        messages = [["result", result]]
        if flagged:
            paths = self.store.file_paths(files[0])
            event = {"message_id": uuid.uuid4().hex, "part_id": p.part_id, "station": self.station,
                     "line": c.station.line, "timestamp": result["timestamp"], "score": result["score"], "threshold": result["threshold"],
                     "severity": result["severity"], "regions": summary["regions"],
                     "findings": findings["summary"], "files": paths}
            mode = c.mqtt.heatmap.mode
            if mode == "inline" and images is not None:
                jpeg = jpeg_within(images["overlay"], c.mqtt.heatmap.max_bytes)
                event["overlay_jpeg_base64"] = base64.b64encode(jpeg).decode()
            elif mode == "path" and "overlay" in paths:
                event["overlay_path"] = paths["overlay"]
            messages.append(["flagged", event])
        # Row (with its messages) first, then the outbox, then mark: a crash in between is replayed
        # at the next start with the same message ids, so subscribers can drop the duplicate.
        self.store.add_part(p.part_id, self.station, p.frame.captured_at, p.trigger, summary, self.pack.model_id,
                            findings, files, messages if self.publisher is not None else None)
        self.counts["parts"] += 1
        self.counts["errors"] += r is None and learning is None
        self.counts["learning"] += learning is not None
        self.counts["flagged"] += flagged
        self._publish_part(p.part_id, messages)
        if self.sinks:
            from edge.line.plc import result_to_sinks

            result_to_sinks(self.sinks, result)
        if flagged and self.explainer is not None:
            self._submit_explanation(p.part_id, findings, r)

    def _threshold(self) -> float | None:
        return round(self.scorer.threshold, 6) if self.scorer is not None else None

    def _collect_for_learning(self, part: Part) -> dict:
        """Learn mode: keep the part's frame for the state being learned (a part that arrives while the
        state is being built, or after a failed attempt filled nothing, is still answered `learning`)."""
        learner = self.learner
        if learner is None:  # learned while this part waited in the queue
            return {"collected": None, "of": None, "note": "arrived while the learned state was being installed; not scored"}
        try:
            progress, full = learner.add(part.part_id, part.frame.image)
        except Exception as e:
            log.warning("learn mode: part %s not kept: %s", part.part_id, e)
            return {**learner.progress(), "error": str(e)}
        if full:
            log.info("learn mode: %d parts collected; building the station state", learner.parts)
            self._jobs.put(("learn", None))
        return progress

    def _learn_state(self) -> dict:
        """Build the state from the collected parts (maintenance thread) and score from the next part on."""
        learner = self.learner
        with self._state_lock:
            state, summary = learner.build(log=log.info)
            state = self._state_for_backend(state)
            scorer = self._scorer_for(state)
            self.state, self.scorer, self.learner = state, scorer, None
        log.info("learn mode: state built from %d parts (%d set aside as suspect: %s); threshold %.4f",
                 summary["parts"], len(summary["suspects"]),
                 ", ".join(s["part_id"] for s in summary["suspects"]) or "none", scorer.threshold)
        return summary

    def _submit_explanation(self, part_id: str, findings: dict, result) -> None:
        try:
            embeddings = self._projector.embeddings(result) if self._projector is not None else None
            queued = self.explainer.submit(part_id, findings, embeddings)
        except EdgeError as e:
            log.warning("part %s not explained: %s", part_id, e)
            self.store.set_explanation_waiting(part_id, "failed")
            return
        # A full queue keeps the part pending in the dialogue store; the worker comes back to it.
        self.store.set_explanation_waiting(part_id, "queued" if queued else "pending")

    def _publish_part(self, part_id: str, messages: list) -> None:
        if self.publisher is None:
            return
        for topic, payload in messages:
            self.publisher.publish(topic, payload, message_id=payload["message_id"])
        self.store.mark_published(part_id)

    def _replay_unpublished(self) -> int:
        """Parts recorded but perhaps not handed to the outbox before a crash."""
        pending = self.store.unpublished()
        for part_id, messages in pending:
            self._publish_part(part_id, messages)
        if pending:
            log.warning("re-queued the messages of %d part(s) recorded just before the last stop", len(pending))
        return len(pending)

    def _publish(self, topic: str, payload: dict) -> None:
        if self.publisher is not None:
            self.publisher.publish(topic, payload)

    def on_explanation(self, message: dict) -> None:
        """Called by the explanation worker: store it with the part and publish it."""
        try:
            self.store.set_explanation(message["part_id"], message.get("answer"), message.get("status", "done"))
        except EdgeError as e:
            log.warning("explanation for %s not stored: %s", message.get("part_id"), e)
        self._publish("explanation", {"station": self.station, **message})

    # -- commands -----------------------------------------------------------------------------

    def _on_command(self, topic: str, payload: bytes, retained: bool = False) -> None:
        """Every command gets a reply on P/reply; a refused one is also logged and counted (bad_commands)."""
        name = topic.rsplit("/", 1)[-1]
        try:
            if retained:
                # A retained command is an old order replayed by the broker at each (re)connect:
                # acting on it would trigger, enroll or reload again on every reconnection.
                raise CommandError(f"{name}: ignored because it is retained (the broker replays it at every "
                                   "connect); publish commands with retain false, and clear this one by publishing "
                                   f"an empty retained message to {topic}")
            command = parse_command(name, payload)
            if isinstance(command, TriggerCommand):
                self.trigger(command.part_id, command.request_id)
                self._reply(name, command.request_id, True, part_id=command.part_id, queued=True)
            elif isinstance(command, EnrollGoodCommand):
                self.store.get(command.part_id)  # unknown ids are answered now, not after a queue
                self._jobs.put(("enroll-good", command))
            elif isinstance(command, ReloadCommand):
                self._jobs.put(("reload", command))
            elif isinstance(command, (DeployCommand, RollbackCommand)):
                self._reply(name, command.request_id, True, step="queued", done=False)
                self._jobs.put((name, command))
        except Exception as e:  # EdgeError: refused as sent; anything else is ours, still answered
            self.counts["bad_commands"] += 1
            error = str(e) if isinstance(e, EdgeError) else f"{name}: not carried out: {type(e).__name__}: {e}"
            (log.warning if isinstance(e, EdgeError) else log.exception)("command on %s refused: %s", topic, error)
            self._reply(name, request_id_of(payload), False, error=error, **({"retained": True} if retained else {}))

    def command(self, name: str, payload: bytes) -> None:
        """A command from another protocol (edge.line.plc), handled as `<prefix>/cmd/<name>` would be."""
        self._on_command(f"{self.config.topic_prefix}/cmd/{name}", payload)

    def _reply(self, command: str, request_id: str | None, ok: bool, **fields) -> None:
        self._publish("reply", {"command": command, "request_id": request_id, "ok": ok, **fields,
                                "time": iso_time(time.time())})

    def _maintenance_loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                break
            kind, command = job
            rid = getattr(command, "request_id", None)
            try:
                if kind == "reload":
                    result = self.reload()
                elif kind == "learn":
                    result = self._learn_state()
                elif kind in ("deploy", "rollback"):
                    result = self.deploy(command) if kind == "deploy" else self.rollback(rid)
                else:
                    result = self.enroll_good(command.part_id, command.by)
                self._reply(kind, rid, True, **result)
            except Exception as e:
                log.warning("%s failed: %s", kind, e)
                step = {"step": e.step, "done": True} if hasattr(e, "step") else {}
                self._reply(kind, rid, False, error=str(e), **step)

    def enroll_good(self, part_id: str, by: str) -> dict:
        """A stored part is good: add its image to the station's references, rebuild the bank,
        recalibrate, and score with the new state from the next frame on."""
        if self.scorer is None:
            raise CommandError("enroll-good: the station is in learn mode and has no state yet; it builds one "
                               "from its first learn.parts parts")
        row = self.store.get(part_id)
        image = row["files"].get("image")
        if not image:
            raise CommandError(f"enroll-good: part {part_id!r} has no stored image (storage.keep_images is "
                               f"{self.config.storage.keep_images!r}, or its files were removed by retention)")
        if row["verdict"] == "anomalous" and row.get("feedback") is None:
            self.store.set_feedback(part_id, "false_alarm", by, "enrolled as good")
        old = self.scorer.threshold
        with self._state_lock:
            state = enroll(self.pack, [Path(image)], self.config.state, quiet=True, log=log.info,
                           extractor=FeatureExtractor(self.pack, self.backend),
                           tiling=self.config.tiling_spec(), target_false_reject=self.config.target_false_reject)
            self.state = state
            self.scorer = self._scorer_for(state)
        log.info("enrolled part %s as good (by %s): %d references, threshold %.4f -> %.4f", part_id, by,
                 len(state.references), old, self.scorer.threshold)
        reply = {"part_id": part_id, "references": len(state.references), "threshold_before": round(old, 6),
                 "threshold": round(self.scorer.threshold, 6)}
        if isinstance(self.scorer, StudentScorer):
            # Training needs torch and minutes of CPU: not on the line.
            reply["note"] = ("added to the references and the bank; the learned scorer was not retrained: run "
                             f"anomaly-edge enroll --scorer student --out {self.config.state} off the line to include it")
        return reply

    def _switch_models(self, config: StationConfig, models, expect_state=None) -> None:
        """Swap pack, backend, state and scorer together (edge.station.deploy); the score loop takes the next batch's
        scorer from here. The explainer keeps the LLM it started with until a restart. `expect_state`: refuse
        (CommandError) if an enrollment or reload replaced the state since the models were built."""
        with self._state_lock:
            if expect_state is not None and self.state is not expect_state:
                raise CommandError("the station state changed during the deployment (an enrollment or reload); "
                                   "nothing switched: send it again")
            self.config = config
            self.pack, self.backend, self.state, self.scorer = models

    def deploy(self, command: DeployCommand) -> dict:
        """Verify, trial-score and switch to a pack (and state); every step is replied on P/reply."""
        def progress(step, **fields):
            self._reply("deploy", command.request_id, True, step=step, done=False, **fields)
        return self._deploy_outcome(command.request_id, lambda: run_deploy(self, command, load_models, progress))

    def rollback(self, request_id: str | None = None) -> dict:
        def progress(step, **fields):
            self._reply("rollback", request_id, True, step=step, done=False, **fields)
        return self._deploy_outcome(request_id, lambda: run_rollback(self, load_models, progress))

    def _deploy_outcome(self, request_id, attempt) -> dict:
        try:
            result = attempt()
        except EdgeError as e:
            self.deploy_last = {"request_id": request_id, "ok": False, "step": getattr(e, "step", None),
                                "error": str(e)[:500], "time": iso_time(time.time())}
            raise
        self.deploy_last = {"request_id": request_id, "ok": True, "model_id": result["model_id"],
                            "time": iso_time(time.time())}
        log.info("deployed: now on pack %s (%s)", result["model_id"], result["pack_dir"])
        return result

    def _state_for_backend(self, state):
        """The state, or (gpu.on_calibration_mismatch: recalibrate) it recalibrated for this backend."""
        return follow_engine(self.pack, state, FeatureExtractor(self.pack, self.backend),
                             self.config.gpu.on_calibration_mismatch, self.config.tiling_spec())

    def _scorer_for(self, state):
        # load_models' call; the new scorer keeps the encoder session of the one it replaces (not a student's).
        return build_scorer(self.pack, state, self.config.tiling_spec(), backend=self.backend, kind=self.config.scorer,
                            allow_undertrained=self.config.student_allow_undertrained,
                            cpu_scoring=self.config.gpu.cpu_scoring, replacing=self.scorer)

    def reload(self) -> dict:
        """Re-read the config file (applying what can be applied live) and the station state."""
        applied, restart = [], []
        if self.config_path is not None:
            new = keep_deployed(load_config(self.config_path), self.config)  # edge.station.deploy's pack stays
            keys = changed_keys(self.config, new)
            restart = needs_restart(keys)
            applied = [k for k in keys if k not in restart]
            self.config = with_reloaded(self.config, new)
            self.store.retention_days = new.storage.retention_days
            self.store.disk_budget_mb = new.storage.disk_budget_mb
            self.store.min_free_mb = new.storage.min_free_mb
            logging.getLogger().setLevel(new.log_level.upper())
            if restart:
                log.warning("reload: %s changed but need a restart to take effect", ", ".join(restart))
        if self.scorer is None:
            log.info("reloaded: applied %s; still learning (no state yet)", applied or "nothing new")
            return {"applied": applied, "needs_restart": restart, "threshold": None,
                    "learning": self.learner.progress() if self.learner else None}
        with self._state_lock:
            state = self._state_for_backend(load_state(self.config.state, self.pack))
            scorer = self._scorer_for(state)  # may refuse (an undertrained student): the old pair keeps scoring
            self.state, self.scorer = state, scorer
        log.info("reloaded: applied %s; threshold %.4f", applied or "nothing new", self.scorer.threshold)
        return {"applied": applied, "needs_restart": restart, "threshold": round(self.scorer.threshold, 6)}

    # -- health -------------------------------------------------------------------------------

    def _on_source_state(self, state: str, detail: str) -> None:
        self.counts[f"source_{state}"] += 1
        self._publish_source_state()

    def _publish_source_state(self) -> None:
        # Also repeated with each status: a change seen before the broker connected is not lost.
        if self.publisher is not None:
            self.publisher.publish_now("source", {"source": self.source.name, "state": self.source.state,
                                                  "detail": self.source.detail, "time": iso_time(time.time())},
                                       retain=True)

    def health(self) -> dict:
        pub = self.publisher.stats() if self.publisher is not None else None
        parts, fresh = self.store.count_nowait()  # never waits on a locked database
        free_mb = self.store.free_mb()
        low_space = self.store.low_space and free_mb < self.store.min_free_mb  # no SQL: recovers as space returns
        degraded = low_space or self.store.over_budget
        return {
            "state": "stopping" if self._stop.is_set() else "degraded" if degraded else "online",
            "station": self.station, "line": self.config.station.line, "model_id": self.pack.model_id,
            "time": iso_time(time.time()), "uptime_s": round(time.time() - self.started_at, 1),
            "trigger": self.config.trigger.mode, "threshold": self._threshold(),
            "references": len(self.state.references) if self.state is not None else 0,
            "learning": self.learner.progress() if self.learner is not None else None,
            "fps": {"captured": round(self.captured.rate(), 2), "scored": round(self.scored.rate(), 2)},
            "latency_ms": {"queue": self.queue_ms.percentiles(), "score": self.score_ms.percentiles(),
                           "capture_to_publish": self.end_to_end_ms.percentiles()},
            "queues": {"score": len(self._queue), "output": self._output.qsize(), "triggers": self._triggers.qsize(),
                       "jobs": self._jobs.qsize()},
            "counts": {k: int(self.counts[k]) for k in ("captured", "parts", "flagged", "errors", "learning",
                                                         "bad_commands", "output_errors")}
                      | {"dropped_frames": self._queue.dropped, "bad_frames": self.source.bad_frames,
                         "reconnects": self.source.reconnects},
            "source": {"name": self.source.name, "state": self.source.state, "detail": self.source.detail},
            "broker": pub,
            "storage": {"parts": parts, "busy": not fresh, "write_retries": int(self.counts["store_retries"]),
                        "files_mb": round(self.store.files_bytes / 1e6, 2),
                        "budget_mb": self.store.disk_budget_mb, "write_errors": self.store.write_errors,
                        "used_mb": round((self.store.files_bytes + self.store.db_bytes()) / 1e6, 2),
                        "free_mb": round(free_mb, 1), "min_free_mb": self.store.min_free_mb,
                        "low_space": low_space, "over_budget": self.store.over_budget,
                        "images_skipped": self.store.images_skipped,
                        "refused_parts": int(self.counts["refused_storage"])},
            "pack_sha256": self.pack.manifest_sha256, "deploy": deploy_health(self),
            "explain": self.explainer.stats() if self.explainer is not None else (
                {"error": self.explain_error} if self.explain_error else None),
        }

    @staticmethod
    def _status_line(h: dict) -> str:
        return (f"{h['fps']['scored']:.1f} parts/s, {h['counts']['flagged']} flagged, source {h['source']['state']}, "
                f"outbox {h['broker']['outbox_size'] if h['broker'] else '-'}")

    def _health_loop(self) -> None:
        interval = self.notifier.watchdog_interval()
        next_status = next_retention = time.monotonic()
        while not self._stopped.is_set() and not (self._stop.is_set() and not self._threads[1].is_alive()):
            now = time.monotonic()
            # Ping the watchdog only while the stages turn over: a hung stage gets us restarted.
            if interval and all(now - t < 30 for t in self._heartbeat.values()):
                self.notifier.watchdog()
            if now >= next_status:
                next_status = now + self.config.health.status_interval_s
                h = self.health()
                if self.publisher is not None:
                    self.publisher.publish_now("status", h, retain=True)
                    self._publish_source_state()
                self.notifier.status(self._status_line(h))
            if now >= next_retention:
                next_retention = now + 3600
                try:
                    self.store.enforce_retention()
                except EdgeError as e:
                    log.error("retention: %s", e)
            # Once stopping, `_stop` is set and returns at once: wait on `_stopped` so the pings keep
            # their pace while the stages drain (a busy loop here sent 60,585 pings in 1.3 s).
            (self._stopped if self._stop.is_set() else self._stop).wait(min(interval or 1.0, 1.0))


def load_models(config: StationConfig):
    """(pack, backend, state, scorer) as the station runs them: the pack's files checked against their sha256, the
    state's schema, hashes and encoder against the pack, the scorer built (an undertrained student refused).
    In learn mode with no state yet: (pack, backend, None, None)."""
    pack = load_pack(config.pack)
    backend = create_backend(pack, config.gpu.backend, gpu=config.gpu.options())
    if config.learn is not None and not (Path(config.state) / "state.yaml").is_file():
        return pack, backend, None, None
    state = follow_engine(pack, load_state(config.state, pack), FeatureExtractor(pack, backend),
                          config.gpu.on_calibration_mismatch, config.tiling_spec())
    scorer = build_scorer(pack, state, config.tiling_spec(), backend=backend, kind=config.scorer,
                          allow_undertrained=config.student_allow_undertrained, cpu_scoring=config.gpu.cpu_scoring)
    return pack, backend, state, scorer


def check(config: StationConfig) -> str:
    """What `run --check` verifies beyond the config file: the models exactly as `run` loads them and
    the MQTT TLS files; returns a one-line summary, raises EdgeError naming what is wrong."""
    pack, _, state, scorer = load_models(config)
    tls = config.mqtt.tls
    if config.mqtt.enabled and tls is not None:
        from edge.line.publish import tls_context

        tls_context(tls.ca, tls.cert, tls.key)
    if config.api.enabled and config.api.tcp_port:
        from edge.line.api import LocalApi

        LocalApi(None, config.api_socket, token_file=config.api.token_file)._token()  # readable, long enough
    if state is None:
        return (f"pack {pack.model_id}, learn mode: no state in {config.state} yet, built from the first "
                f"{config.learn.parts} parts")
    return (f"pack {pack.model_id}, state with {len(state.references)} references, scorer "
            f"{type(scorer).__name__}, threshold {scorer.threshold:.4f}")


def remote_answerer(pack, spec):
    """explain.backend remote: the server first, the pack's LLM in a local child as fallback if asked for."""
    if spec.backend != "remote":
        return None
    from edge.explain.llm_process import LlmProcess
    from edge.explain.remote_llm import RemoteFirst, RemoteLlm

    r = spec.remote
    local = None
    if r.fallback_local and pack.llm is not None:
        local = LlmProcess(pack, n_threads=spec.threads, max_tokens=spec.max_tokens, time_limit_s=spec.time_limit_s)
    return RemoteFirst(RemoteLlm(r.url, r.model, r.api_key_file, r.time_limit_s, r.retries,
                                 max_tokens=spec.max_tokens), local)


def run(config_path: str | Path, exit_at_end: bool = False) -> int:
    config = load_config(config_path)
    logging.getLogger().setLevel(config.log_level.upper())
    runtime = Runtime(config, config_path, exit_at_end=exit_at_end)
    return runtime.run_forever()

