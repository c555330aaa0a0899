"""The output stage's work: record each scored part (its row and image files in the traceability store)
and hand its messages to the outbox, the PLC sinks and the explanation worker; never lose a part.

Owns the order row → outbox → mark (a crash in between is replayed with the same message ids), the
retries while the database is locked or the disk full, and the last-resort error results. Must not
build payloads itself (edge.line.messages), run threads (edge.line.pipeline) or swap models.
"""
from __future__ import annotations

import dataclasses
import logging
import time
import uuid

import numpy as np

from edge.errors import EdgeError
from edge.explain.findings import describe
from edge.line import messages
from edge.line.pipeline import ScoredPart
from edge.scoring import visual

log = logging.getLogger(__name__)

STORE_RETRY_S = (0.2, 0.5, 1.0, 2.0, 5.0)


class PartRecorder:
    """Records parts for the runtime `rt` (edge.line.runtime): reads its config, pack, source, store,
    publisher, sinks, explainer and counts, and its manager's learn-mode collector and threshold."""

    def __init__(self, rt):
        self.rt = rt

    def record_retrying(self, item: ScoredPart, heartbeat: dict) -> None:
        """`record`, tried again from memory while the database is locked or busy (another process holds
        it, a slow disk), for up to `storage.write_retry_s`; each retry is counted in the health."""
        rt = self.rt
        deadline = time.monotonic() + rt.config.storage.write_retry_s
        attempt = 0
        while True:
            try:
                return self.record(item)
            except EdgeError as e:
                text = str(e).lower()
                if not ("locked" in text or "busy" in text or "full" in text) or time.monotonic() > deadline:
                    raise
                if "full" in text:  # the disk: checkpoint and remove old images, then try again
                    rt.store.make_room()
            rt.counts["store_retries"] += 1
            wait = STORE_RETRY_S[min(attempt, len(STORE_RETRY_S) - 1)]
            attempt += 1
            if attempt == 1:
                log.warning("part %s: the traceability database is locked or its disk full; retrying (up to "
                            "%.0f s)", item.part.part_id, rt.config.storage.write_retry_s)
            heartbeat["output"] = time.monotonic()  # waiting on the disk, not hung
            time.sleep(wait)

    def record_after_failure(self, item: ScoredPart, e: Exception) -> None:
        """A part `record_retrying` could not record: replayed from its row if it has one, else recorded
        as an error, else its error result published unrecorded."""
        rt = self.rt
        if self.recorded(item.part.part_id):
            # Its row holds its messages: they are replayed from there at the next start.
            rt.counts["output_errors"] += 1
            log.exception("could not publish part %s (recorded; re-queued at the next start)", item.part.part_id)
            return
        # Never lose the part: record and publish it as an error (no images, no findings).
        log.exception("could not record part %s; recording it as an error", item.part.part_id)
        try:
            self.record(dataclasses.replace(item, result=None, error=f"output failed: {type(e).__name__}: {e}"))
        except Exception as e2:
            rt.counts["output_errors"] += 1
            log.exception("could not record part %s even as an error", item.part.part_id)
            self.publish_unrecorded(item, f"not recorded: {type(e2).__name__}: {e2}")

    def record_leftovers(self, left: list[ScoredPart], unscored: int) -> None:
        """Parts a stop cut short (edge.line.pipeline.Pipeline.leftovers), recorded as they are."""
        for item in left:
            try:
                self.record(item)
            except Exception as e:
                self.rt.counts["output_errors"] += 1
                log.exception("stopping: could not record part %s", item.part.part_id)
                self.publish_unrecorded(item, f"not recorded: {type(e).__name__}: {e}")
        if left:
            log.warning("stopping: recorded %d part(s) the stop timeout cut short (%d of them as not scored)",
                        len(left), unscored)

    def recorded(self, part_id: str) -> bool:
        try:
            self.rt.store.get(part_id)
            return True
        except EdgeError:
            return False

    def publish_unrecorded(self, item: ScoredPart, reason: str) -> None:
        """Last resort for a part with no row (a disk that is full past its floor): its error result
        straight to the broker, not stored, so the PLC still hears of it while the station is connected."""
        rt, p = self.rt, item.part
        result = messages.unrecorded_result_message(message_id=uuid.uuid4().hex, station=rt.station,
                                                    line=rt.config.station.line, part=p, reason=reason)
        if rt.publisher is None or not rt.publisher.publish_now("result", result):
            log.error("part %s has no row and its error result could not be published: %s", p.part_id, reason)

    def record(self, item: ScoredPart) -> None:
        rt = self.rt
        c, store = rt.config, rt.store
        if item.result is not None and store.low_on_space():
            # Refused loudly rather than lost: a small error row and result fit in what the floor keeps.
            rt.counts["refused_storage"] += 1
            item = dataclasses.replace(item, result=None, error=(
                f"refused: storage {c.storage.dir} has {store.free_mb():.1f} MB free, below "
                f"storage.min_free_mb {c.storage.min_free_mb:g}, with no image file left to remove"))
        p, r = item.part, item.result
        learning = rt.manager.collect_for_learning(p) if item.learning else None
        # learn.refine: decided by a state that is still being refined; the frame is kept for it
        refining = rt.manager.collect_for_refinement(p) if r is not None and rt.manager.refiner is not None else None
        summary = messages.part_summary(r, learning, rt.manager.threshold(), c.station.mm_per_pixel)
        flagged = r is not None and r.anomalous
        findings = None
        images = None
        if flagged:
            findings = describe(p.frame.image, r, c.station.mm_per_pixel).to_dict()
        if r is not None and (c.storage.keep_images == "all" or (flagged and c.storage.keep_images == "flagged")):
            overlay = visual.result_overlay(p.frame.image, r)
            images = {"image": p.frame.image, "overlay": overlay, "mask": r.mask_at_frame().astype(np.uint8) * 255}
        files = store.write_files(p.part_id, p.frame.captured_at, images) if images else (None, 0)
        e2e_ms = (time.time() - p.frame.captured_at) * 1000
        rt.pipeline.end_to_end_ms.add(e2e_ms)
        result = messages.result_message(
            message_id=uuid.uuid4().hex, station=rt.station, line=c.station.line, part=p, summary=summary, result=r,
            model_id=rt.pack.model_id, source_name=rt.source.name,
            queue_ms=(item.scored_at - p.queued_at) * 1000 - item.score_ms, score_ms=item.score_ms,
            capture_to_publish_ms=e2e_ms, mm_per_pixel=c.station.mm_per_pixel, learning=learning, error=item.error,
            refining=refining)
        out = [["result", result]]
        if flagged:
            paths = store.file_paths(files[0])
            mode = c.mqtt.heatmap.mode
            message_id = uuid.uuid4().hex
            jpeg = (messages.jpeg_within(images["overlay"], c.mqtt.heatmap.max_bytes)
                    if mode == "inline" and images is not None else None)
            out.append(["flagged", messages.flagged_message(
                message_id=message_id, result=result, findings_summary=findings["summary"], files=paths,
                overlay_jpeg=jpeg, overlay_path=paths.get("overlay") if mode == "path" else None)])
        # Row (with its messages) first, then the outbox, then mark: a crash in between is replayed
        # at the next start with the same message ids, so subscribers can drop the duplicate.
        store.add_part(p.part_id, rt.station, p.frame.captured_at, p.trigger, summary, rt.pack.model_id,
                       findings, files, out if rt.publisher is not None else None)
        rt.counts["parts"] += 1
        rt.counts["errors"] += r is None and learning is None
        rt.counts["learning"] += learning is not None
        rt.counts["flagged"] += flagged
        self.publish_part(p.part_id, out)
        if rt.sinks:
            from edge.line.plc import result_to_sinks

            result_to_sinks(rt.sinks, result)
        if flagged and rt.explainer is not None:
            self._submit_explanation(p.part_id, findings, r)

    def _submit_explanation(self, part_id: str, findings: dict, result) -> None:
        rt = self.rt
        try:
            embeddings = rt.projector.embeddings(result) if rt.projector is not None else None
            queued = rt.explainer.submit(part_id, findings, embeddings)
        except EdgeError as e:
            log.warning("part %s not explained: %s", part_id, e)
            rt.store.set_explanation_waiting(part_id, "failed")
            return
        # A full queue keeps the part pending in the dialogue store; the worker comes back to it.
        rt.store.set_explanation_waiting(part_id, "queued" if queued else "pending")

    def publish_part(self, part_id: str, out: list) -> None:
        rt = self.rt
        if rt.publisher is None:
            return
        for topic, payload in out:
            rt.publisher.publish(topic, payload, message_id=payload["message_id"])
        rt.store.mark_published(part_id)

    def replay_unpublished(self) -> int:
        """Parts recorded but perhaps not handed to the outbox before a crash."""
        pending = self.rt.store.unpublished()
        for part_id, out in pending:
            self.publish_part(part_id, out)
        if pending:
            log.warning("re-queued the messages of %d part(s) recorded just before the last stop", len(pending))
        return len(pending)

    def on_explanation(self, message: dict) -> None:
        """Called by the explanation worker: store it with the part and publish it."""
        rt = self.rt
        try:
            rt.store.set_explanation(message["part_id"], message.get("answer"), message.get("status", "done"))
        except EdgeError as e:
            log.warning("explanation for %s not stored: %s", message.get("part_id"), e)
        if rt.publisher is not None:
            rt.publisher.publish("explanation", messages.explanation_message(rt.station, message))
