"""The PLC inspection handshake, whatever carries it (OPC UA variables, Modbus registers).

Signals are named as in the OPC UA address space (docs/plc.md). Each event method returns the outputs to
set, in order, as a dict {signal: value}; the protocol writes them in that order (results before
ResultValid, so a PLC that sees ResultValid reads a complete result). All calls come from one thread
(the protocol server's event loop).

    trigger_edge(high, part_id)   the PLC's Trigger went high (accept a part) or low (drop TriggerAck)
    ack_edge(high)                the PLC's ResultAck went high (drop ResultValid) or low (present the next)
    result(result)                a recorded part's JSON result; presented if the PLC triggered it

Owns the handshake's state machine. Must not do protocol I/O (opcua.py, modbus.py do).
"""
from __future__ import annotations

import collections
import logging
from datetime import datetime, timezone

from edge.line.commands import CommandError
from edge.line.config import PART_ID_PATTERN

log = logging.getLogger(__name__)


class Handshake:
    def __init__(self, runtime, queue_size: int, protocol: str):
        self.runtime = runtime
        self.queue_size = queue_size
        self.protocol = protocol
        self.outstanding: collections.OrderedDict[str, None] = collections.OrderedDict()  # accepted, not acked
        self.ready: collections.deque[dict] = collections.deque()  # scored, waiting to be presented
        self.presented: str | None = None
        self.trigger_high = False
        self.ack_high = False
        self.generated = 0
        self.last_refusal: str = ""  # "overrun" or "refused" for the last refused trigger
        self.counts = collections.Counter()

    def trigger_edge(self, high: bool, part_id: str | None, via: str = "Trigger") -> dict:
        if high and not self.trigger_high:
            self.trigger_high = True
            return self.accept(part_id, via)[2]
        if not high and self.trigger_high:
            self.trigger_high = False
            return {"TriggerAck": False}
        return {}

    def accept(self, part_id: str | None, via: str) -> tuple[bool, str, dict]:
        """(accepted, reason, outputs): the part queued for scoring, or refused with the reason in Error."""
        part_id = part_id or self._new_part_id()
        if not PART_ID_PATTERN.match(part_id):
            self.counts["refused"] += 1
            self.last_refusal = "refused"
            reason = (f"{via}: part id {part_id[:140]!r} refused: 1-128 letters, digits or . _ : - "
                      "(starting with a letter or digit)")
            log.warning("%s: %s", self.protocol, reason)
            return False, reason, {"Error": reason, "TriggerAck": True}
        if len(self.outstanding) >= self.queue_size:
            reason = (f"{via}: part {part_id} refused: {len(self.outstanding)} triggered parts are waiting "
                      f"(trigger_queue {self.queue_size}); acknowledge results faster")
            self.counts["overruns"] += 1
            self.last_refusal = "overrun"
            log.warning("%s: %s", self.protocol, reason)
            return False, reason, {"BufferOverrun": True, "Error": reason, "TriggerAck": True}
        try:
            self.runtime.trigger(part_id)
        except CommandError as e:
            self.counts["refused"] += 1
            self.last_refusal = "refused"
            log.warning("%s: %s refused: %s", self.protocol, via, e)
            return False, str(e), {"Error": str(e), "TriggerAck": True}
        self.outstanding[part_id] = None
        self.counts["triggers"] += 1
        return True, f"part {part_id} queued", {"Error": "", "Busy": True, "TriggerAck": True}

    def _new_part_id(self) -> str:
        self.generated += 1
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%f")[:-3]
        return f"{self.runtime.station}-{self.protocol}-{stamp}-{self.generated:06d}"

    def ack_edge(self, high: bool) -> dict:
        if high and not self.ack_high:
            self.ack_high = True
            if self.presented is not None:
                self.outstanding.pop(self.presented, None)
                self.presented = None
                return {"ResultValid": False}
        elif not high and self.ack_high:
            self.ack_high = False
            return self._present_next()
        return {}

    def result(self, result: dict) -> dict:
        if result["part_id"] not in self.outstanding:
            return {}
        self.ready.append(result)
        return self._present_next()

    def _present_next(self) -> dict:
        if self.presented is not None or self.ack_high or not self.ready:
            return {}
        r = self.ready.popleft()
        self.presented = r["part_id"]
        unscored = len(self.outstanding) - len(self.ready) - 1
        self.counts["presented"] += 1
        return {"PartId": r["part_id"], "Verdict": r["verdict"], "Pass": r["verdict"] == "normal",
                "Score": float(r["score"]) if r.get("score") is not None else 0.0,
                "Threshold": float(r["threshold"]) if r.get("threshold") is not None else 0.0, "RegionCount": len(r.get("regions") or []),
                "Error": r.get("error", ""), "Busy": unscored > 0, "ResultValid": True}
