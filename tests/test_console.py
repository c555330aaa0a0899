"""The technician console in a real pseudo-terminal against a running station service.

The service inspects parts on MQTT triggers from a folder of identical defective frames, so that a
false alarm enrolled as good from the console makes the next identical part pass.
"""
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pexpect
import pytest

from conftest import ROOT
from edge.line.api_client import ApiClient
from edge.cli.console_screen import parse_when, part_line
from edge.line.synthetic import SyntheticLine
from mqtt_helpers import needs_mosquitto, wait_until
from station_helpers import write_config


def trigger(port: int, part_id: str) -> None:
    import paho.mqtt.publish as publish

    publish.single("test/s1/cmd/trigger", f'{{"part_id": "{part_id}"}}', qos=1, hostname="127.0.0.1", port=port)


def spawn_console(socket_path: Path) -> pexpect.spawn:
    exe = Path(sys.executable).parent / "anomaly-edge"
    env = {**os.environ, "NO_COLOR": "1", "TERM": "xterm", "PROMPT_TOOLKIT_NO_CPR": "1",
           "XDG_STATE_HOME": str(socket_path.parent / "console-state")}
    child = pexpect.spawn(str(exe), ["console", "--socket", str(socket_path), "--user", "tester", "--no-colour"],
                          env=env, encoding="utf-8", timeout=60, dimensions=(24, 80))
    child.expect("`help` for commands")
    return child


def command(child: pexpect.spawn, line: str, *expect: str, timeout: float = 60) -> None:
    child.sendline(line)
    for pattern in expect:
        child.expect(pattern, timeout=timeout)


