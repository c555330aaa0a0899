"""The MQTT payloads of docs/mqtt.md, each built by a pure function of its inputs: result, flagged,
explanation, reply, source, status (the health snapshot) and the status line for systemd.

Owns the payloads' keys, their order and their rounding (tests/golden/*.json pin them byte for byte).
Must not touch the broker, the store, the clock or any thread: callers pass message ids, times and
measurements in, and publish what comes back.
"""
from __future__ import annotations

import base64

import cv2
import numpy as np

from edge.line.store import iso_time


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


def part_summary(result, learning: dict | None, threshold: float | None, mm_per_pixel: float | None) -> dict:
    """What the store records and the result repeats: the scorer's summary, or the learning/error stand-in."""
    if learning is not None:
        return {"verdict": "learning", "score": None, "threshold": None, "regions": []}
    if result is None:
        return {"verdict": "error", "score": None, "threshold": threshold, "regions": []}
    return result.summary(mm_per_pixel)


def result_message(*, message_id: str, station: str, line: str, part, summary: dict, result, model_id: str,
                   source_name: str, queue_ms: float, score_ms: float, capture_to_publish_ms: float,
                   mm_per_pixel: float | None, learning: dict | None = None, error: str | None = None,
                   refining: dict | None = None) -> dict:
    """P/result for one part. `part`: its part_id, trigger, request_id and frame (captured_at, index, meta).
    `refining`: {collected, of} while the deciding state is being refined from the line (learn.refine)."""
    r = result
    message = {
        "message_id": message_id, "part_id": part.part_id, "station": station, "line": line,
        "timestamp": iso_time(part.frame.captured_at), "trigger": part.trigger,
        "verdict": summary["verdict"], "score": summary["score"] if r is not None else None,
        "threshold": summary["threshold"], "severity": round(r.severity, 4) if r is not None else None,
        "regions": summary["regions"], "frame_size": list(r.frame_size) if r is not None else None,
        "latency_ms": {"queue": round(queue_ms, 2), "score": round(score_ms, 2),
                       "capture_to_publish": round(capture_to_publish_ms, 2)},
        "model_id": model_id, "source": {"name": source_name, "index": part.frame.index, **part.frame.meta},
    }
    if mm_per_pixel:
        message["mm_per_pixel"] = mm_per_pixel
    if part.request_id:
        message["request_id"] = part.request_id
    if refining is not None:
        message["refining"] = refining
    if learning is not None:
        message["learning"] = learning
    elif r is None:
        message["error"] = error or "scoring failed"
    return message


def flagged_message(*, message_id: str, result: dict, findings_summary: str, files: dict,
                    overlay_jpeg: bytes | None = None, overlay_path: str | None = None) -> dict:
    """P/flagged for an anomalous part, from its result message; the overlay inline (JPEG) or as a path."""
    event = {"message_id": message_id, "part_id": result["part_id"], "station": result["station"],
             "line": result["line"], "timestamp": result["timestamp"], "score": result["score"],
             "threshold": result["threshold"], "severity": result["severity"], "regions": result["regions"],
             "findings": findings_summary, "files": files}
    if overlay_jpeg is not None:
        event["overlay_jpeg_base64"] = base64.b64encode(overlay_jpeg).decode()
    elif overlay_path is not None:
        event["overlay_path"] = overlay_path
    return event


def unrecorded_result_message(*, message_id: str, station: str, line: str, part, reason: str) -> dict:
    """P/result for a part that has no row (a disk full past its floor): an error, marked recorded false."""
    return {"message_id": message_id, "part_id": part.part_id, "station": station, "line": line,
            "timestamp": iso_time(part.frame.captured_at), "trigger": part.trigger, "verdict": "error",
            "score": None, "error": reason, "recorded": False,
            **({"request_id": part.request_id} if part.request_id else {})}


def explanation_message(station: str, explanation: dict) -> dict:
    """P/explanation: the explanation worker's message, with the station in front."""
    return {"station": station, **explanation}


