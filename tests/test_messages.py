"""The MQTT payloads (edge.line.messages) byte for byte against tests/golden/*.json, which were captured
from the runtime before it was split into modules (tests/golden/capture_pre_split.py.txt, same fixed inputs
as here: tests/golden_inputs.py). Regenerate from the builders only on purpose:
    UPDATE_GOLDEN=1 python -m pytest tests/test_messages.py
"""
import base64
import collections
import json
import os
import types
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge.explain.findings import describe
from edge.line import messages
from edge.line.config import load_config
from edge.line.pipeline import Part, ScoredPart
from edge.line.sources import Frame
from edge.scoring import visual
from golden_inputs import (CAPTURED_AT, DEPLOY, FILE_PATHS, NOW, PERCENTILES, PUBLISHER_STATS, RATES, STARTED_AT,
                           fixed_result, frame_image, write_station_yaml)

GOLDEN = Path(__file__).parent / "golden"
STATION, LINE, MODEL = "s1", "l1", "default-test"


def ids():
    return iter(f"{i:032x}" for i in range(1, 1000))


def check(name: str, sent: list) -> None:
    path = GOLDEN / f"{name}.json"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.write_text(json.dumps([[t, p] for t, p in sent], indent=1) + "\n")
    golden = json.loads(path.read_text())
    assert [t for t, _ in sent] == [t for t, _ in golden]
    for (_, payload), (_, expected) in zip(sent, golden):
        if "overlay_jpeg_base64" in expected:
            # The JPEG's bytes follow OpenCV's CPU-specific code paths (resize, blend, DCT): its pixels are
            # compared, everything else byte for byte.
            payload, expected = dict(payload), dict(expected)
            got, want = (decoded_jpeg(d.pop("overlay_jpeg_base64")) for d in (payload, expected))
            assert got.shape == want.shape and np.abs(got.astype(int) - want.astype(int)).mean() < 6.0
        assert json.dumps(payload) == json.dumps(expected)  # the bytes the publisher sends


def decoded_jpeg(b64: str) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(base64.b64decode(b64), np.uint8), cv2.IMREAD_COLOR)
    assert image is not None, "overlay_jpeg_base64 is not a JPEG"
    return image


def part(trigger="free_run", request_id=None) -> Part:
    frame = Frame(image=frame_image(), index=7, captured_at=CAPTURED_AT, meta={"camera": "cam0"})
    return Part("s1-20261202T000000.000-000007", frame, trigger, request_id, queued_at=100.0)


def part_messages(item: ScoredPart, mm_per_pixel, heatmap="path", max_bytes=200_000, learning=None) -> list:
    """What the recorder publishes for one scored part, from the same inputs."""
    new_id = ids()
    p, r = item.part, item.result
    summary = messages.part_summary(r, learning, 2.5 if learning is None else None, mm_per_pixel)
    result = messages.result_message(
        message_id=next(new_id), station=STATION, line=LINE, part=p, summary=summary, result=r, model_id=MODEL,
        source_name="synthetic", queue_ms=(item.scored_at - p.queued_at) * 1000 - item.score_ms,
        score_ms=item.score_ms, capture_to_publish_ms=(NOW - CAPTURED_AT) * 1000, mm_per_pixel=mm_per_pixel,
        learning=learning, error=item.error)
    out = [["result", result]]
    if r is not None and r.anomalous:
        findings = describe(p.frame.image, r, mm_per_pixel).to_dict()
        jpeg = messages.jpeg_within(visual.result_overlay(p.frame.image, r), max_bytes) if heatmap == "inline" else None
        out.append(["flagged", messages.flagged_message(
            message_id=next(new_id), result=result, findings_summary=findings["summary"], files=dict(FILE_PATHS),
            overlay_jpeg=jpeg, overlay_path=FILE_PATHS["overlay"] if heatmap == "path" else None)])
    return out


def scored(p, r, error=None, learning=False):
    return ScoredPart(p, r, error, 12.345678, 100.030, learning=learning)