def start_service(cfg):
    """`anomaly-edge run` on the config, in its own process."""
    return subprocess.Popen([sys.executable, "-m", "edge.cli.main", "run", "--config", str(cfg)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@needs_mosquitto
@pytest.mark.timeout(300)
def test_list_open_feedback_and_enroll_make_the_next_identical_part_pass(broker, tmp_path, default_pack_dir,
                                                                          enrolled_state):
    stain = next(p for p in SyntheticLine(seed=0, defect_rate=1.0).parts(20) if p.defect == "stain")
    folder = tmp_path / "frames"
    folder.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        cv2.imwrite(str(folder / name), stain.image)
    cfg = write_config(tmp_path, default_pack_dir, enrolled_state, broker.port, {"kind": "folder", "path": str(folder)},
                       trigger={"mode": "mqtt"})
    service = start_service(cfg)
    sock = tmp_path / "var" / "api.sock"
    api = ApiClient(sock)
    child = None
    try:
        wait_until(lambda: sock.exists() and api.get("/health")["broker"]["connected"], 60, "the service")
        time.sleep(0.3)
        trigger(broker.port, "P-1")
        wait_until(lambda: len(api.get("/parts?limit=5")["parts"]) == 1, 30, "part P-1 scored")
        wait_until(lambda: api.get("/parts/P-1")["explanation"], 60, "P-1's explanation")
        child = spawn_console(sock)
        command(child, "ask", "error: ask: open a part first")
        command(child, "list", r"P-1\s+\d\d:\d\d:\d\d\s+[\d.]+ FLAGGED\s+Yes")
        command(child, "open P-1", "verdict anomalous", "Region 1: ", "explanation: Yes", "#", "overlay: ", "overlay.jpg")
        command(child, "open NOPE-7", "error: no part with id 'NOPE-7'")
        command(child, "ask   ", "type a question after ask")
        command(child, "ask How big is it?", r"\d mm")
        command(child, "ask Where exactly?", r"(upper|lower|left|right|centre)")
        command(child, "list --since yesterday", "cannot read the time 'yesterday'")
        command(child, "frobnicate", "unknown command 'frobnicate'")
        command(child, "false-alarm --enroll", "enrolling the part as good", "recorded: P-1 is a false alarm",
                r"enrolled as good: 17 references, threshold [\d.]+ -> [\d.]+", timeout=300)  # a rebuild
        trigger(broker.port, "P-2")
        wait_until(lambda: len(api.get("/parts?limit=5")["parts"]) == 2, 30, "part P-2 scored")
        command(child, "list all", r"P-2\s+\d\d:\d\d:\d\d\s+[\d.]+ ok")
        assert api.get("/parts/P-2")["verdict"] == "normal"
        command(child, "open P-1", "feedback: false_alarm by tester")
        command(child, "status", r"frames/s captured", r"threshold [\d.]+ from 17 reference\(s\)", r"broker: connected",
                r"camera: folder .* streaming")
        service.send_signal(signal.SIGTERM)
        service.wait(30)
        command(child, "status", "the station service is not running")
        service = start_service(cfg)
        wait_until(lambda: sock.exists() and api.get("/health")["state"] == "online", 60, "the restarted service")
        command(child, "ask Is it a defect?", "Yes")  # the part and its dialogue survive the restart
        child.expect(r"\[P-1\]>")  # the answer is complete (and recorded) when the prompt is back
        turns = _turns(tmp_path, "P-1")
        assert [q for role, q in turns if role == "user"] == [
            "Is there an anomaly in the image?", "How big is it?", "Where exactly?", "Is it a defect?"]
        service.send_signal(signal.SIGTERM)
        service.wait(30)
        command(child, "help", "list \\[anomalous")  # still usable
        child.sendline("quit")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0
    finally:
        if child is not None and child.isalive():
            child.terminate(force=True)
        if service.poll() is None:
            service.kill()


def _turns(tmp_path: Path, part_id: str) -> list[str]:
    from edge.explain.dialogue import DialogueStore

    with DialogueStore(tmp_path / "var" / "dialogue.sqlite") as store:
        return [(t.role, t.text) for t in store.session(part_id).turns]


def test_time_filters_read_relative_and_iso_times():
    assert parse_when("2h", now=10_000) == 10_000 - 7200
    assert parse_when("30m", now=10_000) == 10_000 - 1800
    assert parse_when("2026-11-24T06:00") == parse_when("2026-11-24T06:00Z")
    with pytest.raises(Exception, match="cannot read the time"):
        parse_when("soon")


def test_a_part_line_fits_80_columns():
    long = {"part_id": "X" * 60, "time": "2026-11-24T14:22:42.388Z", "score": 12.3456, "verdict": "anomalous",
            "explanation": "Yes. " + "a very long explanation " * 10, "findings": None}
    line = part_line(long)
    assert len(line) <= 80 and "FLAGGED" in line
    free_run = {**long, "part_id": "station-1-20261201T194928.322-0042ab"}  # 36 characters, kept whole
    line = part_line(free_run, row=12)
    assert len(line) <= 80 and line.startswith("12 station-1-20261201T194928.322-0042ab 14:22:42")
    assert line.endswith("…") and line[:-1].endswith(("Yes.", "explanation", "very", "long", "a"))


ANSI = __import__("re").compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")


def _screen_lines(text: str) -> list[str]:
    return [line for line in ANSI.sub("", text).split("\n")]


@needs_mosquitto
@pytest.mark.timeout(300)
def test_at_80_columns_a_technician_opens_what_the_list_shows(broker, tmp_path, default_pack_dir, enrolled_state):
    """Free-run ids (36 characters) listed whole with row numbers; `open 2`, `open <unique start>` and
    Tab completion reach them; nothing printed is wider than 80 columns or broken inside a word; a part
    flagged while explanations were off says so plainly."""
    cfg = write_config(tmp_path, default_pack_dir, enrolled_state, broker.port,
                       {"kind": "synthetic", "seed": 0, "defect_rate": 1.0, "count": 6},
                       explain={"enabled": False}, station={"name": "station-1"})
    service = start_service(cfg)
    sock = tmp_path / "var" / "api.sock"
    api = ApiClient(sock)
    child = None
    try:
        wait_until(lambda: sock.exists() and len(api.get("/parts?limit=10")["parts"]) == 6, 90,
                   "the six parts scored")
        ids = [p["part_id"] for p in api.get("/parts?verdict=anomalous&limit=10")["parts"]]
        assert len(ids[0]) > 30  # what `list` used to cut
        child = spawn_console(sock)
        child.logfile_read = seen = io.StringIO()  # everything the console writes from here on
        command(child, "list", rf" 1 {ids[0]} \d\d:\d\d:\d\d", rf" 2 {ids[1]} ", r"\[0m>")
        listed = _screen_lines(seen.getvalue())
        child.logfile_read = seen = io.StringIO()
        command(child, "open 2", f"part {ids[1]}", "verdict anomalous", "overlay: ", r"\]>")
        opened = _screen_lines(seen.getvalue())
        child.logfile_read = None
        # the unique start of the third id (the ids differ in their time of day)
        start = next(ids[2][:n] for n in range(1, len(ids[2]) + 1)
                     if sum(i.startswith(ids[2][:n]) for i in ids) == 1)
        command(child, f"open {start}", f"part {ids[2]}", r"\]>")
        command(child, "open 99", "row 99 is not in the last list")
        child.send("open " + ids[0][: len(ids[0]) - 6] + "\t")  # Tab completes the rest of the id
        child.expect(ids[0][-6:])
        child.sendline("")
        child.expect(f"part {ids[0]}")
        command(child, "ask How big is it?", r"this station has no language model \(.*explain.enabled is false\)")
        for line in listed + opened:
            assert len(line) <= 80, line
        # wrapped between words: every word of the findings is on the screen whole
        shown = set(" ".join(opened).split())
        summary = api.get(f"/parts/{ids[1]}")["findings"]["summary"]
        assert [w for w in summary.split() if w not in shown and w.rstrip(".") not in shown] == []
        child.sendline("quit")
        child.expect(pexpect.EOF)
    finally:
        if child is not None and child.isalive():
            child.terminate(force=True)
        service.send_signal(signal.SIGTERM)
        try:
            service.wait(30)
        except subprocess.TimeoutExpired:
            service.kill()


def test_asking_about_a_part_flagged_while_explanations_were_off_says_so(tmp_path):
    from types import SimpleNamespace

    from edge.line.api import ask
    from edge.line.api_client import ApiError
    from edge.line.api_port import StationPort
    from edge.explain.dialogue import DialogueStore
    from edge.line.store import TraceStore

    store = TraceStore(tmp_path / "var")
    summary = {"verdict": "anomalous", "score": 3.1, "threshold": 2.5, "regions": []}
    store.add_part("F-1", "s1", time.time(), "free_run", summary, "m", None, (None, 0), None)
    store.add_part("N-1", "s1", time.time(), "free_run", {**summary, "verdict": "normal"}, "m", None, (None, 0), None)
    with DialogueStore(tmp_path / "d.sqlite") as dialogue:
        explainer = SimpleNamespace(store=dialogue)
        station = StationPort(store, lambda: explainer, lambda: None, health=None, run_job=None)
        with pytest.raises(ApiError, match=r"^part F-1 was flagged while explanations were off, so there is no "
                                           r"dialogue to ask about"):
            ask(station, "F-1", {"question": "How big is it?"})
        with pytest.raises(ApiError, match=r"^part N-1 is normal: only flagged parts have a dialogue"):
            ask(station, "N-1", {"question": "How big is it?"})
    store.close()


def test_status_says_whether_the_station_is_learning_or_refining():
    from edge.cli.console_screen import model_words

    learning = {"threshold": None, "references": 0,
                "learning": {"collected": 7, "of": 50, "building": False, "attempts": 0, "last_error": None}}
    assert model_words(learning) == "learning: 7 of 50 parts collected; parts are not judged until the state is built"
    refining = {"threshold": 26.52, "references": 1, "learning": None,
                "refining": {"collected": 12, "of": 50, "building": False, "attempts": 0, "last_error": None}}
    assert model_words(refining) == ("threshold 26.5200 from 1 reference(s); refining: 12 of 50 parts kept, then "
                                     "the usual-looking ones join the references")
    assert model_words({"threshold": 11.9, "references": 48, "learning": None, "refining": None}) == \
        "threshold 11.9000 from 48 reference(s)"