def reply_message(command: str, request_id: str | None, ok: bool, fields: dict, now: float) -> dict:
    """P/reply to one command (or one step of a deployment)."""
    return {"command": command, "request_id": request_id, "ok": ok, **fields, "time": iso_time(now)}


def source_message(name: str, state: str, detail: str, now: float) -> dict:
    """P/source (retained): the camera's connection state."""
    return {"source": name, "state": state, "detail": detail, "time": iso_time(now)}


COUNTED = ("captured", "parts", "flagged", "errors", "learning", "bad_commands", "output_errors")


def status_message(*, now: float, started_at: float, stopping: bool, station: str, line: str, model_id: str,
                   pack_sha256: str, trigger_mode: str, threshold: float | None, references: int,
                   learning: dict | None, rates: dict, latencies: dict, queues: dict, counts, dropped_frames: int,
                   source, broker: dict | None, storage: dict, deploy: dict, explain: dict | None,
                   refining: dict | None = None, crashed: dict | None = None) -> dict:
    """P/status (retained) and GET /health. `learning` / `refining`: learn mode's or learn.refine's progress
    (collected, of, building, attempts, last_error), else None. `crashed`: stage -> error for a stage whose
    thread died (state `failed`: the watchdog is no longer fed, so systemd restarts the service). `rates`: captured, scored (per s); `latencies`: queue, score,
    capture_to_publish percentiles; `counts`: the runtime's counters (COUNTED, store_retries,
    refused_storage); `source`: name, state, detail, bad_frames, reconnects; `storage`:
    parts, fresh, free_mb, low_space_flag, min_free_mb, over_budget, files_bytes, db_bytes,
    disk_budget_mb, write_errors, images_skipped."""
    s = storage
    low_space = s["low_space_flag"] and s["free_mb"] < s["min_free_mb"]  # recovers as space returns
    degraded = low_space or s["over_budget"]
    message = {
        "state": "stopping" if stopping else "failed" if crashed else "degraded" if degraded else "online",
        "station": station, "line": line, "model_id": model_id,
        "time": iso_time(now), "uptime_s": round(now - started_at, 1),
        "trigger": trigger_mode, "threshold": threshold, "references": references, "learning": learning,
        "refining": refining,
        "fps": {"captured": round(rates["captured"], 2), "scored": round(rates["scored"], 2)},
        "latency_ms": {"queue": latencies["queue"], "score": latencies["score"],
                       "capture_to_publish": latencies["capture_to_publish"]},
        "queues": queues,
        "counts": {k: int(counts[k]) for k in COUNTED}
                  | {"dropped_frames": dropped_frames, "bad_frames": source.bad_frames,
                     "reconnects": source.reconnects},
        "source": {"name": source.name, "state": source.state, "detail": source.detail},
        "broker": broker,
        "storage": {"parts": s["parts"], "busy": not s["fresh"], "write_retries": int(counts["store_retries"]),
                    "files_mb": round(s["files_bytes"] / 1e6, 2),
                    "budget_mb": s["disk_budget_mb"], "write_errors": s["write_errors"],
                    "used_mb": round((s["files_bytes"] + s["db_bytes"]) / 1e6, 2),
                    "free_mb": round(s["free_mb"], 1), "min_free_mb": s["min_free_mb"],
                    "low_space": low_space, "over_budget": s["over_budget"],
                    "images_skipped": s["images_skipped"],
                    "refused_parts": int(counts["refused_storage"])},
        "pack_sha256": pack_sha256, "deploy": deploy, "explain": explain,
    }
    if crashed:
        message["crashed"] = dict(crashed)
    return message


def status_line(status: dict) -> str:
    """The one line systemd shows (`systemctl status`) for a status message."""
    h = status
    if h.get("crashed"):
        return "FAILED: " + "; ".join(f"{stage} thread died ({why})" for stage, why in h["crashed"].items())
    return (f"{h['fps']['scored']:.1f} parts/s, {h['counts']['flagged']} flagged, source {h['source']['state']}, "
            f"outbox {h['broker']['outbox_size'] if h['broker'] else '-'}")