def test_part_results_and_flagged_events_are_the_bytes_published_before_the_split(tmp_path):
    inline = load_config(write_station_yaml(tmp_path / "inline", None, heatmap="inline"))
    check("result_normal", part_messages(scored(part(), fixed_result(False)), 0.1))
    check("result_flagged_path", part_messages(scored(part("mqtt", "req-1"), fixed_result(True)), 0.1))
    check("result_flagged_inline", part_messages(scored(part(), fixed_result(True)), None, "inline",
                                                 inline.mqtt.heatmap.max_bytes))
    check("result_error", part_messages(scored(part("mqtt", "req-2"), None, "scoring failed: boom"), 0.1))
    check("result_learning", part_messages(scored(part(), None, learning=True), 0.1,
                                           learning={"collected": 3, "of": 10}))
    check("result_unrecorded", [["result", messages.unrecorded_result_message(
        message_id=next(ids()), station=STATION, line=LINE, part=part("mqtt", "req-3"),
        reason="not recorded: OSError: disk full")]])


def test_explanation_reply_and_source_are_the_bytes_published_before_the_split():
    check("explanation", [["explanation", messages.explanation_message(
        STATION, {"part_id": "P-1", "status": "done", "answer": "A scratch.", "question": None})]])
    check("reply", [["reply", messages.reply_message("trigger", "req-1", True, {"part_id": "P-1", "queued": True}, NOW)],
                    ["reply", messages.reply_message("enroll-good", None, False,
                                                     {"error": "enroll-good: no part", "retained": True}, NOW)],
                    ["reply", messages.reply_message("deploy", "d-1", False,
                                                     {"error": "bad sha", "step": "verify", "done": True}, NOW)]])
    check("source", [["source", messages.source_message("synthetic", "streaming", "30 frames/s", NOW)]])


def status(**changes) -> dict:
    source = types.SimpleNamespace(name="synthetic", state="streaming", detail="30 frames/s", bad_frames=2,
                                   reconnects=1)
    counts = collections.Counter(captured=50, parts=42, flagged=7, errors=1, learning=0, bad_commands=3,
                                 output_errors=0, store_retries=2, refused_storage=0)
    storage = {"parts": 42, "fresh": True, "free_mb": 5432.123, "low_space_flag": False, "min_free_mb": 100.0,
               "over_budget": False, "files_bytes": 12_345_678, "db_bytes": 345_678, "disk_budget_mb": 2000.0,
               "write_errors": 0, "images_skipped": 1}
    fields = dict(now=NOW, started_at=STARTED_AT, stopping=False, station=STATION, line=LINE, model_id=MODEL,
                  pack_sha256="ab" * 32, trigger_mode="free_run", threshold=2.5, references=16, learning=None,
                  rates=RATES, latencies=PERCENTILES, queues={"score": 0, "output": 0, "triggers": 0, "jobs": 0},
                  counts=counts, dropped_frames=5, source=source, broker=dict(PUBLISHER_STATS), storage=storage,
                  deploy=DEPLOY, explain={"error": "no model"})
    for key, value in changes.items():
        if key in storage:
            storage[key] = value
        else:
            fields[key] = value
    return messages.status_message(**fields)


def test_status_is_the_bytes_published_before_the_split():
    check("status", [["status", status()]])
    check("status_degraded_learning", [["status", status(low_space_flag=True, free_mb=50.0, threshold=None,
                                                         references=0, learning={"collected": 3, "of": 10},
                                                         explain=None)]])
    assert messages.status_line(status()) + "\n" == (GOLDEN / "status_line.txt").read_text()


@pytest.mark.skipif(os.environ.get("UPDATE_GOLDEN") == "1", reason="UPDATE_GOLDEN=1 rewrites the files")
def test_a_changed_payload_fails_the_comparison():
    sent = part_messages(scored(part(), fixed_result(False)), 0.1)
    sent[0][1]["score"] = round(sent[0][1]["score"] + 1e-6, 6)
    with pytest.raises(AssertionError):
        check("result_normal", sent)
