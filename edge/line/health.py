"""The station's health: the status snapshot (P/status, GET /health), the retained P/source message,
and the health thread that publishes status, pings the systemd watchdog while the stages turn over
and applies retention hourly.

Owns when these are sent and what is sampled for them. Must not build their payloads
(edge.line.messages), change models or touch the pipeline's queues beyond reading their sizes.
"""
from __future__ import annotations

import logging
import threading
import time

from edge.errors import EdgeError
from edge.line import messages
from edge.station.deploy import deploy_health

log = logging.getLogger(__name__)


def health(rt) -> dict:
    """The status snapshot of the runtime `rt` (edge.line.runtime) now."""
    store, pipeline, manager = rt.store, rt.pipeline, rt.manager
    parts, fresh = store.count_nowait()  # never waits on a locked database
    free_mb = store.free_mb()
    return messages.status_message(
        now=time.time(), started_at=rt.started_at, stopping=pipeline.stop_event.is_set(), station=rt.station,
        line=manager.config.station.line, model_id=manager.pack.model_id, pack_sha256=manager.pack.manifest_sha256,
        trigger_mode=manager.config.trigger.mode, threshold=manager.threshold(),
        references=len(manager.state.references) if manager.state is not None else 0,
        learning=manager.learner.progress() if manager.learner is not None else None,
        refining=manager.refiner.progress() if manager.refiner is not None else None,
        crashed=pipeline.crashed or None,
        rates={"captured": pipeline.captured.rate(), "scored": pipeline.scored.rate()},
        latencies={"queue": pipeline.queue_ms.percentiles(), "score": pipeline.score_ms.percentiles(),
                   "capture_to_publish": pipeline.end_to_end_ms.percentiles()},
        queues={"score": len(pipeline.queue), "output": pipeline.output.qsize(),
                "triggers": pipeline.triggers.qsize(), "jobs": manager.jobs.qsize()},
        counts=rt.counts, dropped_frames=pipeline.queue.dropped, source=rt.source,
        broker=rt.publisher.stats() if rt.publisher is not None else None,
        storage={"parts": parts, "fresh": fresh, "free_mb": free_mb, "low_space_flag": store.low_space,
                 "min_free_mb": store.min_free_mb, "over_budget": store.over_budget,
                 "files_bytes": store.files_bytes, "db_bytes": store.db_bytes(),
                 "disk_budget_mb": store.disk_budget_mb, "write_errors": store.write_errors,
                 "images_skipped": store.images_skipped},
        deploy=deploy_health(manager),
        explain=rt.explainer.stats() if rt.explainer is not None else (
            {"error": rt.explain_error} if rt.explain_error else None))


def publish_source_state(rt, state: str | None = None, detail: str | None = None) -> None:
    """The retained P/source: the source's state now (also repeated with each status, so a change seen
    before the broker connected is not lost), or the `state` and `detail` given."""
    if rt.publisher is not None:
        rt.publisher.publish_now("source", messages.source_message(
            rt.source.name, state or rt.source.state, detail or rt.source.detail, time.time()), retain=True)


class HealthLoop:
    """The health thread of the runtime `rt`: status every health.status_interval_s, watchdog pings,
    retention every hour; it ends when the station has stopped (or is stopping and scoring is done)."""

    def __init__(self, rt):
        self.rt = rt
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name="edge-health", daemon=True)
        self.thread.start()

    def join(self, timeout: float) -> None:
        if self.thread is not None:
            self.thread.join(timeout)

    def _loop(self) -> None:
        rt = self.rt
        pipeline, notifier, stopped = rt.pipeline, rt.notifier, rt.stopped
        stop = pipeline.stop_event
        interval = notifier.watchdog_interval()
        next_status = next_retention = time.monotonic()
        while not stopped.is_set() and not (stop.is_set() and not pipeline.scoring_alive()):
            now = time.monotonic()
            # Ping the watchdog only while the stages turn over: a hung or dead stage gets us restarted.
            if interval and all(now - t < 30 for t in pipeline.heartbeat.values()) and (
                    stop.is_set() or pipeline.stages_alive()):
                notifier.watchdog()
            if now >= next_status:
                next_status = now + rt.config.health.status_interval_s
                h = health(rt)
                if rt.publisher is not None:
                    rt.publisher.publish_now("status", h, retain=True)
                    publish_source_state(rt)
                notifier.status(messages.status_line(h))
            if now >= next_retention:
                next_retention = now + 3600
                try:
                    rt.store.enforce_retention()
                except EdgeError as e:
                    log.error("retention: %s", e)
            # Once stopping, `stop` is set and returns at once: wait on `stopped` so the pings keep
            # their pace while the stages drain (a busy loop here sent 60,585 pings in 1.3 s).
            (stopped if stop.is_set() else stop).wait(min(interval or 1.0, 1.0))
