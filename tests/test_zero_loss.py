"""Zero parts lost on the failure paths of the line runtime (real Mosquitto, real SQLite, real scorer).

A part the scorer cannot take still leaves with a result (verdict "error"); a command that cannot be
parsed, or is retained, is refused with a reply; a second station on one storage folder is refused;
sources pace, do not replay twice and back off from bad frames.
"""
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest

from conftest import ROOT
from edge.line.config import load_config
from edge.line.runtime import Runtime
from edge.line.store import TraceStore
from edge.line.synthetic import SyntheticLine
from mqtt_helpers import Subscriber, needs_mosquitto, retained, wait_until
from station_helpers import finish, start, write_config

pytestmark = needs_mosquitto

ROI = [16, 16, 224, 224]  # fits the 256 px synthetic parts, not a 160 px frame


@pytest.fixture(scope="module")
def tiled_state(default_pack, tmp_path_factory) -> Path:
    """A station state enrolled with tiling scale 1 and a fixed ROI rect (8 good synthetic parts)."""
    from edge.scoring.roi import RoiSpec
    from edge.station.enrollment import enroll
    from edge.line.synthetic import write_good_parts
    from edge.scoring.tiling import TilingSpec

    root = tmp_path_factory.mktemp("tiled")
    spec = TilingSpec(scale=1.0, roi=RoiSpec(kind="rect", rect=ROI))
    enroll(default_pack, write_good_parts(root / "good", 8), root / "state", quiet=True, log=lambda m: None,
           tiling=spec)
    return root / "state"


def wait_topic(sub: Subscriber, topic: str, n: int, timeout: float = 30) -> list[dict]:
    wait_until(lambda: len(sub.unique_by_topic().get(topic, [])) >= n, timeout, f"{n} messages on {topic}")
    return sub.unique_by_topic()[topic]


@pytest.mark.timeout(120)
def test_parts_the_scorer_cannot_take_leave_as_errors_and_the_rest_score(broker, tmp_path, default_pack_dir,
                                                                       tiled_state):
    # The drill from the issue: every other frame is smaller than the configured ROI rect.
    folder = tmp_path / "frames"
    folder.mkdir()
    line = SyntheticLine(seed=0, defect_rate=0.0)
    for i in range(6):
        img = line.part(i).image
        cv2.imwrite(str(folder / f"{i:02d}.png"), img if i % 2 == 0 else img[:160, :160])
    sub = Subscriber(broker.port, "test/s1/#")
    cfg = write_config(tmp_path, default_pack_dir, tiled_state, broker.port, {"kind": "folder", "path": str(folder)},
                       tiling={"scale": 1.0}, roi={"kind": "rect", "rect": ROI},
                       pipeline={"batch_size": 4})  # a failing frame inside a batch costs only itself
    rt = start(cfg)
    finish(rt)
    got = wait_topic(sub, "test/s1/result", 6)
    assert [r["source"]["file"] for r in got] == [f"{i:02d}.png" for i in range(6)]
    for i, r in enumerate(got):
        if i % 2:
            assert r["verdict"] == "error" and r["score"] is None, r
            assert "reaches outside the 160x160 frame" in r["error"], r["error"]
        else:
            assert r["verdict"] == "normal" and r["score"] > 0 and "error" not in r, r
    assert rt.counts["errors"] == 3 and rt.counts["parts"] == 6 and rt.counts["output_errors"] == 0
    store = TraceStore(tmp_path / "var")
    rows = {p["part_id"]: p for p in store.query(limit=100)}
    assert len(rows) == 6
    assert sorted(p["verdict"] for p in rows.values()) == ["error"] * 3 + ["normal"] * 3
    assert all(p["score"] is None for p in rows.values() if p["verdict"] == "error")
    assert all(p["published"] for p in rows.values())
    assert {r["part_id"] for r in got if r["verdict"] == "error"} == {k for k, p in rows.items() if p["verdict"] == "error"}
    store.close()


def test_a_database_with_score_not_null_is_migrated_and_keeps_its_rows(tmp_path):
    db = tmp_path / "parts.sqlite"
    old_schema = ("CREATE TABLE parts (part_id TEXT PRIMARY KEY, station TEXT NOT NULL, captured_at REAL NOT NULL, "
                  "trigger TEXT NOT NULL, verdict TEXT NOT NULL, score REAL NOT NULL, threshold REAL NOT NULL, "
                  "regions TEXT NOT NULL, findings TEXT, latency_ms REAL, model_id TEXT, files_dir TEXT, "
                  "files_bytes INTEGER NOT NULL DEFAULT 0, files_purged INTEGER NOT NULL DEFAULT 0, explanation TEXT, "
                  "explanation_status TEXT, feedback TEXT, feedback_by TEXT, feedback_at REAL, feedback_note TEXT, "
                  "messages TEXT, published INTEGER NOT NULL DEFAULT 0)")
    conn = sqlite3.connect(db)
    conn.execute(old_schema)
    conn.execute("INSERT INTO parts (part_id, station, captured_at, trigger, verdict, score, threshold, regions) "
                 "VALUES ('old-1', 's1', ?, 'free_run', 'normal', 1.5, 2.0, '[]')", (time.time(),))
    conn.commit()
    with pytest.raises(sqlite3.IntegrityError):  # what lost the parts before
        conn.execute("INSERT INTO parts (part_id, station, captured_at, trigger, verdict, score, threshold, regions) "
                     "VALUES ('x', 's1', 0, 'free_run', 'error', NULL, 2.0, '[]')")
    conn.close()
    store = TraceStore(tmp_path)
    assert store.get("old-1")["score"] == 1.5
    store.add_part("err-1", "s1", time.time(), "free_run", {"verdict": "error", "score": None, "threshold": 2.0,
                                                             "regions": []}, "m")
    assert store.get("err-1")["score"] is None and store.get("err-1")["verdict"] == "error"
    assert store.count() == 2
    store.close()
    names = {r[0] for r in sqlite3.connect(db).execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"parts_time", "parts_verdict_time", "parts_unpublished"} <= names
    TraceStore(tmp_path).close()  # a migrated database opens as is


def send(port: int, topic: str, payload, retain: bool = False) -> None:
    import paho.mqtt.publish as publish

    publish.single(topic, payload if isinstance(payload, (str, bytes)) else json.dumps(payload), qos=1,
                   retain=retain, hostname="127.0.0.1", port=port)


@pytest.mark.timeout(120)
def test_every_command_payload_gets_a_reply_and_retained_commands_are_not_executed(broker, tmp_path,
                                                                                   default_pack_dir, enrolled_state):
    # Left on the broker by someone before the station starts: replayed to it at subscription.
    send(broker.port, "test/s1/cmd/trigger", {"part_id": "RET-1", "request_id": "ret"}, retain=True)
    send(broker.port, "test/s1/cmd/reload", {"request_id": "ret-reload"}, retain=True)
    sub = Subscriber(broker.port, "test/s1/+")  # not cmd/#: the test's own payloads are not JSON
    cfg = write_config(tmp_path, default_pack_dir, enrolled_state, broker.port,
                       {"kind": "synthetic", "seed": 0, "count": None}, trigger={"mode": "mqtt"})
    rt = start(cfg)
    try:
        replies = lambda: sub.unique_by_topic().get("test/s1/reply", [])  # noqa: E731
        wait_until(lambda: len(replies()) >= 2, 15, "replies to the retained commands")
        for r in replies():
            assert not r["ok"] and r["retained"] and "ignored because it is retained" in r["error"], r
        assert {r["request_id"] for r in replies()} == {"ret", "ret-reload"}
        bad = [("trigger", '{"request_id": "deep", "part_id": ' + "[" * 5000 + "]" * 5000 + "}", "deep",
                "nested too deeply"),
               ("trigger", '{"request_id": "big", "part_id": ' + "9" * 5000 + "}", "big", "digits"),
               ("trigger", b'{"request_id": "latin", "part_id": "caf\xe9"}', "latin", "not UTF-8 (byte 0xe9"),
               ("reload", b"", None, "empty payload"),
               ("enroll-good", "[" * 9000, None, "nested too deeply")]
        for name, payload, _, _ in bad:
            send(broker.port, f"test/s1/cmd/{name}", payload)
        wait_until(lambda: len(replies()) >= 2 + len(bad), 15, "a reply to every bad command")
        got = replies()[2:]
        for (name, _, rid, expected), r in zip(bad, got):
            assert r["command"] == name and r["request_id"] == rid and not r["ok"], r
            assert expected in r["error"], (expected, r["error"])
            assert "retained" not in r
        send(broker.port, "test/s1/cmd/trigger", {"part_id": "OK-1", "request_id": "ok"})
        wait_topic(sub, "test/s1/result", 1)
        results = sub.unique_by_topic()["test/s1/result"]
        assert [r["part_id"] for r in results] == ["OK-1"]  # RET-1 was never inspected
        assert not any(r["command"] == "reload" and r["ok"] for r in replies())  # nor a reload run
        assert rt.health()["counts"]["bad_commands"] == 2 + len(bad)
        assert rt._threads[1].is_alive() and rt.publisher.stats()["connected"]
    finally:
        rt.stop()


@pytest.mark.timeout(120)
def test_one_station_per_storage_folder_and_no_stale_lock_after_sigkill(broker, tmp_path, default_pack_dir,
                                                                        enrolled_state):
    from edge.station.station_lock import StationLockError

    cfg = write_config(tmp_path, default_pack_dir, enrolled_state, broker.port,
                       {"kind": "synthetic", "seed": 0, "count": None, "fps": 20})
    first = start(cfg)
    try:
        second = Runtime(load_config(cfg), cfg)
        with pytest.raises(StationLockError, match=rf"in use by another station \(PID {os.getpid()}"):
            second.start()
        assert first._threads[1].is_alive() and first.lock.held  # the refusal did not disturb the owner
        second.store.close()
    finally:
        first.stop()
    assert not first.lock.held

    # A holder killed with SIGKILL: the kernel drops its flock, the next station starts.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from edge.station.station_lock import StationLock; "
         f"StationLock({str(tmp_path / 'var')!r}).acquire(); print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        blocked = Runtime(load_config(cfg), cfg)
        with pytest.raises(StationLockError, match=rf"PID {holder.pid}\b"):
            blocked.start()
        blocked.store.close()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / "var" / "station.lock").read_text().strip() == str(holder.pid)  # the file stays, unheld
    again = start(cfg)
    try:
        wait_until(lambda: again.counts["parts"] >= 2, 30, "the restarted station to score")
        assert (tmp_path / "var" / "station.lock").read_text().strip() == str(os.getpid())
    finally:
        again.stop()


def parts_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    line = SyntheticLine(seed=seed, defect_rate=0.0)
    paths = []
    for i in range(n):
        paths.append(folder / f"{i:02d}.png")
        cv2.imwrite(str(paths[-1]), line.part(i).image)
    return paths


def epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


@pytest.mark.timeout(120)
def test_a_video_file_with_fps_is_played_at_that_rate(broker, tmp_path, default_pack_dir, enrolled_state):
    video = tmp_path / "line.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 25, (256, 256))
    assert writer.isOpened()
    line = SyntheticLine(seed=0, defect_rate=0.0)
    for i in range(6):
        writer.write(line.part(i).image)
    writer.release()
    sub = Subscriber(broker.port, "test/s1/#")
    cfg = write_config(tmp_path, default_pack_dir, enrolled_state, broker.port,
                       {"kind": "file", "path": str(video), "fps": 5})
    rt = start(cfg)
    finish(rt)
    got = wait_topic(sub, "test/s1/result", 6 - rt._queue.dropped)
    stamps = [epoch(r["timestamp"]) for r in got]
    assert rt._queue.dropped == 0 and len(got) == 6
    assert stamps[-1] - stamps[0] >= 5 * 0.2 - 0.05, stamps  # 5 periods of 0.2 s (it was read in ~50 ms)


@pytest.mark.timeout(120)
def test_a_folder_that_goes_away_mid_replay_is_not_replayed_twice(broker, tmp_path, default_pack_dir,
                                                                  enrolled_state):
    folder = tmp_path / "frames"
    parts_images(folder, 6)
    sub = Subscriber(broker.port, "test/s1/#")
    cfg = write_config(tmp_path, default_pack_dir, enrolled_state, broker.port,
                       {"kind": "folder", "path": str(folder), "fps": 4,
                        "reconnect": {"initial_delay_s": 0.1, "max_delay_s": 0.2}})
    rt = start(cfg)
    wait_topic(sub, "test/s1/result", 2)
    folder.rename(tmp_path / "unmounted")
    wait_until(lambda: rt.source.state == "lost", 10, "the source to be lost")
    time.sleep(0.3)
    (tmp_path / "unmounted").rename(folder)
    finish(rt)
    files = [r["source"]["file"] for r in sub.unique_by_topic()["test/s1/result"]]
    assert rt.counts["source_lost"] >= 1 and rt._queue.dropped == 0
    assert files == [f"{i:02d}.png" for i in range(6)], files  # each once, in order, none skipped


@pytest.mark.timeout(60)
def test_a_source_of_only_bad_frames_backs_off_instead_of_spinning(broker, tmp_path, default_pack_dir,
                                                                   enrolled_state, caplog):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i:02d}.png").write_bytes(b"not an image " * 10)
    cfg = write_config(tmp_path, default_pack_dir, enrolled_state, broker.port,
                       {"kind": "folder", "path": str(folder), "loop": True,
                        "reconnect": {"initial_delay_s": 0.05, "max_delay_s": 0.4}})
    rt = start(cfg)
    try:
        with caplog.at_level(logging.WARNING, logger="edge.line.sources"):
            cpu0, wall0 = time.process_time(), time.monotonic()
            time.sleep(3.0)
            cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
        bad = rt.source.bad_frames
        lines = [r for r in caplog.records if r.name == "edge.line.sources"]
        assert 5 <= bad <= 30, bad  # 4 logged, then waits of 0.05, 0.1, 0.2, 0.4, 0.4, ...
        assert len(lines) <= 2 * bad, len(lines)
        assert cpu < 0.5 * wall, (cpu, wall)  # a spinning capture thread takes a whole core
        assert rt.health()["source"]["state"] == "lost" and "bad frames in a row" in rt.source.detail
        assert rt.counts["parts"] == 0 and rt._threads[1].is_alive()
    finally:
        rt.stop()


def _connected(tmp_path: Path) -> bool:
    from edge.line.api_client import ApiClient, ApiError

    sock = tmp_path / "var" / "api.sock"
    try:
        return sock.exists() and ApiClient(sock).get("/health")["broker"]["connected"]
    except ApiError:
        return False


def _run_service(cfg: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edge.cli.main", "run", "--config", str(cfg)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("stop", ["SIGKILL", "SIGTERM"])
def test_accepted_triggers_survive_a_kill_or_a_stop_and_every_part_gets_its_result(
        broker, tmp_path, default_pack_dir, enrolled_state, stop):
    """Each trigger is stored before its `ok` is replied; a station killed (or stopped) with triggers still
    waiting inspects them at its next start, under the part ids the PLC sent."""
    import paho.mqtt.publish as publish

    n = 60
    sub = Subscriber(broker.port, "test/s1/#")
    cfg = write_config(tmp_path, default_pack_dir, enrolled_state, broker.port,
                       {"kind": "synthetic", "seed": 0, "defect_rate": 0.2}, trigger={"mode": "mqtt"},
                       explain={"enabled": False})
    service = _run_service(cfg)
    try:
        wait_until(lambda: _connected(tmp_path), 90, "the station")
        publish.multiple([{"topic": "test/s1/cmd/trigger", "qos": 1,
                           "payload": json.dumps({"part_id": f"T-{i:04d}", "request_id": f"r{i}"})} for i in range(n)],
                         hostname="127.0.0.1", port=broker.port)
        wait_until(lambda: sum(1 for r in sub.unique_by_topic().get("test/s1/reply", []) if r.get("ok")) >= n, 60,
                   "every trigger acknowledged")
        service.send_signal(getattr(signal, stop))
        service.wait(30)
        done_before = len(sub.unique_by_topic().get("test/s1/result", []))
        service = _run_service(cfg)
        wait_until(lambda: len({r["part_id"] for r in sub.unique_by_topic().get("test/s1/result", [])}) >= n, 120,
                   "a result for every acknowledged trigger")
        got = {r["part_id"] for r in sub.unique_by_topic()["test/s1/result"]}
        assert got == {f"T-{i:04d}" for i in range(n)}
        with TraceStore(tmp_path / "var") as store:
            assert store.pending_triggers() == []
            assert {p["part_id"] for p in store.query(limit=1000)} == got
        print(f"{stop}: {done_before} of {n} results before the stop, the rest after the restart")
    finally:
        service.kill()
        service.wait(10)


@pytest.mark.timeout(180)
def test_a_database_locked_by_another_process_loses_no_part_and_does_not_stall_the_health(
        broker, tmp_path, default_pack_dir, enrolled_state):
    sub = Subscriber(broker.port, "test/s1/#")
    rt = start(write_config(tmp_path, default_pack_dir, enrolled_state, broker.port,
                            {"kind": "synthetic", "seed": 0, "defect_rate": 0.2, "count": 60, "fps": 10},
                            explain={"enabled": False}))
    try:
        wait_topic(sub, "test/s1/result", 5, timeout=60)
        locker = subprocess.Popen([sys.executable, "-c", (
            "import sqlite3, sys, time\n"
            f"c = sqlite3.connect({str(tmp_path / 'var' / 'parts.sqlite')!r}, isolation_level=None)\n"
            "c.execute('BEGIN IMMEDIATE'); print('locked', flush=True); time.sleep(12); c.execute('COMMIT')\n")],
            stdout=subprocess.PIPE, text=True)
        assert locker.stdout.readline().strip() == "locked"
        t_lock = time.time()
        statuses = lambda: sum(1 for m in list(sub.messages) if m.topic == "test/s1/status")  # noqa: E731
        before = statuses()
        wait_until(lambda: rt.counts["store_retries"] > 0, 30, "a write to meet the lock")
        slowest = 0.0
        while locker.poll() is None and time.time() - t_lock < 10:  # the output thread waits on the lock
            t0 = time.monotonic()
            h = rt.health()
            slowest = max(slowest, time.monotonic() - t0)
            assert h["storage"]["parts"] is not None
            time.sleep(0.1)
        assert slowest < 1.0, f"health took {slowest:.2f} s while the database was locked"
        during = statuses()
        assert locker.wait(30) == 0
        assert statuses() - before >= 10, "the health loop kept publishing its status during the 12 s lock"
        assert during >= before
        assert time.time() - t_lock >= 11
        finish(rt, timeout=90)
        with TraceStore(tmp_path / "var") as store:
            n = store.count()
        got = wait_topic(sub, "test/s1/result", n, timeout=60)
        # Every part recorded and on the broker; a live source (fps) drops frames the scorer cannot keep
        # up with (counted, by design), which happens on a loaded machine.
        entered = rt.counts["captured"] - rt._queue.dropped
        assert rt.counts["captured"] == 60 and n == entered and len({r["part_id"] for r in got}) == n, (
            n, rt._queue.dropped)
        assert all(r["verdict"] != "error" for r in got)
        assert rt.counts["store_retries"] > 0 and rt.counts["output_errors"] == 0
    finally:
        rt.stop()


@pytest.mark.timeout(120)
def test_a_stop_cut_short_by_its_timeout_still_gives_every_captured_part_a_result(
        broker, tmp_path, default_pack_dir, enrolled_state):
    sub = Subscriber(broker.port, "test/s1/#")
    cfg = write_config(tmp_path, default_pack_dir, enrolled_state, broker.port,
                       {"kind": "synthetic", "seed": 0, "defect_rate": 0.2, "count": 400},
                       pipeline={"capture_queue": 64}, explain={"enabled": False})
    rt = start(cfg)
    wait_until(lambda: len(rt._queue) >= 32, 60, "a full capture queue")
    rt.stop(timeout=0.3)  # far too short to score what is queued
    with TraceStore(tmp_path / "var") as store:
        rows = store.query(limit=10_000)
    assert len(rows) == rt.counts["captured"]  # every captured part has its row
    stopped = [r for r in rows if r["verdict"] == "error"]
    assert stopped, "the stop should have cut some parts short"
    ids = {r["part_id"] for r in rows}
    published = lambda: {r["part_id"] for r in sub.unique_by_topic().get("test/s1/result", [])}  # noqa: E731
    again = None
    try:
        if not ids <= published():  # what the short stop left in the outbox goes out at the next start
            again = start(cfg)
        wait_until(lambda: ids <= published(), 60, "every recorded part's result on the broker")
    finally:
        if again is not None:
            again.stop()
    cut = [r for r in sub.unique_by_topic()["test/s1/result"] if r["part_id"] in ids and r["verdict"] == "error"]
    assert cut and all("station stopped" in r["error"] for r in cut)


@pytest.mark.timeout(180)
def test_the_watchdog_keeps_its_pace_while_a_sigterm_drains_the_queue(broker, tmp_path, default_pack_dir,
                                                                      enrolled_state):
    """A real NOTIFY_SOCKET: between STOPPING=1 and the exit, WATCHDOG=1 comes at most once per half
    WatchdogSec (the health loop spun on the set stop event before, 60,585 datagrams in 1.3 s)."""
    import socket

    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(0.2)
    cfg = write_config(tmp_path, default_pack_dir, enrolled_state, broker.port,
                       {"kind": "synthetic", "seed": 0, "defect_rate": 0.2},  # not live: the queue stays full
                       pipeline={"capture_queue": 48}, explain={"enabled": False})
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "400000",
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "edge.cli.main", "run", "--config", str(cfg)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        seen: list[tuple[float, str]] = []

        def receive() -> None:
            try:
                seen.extend((time.monotonic(), f) for f in notify.recv(4096).decode().split("\n"))
            except socket.timeout:
                pass

        deadline = time.monotonic() + 90
        while not any(f == "READY=1" for _, f in seen) and time.monotonic() < deadline:
            receive()
        wait_until(lambda: TraceStore(tmp_path / "var").count() >= 3, 60, "3 parts")
        proc.send_signal(signal.SIGTERM)
        while proc.poll() is None and time.monotonic() < deadline + 60:
            receive()
        for _ in range(50):  # what is still queued in the socket
            receive()
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        notify.close()
    t_stopping = next(t for t, f in seen if f == "STOPPING=1")
    pings = [t for t, f in seen if f == "WATCHDOG=1" and t >= t_stopping]
    stop_s = seen[-1][0] - t_stopping
    print(f"stop took {stop_s:.2f} s with {len(pings)} WATCHDOG=1 datagrams")
    assert len(pings) <= stop_s / 0.2 + 3, (len(pings), stop_s)


@needs_mosquitto
@pytest.mark.timeout(120)
def test_a_stage_that_dies_stops_the_watchdog_and_says_so(broker, tmp_path, default_pack_dir, enrolled_state,
                                                          monkeypatch, caplog):
    """An unforeseen error that ends the capture thread (here: the part queue refusing a part) is not a
    silent station: health says `failed` with the error, P/status too, and WATCHDOG=1 stops, so systemd's
    watchdog restarts the service."""
    import socket

    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(0.05)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    monkeypatch.setenv("WATCHDOG_USEC", "400000")
    cfg = write_config(tmp_path, default_pack_dir, enrolled_state, broker.port,
                       {"kind": "synthetic", "seed": 0, "fps": 20}, explain={"enabled": False})
    rt = start(cfg)
    try:
        pings: list[float] = []

        def receive(seconds: float) -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                try:
                    pings.extend(time.monotonic() for f in notify.recv(4096).decode().split("\n") if f == "WATCHDOG=1")
                except socket.timeout:
                    pass

        wait_until(lambda: rt.counts["parts"] >= 3, 30, "3 parts")
        receive(1.0)
        assert pings, "no watchdog pings while the station ran"

        def refuse(*args, **kwargs):
            raise RuntimeError("the part queue refused a part")

        monkeypatch.setattr(rt.pipeline.queue, "put", refuse)
        wait_until(lambda: "capture" in rt.pipeline.crashed, 10, "the capture thread to die")
        crashed_at = time.monotonic()
        receive(1.5)
        assert [t for t in pings if t > crashed_at + 0.5] == [], "the watchdog was still fed with capture dead"
        h = rt.health()
        assert h["state"] == "failed" and "RuntimeError: the part queue refused a part" in h["crashed"]["capture"]
        wait_until(lambda: retained(broker.port, "test/s1/status").get("state") == "failed", 10, "a failed P/status")
        assert any("the capture thread died" in r.getMessage() for r in caplog.records)
    finally:
        monkeypatch.undo()
        rt.stop()
        notify.close()
    # Every frame captured before the crash was recorded as a part (the refused one never entered the queue).
    stored = TraceStore(tmp_path / "var").count()
    assert stored == rt.counts["parts"] and rt.counts["parts"] >= 3
    assert rt.counts["parts"] >= rt.counts["captured"] - 1 - rt.pipeline.queue.dropped


@pytest.fixture
def small_disk(tmp_path):
    """A real 8 MB file system (tmpfs), for the drills of a full disk; skipped where mount is not allowed."""
    disk = tmp_path / "disk"
    disk.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {proc.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(disk: Path, leave_bytes: int) -> Path:
    """A ballast file that leaves `leave_bytes` free on `disk`. The running station writes to the same disk
    meanwhile: filling to the last byte (`leave_bytes` 0) writes until the disk refuses (ENOSPC), which is
    the state asked for, instead of failing on a byte count read a moment before."""
    import errno
    import shutil

    ballast = disk / "ballast"
    todo = max(0, shutil.disk_usage(disk).free - leave_bytes)
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        while todo > 0:
            try:
                todo -= os.write(fd, b"\0" * min(todo, 1 << 20))
            except OSError as e:
                if e.errno != errno.ENOSPC or leave_bytes:
                    raise
                break
    finally:
        os.close(fd)
    return ballast


@pytest.mark.timeout(240)
def test_a_small_disk_fills_with_no_part_lost_and_the_station_recovers_by_itself(
        broker, tmp_path, small_disk, default_pack_dir, enrolled_state):
    """8 MB disk, disk_budget_mb 1, min_free_mb 2, every part's images kept: the budget holds files and
    databases (WAL included); a ballast that leaves 0.5 MB free makes the station drop images, then refuse
    parts as errors (health degraded); removing it brings normal parts back. Every row on the broker."""
    import shutil

    sub = Subscriber(broker.port, "test/s1/#")
    cfg = write_config(tmp_path, default_pack_dir, enrolled_state, broker.port,
                       {"kind": "synthetic", "seed": 0, "defect_rate": 0.2, "fps": 8},
                       storage={"dir": str(small_disk / "var"), "disk_budget_mb": 1, "min_free_mb": 2,
                                "keep_images": "all"}, explain={"enabled": False},
                       mqtt={"heatmap": {"mode": "path"}})  # an inline overlay puts 64 KB in two WALs per flag
    rt = start(cfg)
    results = lambda: sub.unique_by_topic().get("test/s1/result", [])  # noqa: E731
    try:
        wait_until(lambda: rt.counts["parts"] >= 40, 60, "40 parts")
        used = rt.store.used_bytes()
        h = rt.health()
        assert h["state"] == "online" and used <= 1.1e6, (used, h["storage"])  # images + databases + WALs
        sizes = {f.name: f.stat().st_size for f in (small_disk / "var").glob("*.sqlite*")}
        assert rt.store.db_bytes() > 0 and any(r["files"] for r in rt.store.query(limit=3)), sizes

        ballast = _fill(small_disk, 500_000)
        wait_until(lambda: rt.counts["refused_storage"] >= 10, 60, "parts refused for want of space")
        h = rt.health()
        assert h["state"] == "degraded" and h["storage"]["low_space"], h["storage"]
        assert not any(r["files"] for r in rt.store.query(limit=1000))  # the images went first
        refused = [r for r in results() if r["verdict"] == "error"]
        assert refused and all("below storage.min_free_mb 2" in r["error"] for r in refused)
        free_low = shutil.disk_usage(small_disk).free

        ballast.unlink()
        n_refused = rt.counts["refused_storage"]
        wait_until(lambda: rt.health()["state"] == "online", 30, "the station to recover")
        wait_until(lambda: rt.counts["parts"] >= rt.counts["refused_storage"] + 60, 60, "normal parts again")
        assert rt.counts["refused_storage"] - n_refused <= 2  # parts in flight when the space came back
        assert any(r["files"] for r in rt.store.query(limit=3))
    finally:
        rt.stop()
    assert rt.counts["output_errors"] == 0
    with TraceStore(small_disk / "var") as store:
        rows = store.query(limit=100_000)
        integrity = store._sql("PRAGMA integrity_check")[0][0]
    assert integrity == "ok"
    assert len(rows) == rt.counts["parts"] == rt.counts["captured"] - rt._queue.dropped
    wait_until(lambda: {r["part_id"] for r in results()} >= {r["part_id"] for r in rows}, 60,
               "every stored part's result on the broker")
    got = [r["part_id"] for r in results()]
    assert got == sorted(got, key=lambda pid: int(pid.rsplit("-", 1)[1]))  # in order
    print(f"{len(rows)} parts, {rt.counts['refused_storage']} refused while {free_low / 1e6:.2f} MB were free, "
          f"{store.images_skipped if False else rt.store.images_skipped} without images, 0 lost")


def test_the_store_counts_its_databases_in_the_budget_and_refuses_below_the_floor(tmp_path):
    """Real SQLite and real files; only the free space reported is chosen (a disk that is 'smaller')."""
    import numpy as np

    free = {"bytes": 10**9}
    store = TraceStore(tmp_path, disk_budget_mb=0.5, min_free_mb=5, free_space=lambda: free["bytes"])
    rng = np.random.default_rng(0)
    summary = {"verdict": "anomalous", "score": 2.0, "threshold": 1.0, "regions": []}
    for i in range(40):
        image = rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)  # ~28 KB as PNG: noise does not compress
        files = store.write_files(f"p{i}", time.time(), {"image": image})
        store.add_part(f"p{i}", "s1", time.time(), "free_run", summary, "m", files=files,
                       messages=[["result", {"message_id": f"m{i}", "overlay": "x" * 20_000}]])
        store.mark_published(f"p{i}")  # as the runtime does once the outbox has them
    # Held at each part's row; the last part's mark_published comes after (one part of slack).
    assert store.db_bytes() > 0 and store.used_bytes() <= 0.5e6 + 60_000, (store.files_bytes, store.db_bytes())
    assert not store.low_on_space()
    kept = [r for r in store.query(limit=100) if r["files"]]
    assert kept, "the newest parts keep their images"

    free["bytes"] = 4_000_000  # below the 5 MB floor: images go first, then parts are refused
    assert store.write_files("p40", time.time(), {"image": image}) == (None, 0)
    assert store.images_skipped == 1 and not [r for r in store.query(limit=100) if r["files"]]
    assert store.low_on_space() and store.low_space
    free["bytes"] = 6_000_000  # space is back
    assert not store.low_on_space() and not store.low_space
    assert store.write_files("p41", time.time(), {"image": image})[1] > 0
    assert store.count() == 40
    store.close()
    assert not (tmp_path / "parts.sqlite").stat().st_mode & 0o007  # not world-readable


@pytest.mark.timeout(180)
def test_triggers_sent_while_the_station_reconnects_are_answered(broker, tmp_path, default_pack_dir,
                                                                 enrolled_state):
    """A persistent session (stable client id, clean_session false): the broker restarts, triggers are
    published (QoS 1) before the station is back, and each gets its part once it reconnects."""
    import paho.mqtt.publish as publish

    n = 20
    sub = Subscriber(broker.port, "test/s1/#")
    cfg = write_config(tmp_path, default_pack_dir, enrolled_state, broker.port,
                       {"kind": "synthetic", "seed": 0, "defect_rate": 0.2}, trigger={"mode": "mqtt"},
                       explain={"enabled": False})
    rt = start(cfg)
    try:
        wait_until(lambda: rt.publisher.stats()["connected"], 30, "the station to connect")
        broker.stop()  # mosquitto saves its sessions on SIGTERM
        wait_until(lambda: not rt.publisher.stats()["connected"], 30, "the station to see the broker go")
        time.sleep(2.5)  # paho's reconnect back-off grows: the station is not back the moment the broker is
        broker.start()
        publish.multiple([{"topic": "test/s1/cmd/trigger", "qos": 1,
                           "payload": json.dumps({"part_id": f"R-{i:03d}", "request_id": f"r{i}"})} for i in range(n)],
                         hostname="127.0.0.1", port=broker.port)
        assert not rt.publisher.stats()["connected"], "the station reconnected before the triggers were sent"
        wait_until(lambda: rt.publisher.stats()["connected"], 30, "the station to reconnect")
        wait_until(lambda: len({r["part_id"] for r in sub.unique_by_topic().get("test/s1/result", [])}) >= n, 60,
                   "a result for every trigger sent while the station was away")
        results = sub.unique_by_topic()["test/s1/result"]
        assert [r["part_id"] for r in results] == [f"R-{i:03d}" for i in range(n)]  # all, in order
        ok = [r for r in sub.unique_by_topic()["test/s1/reply"] if r["ok"]]
        assert [r["request_id"] for r in ok] == [f"r{i}" for i in range(n)]
    finally:
        rt.stop()


@pytest.mark.timeout(240)
def test_a_disk_full_to_the_last_byte_with_no_floor_still_answers_every_part(
        broker, tmp_path, small_disk, default_pack_dir, enrolled_state):
    """min_free_mb 0 (no floor), the 8 MB tmpfs filled to the last byte: a part whose row cannot land is
    retried (storage.write_retry_s), then published directly as an error (`recorded: false`); rows land
    again once space returns. Every part that entered has a result on the broker."""
    sub = Subscriber(broker.port, "test/s1/#")
    cfg = write_config(tmp_path, default_pack_dir, enrolled_state, broker.port,
                       {"kind": "synthetic", "seed": 0, "defect_rate": 0.2, "fps": 8},
                       storage={"dir": str(small_disk / "var"), "min_free_mb": 0, "write_retry_s": 1,
                                "keep_images": "none"}, explain={"enabled": False},
                       mqtt={"heatmap": {"mode": "none"}})
    rt = start(cfg)
    results = lambda: sub.unique_by_topic().get("test/s1/result", [])  # noqa: E731
    try:
        wait_until(lambda: rt.counts["parts"] >= 10, 60, "10 parts")
        ballast = _fill(small_disk, 0)
        try:
            with open(small_disk / "ballast2", "wb") as f:  # what rounding left
                while True:
                    f.write(b"\0" * 4096)
                    f.flush()
        except OSError:
            pass
        wait_until(lambda: rt.counts["output_errors"] >= 3, 60,
                   "writes to meet the full disk")
        ballast.unlink()
        (small_disk / "ballast2").unlink()
        parts_then = rt.counts["parts"]
        wait_until(lambda: rt.counts["parts"] >= parts_then + 10, 60, "rows again after the space came back")
    finally:
        rt.stop()
    with TraceStore(small_disk / "var") as store:
        rows = {r["part_id"] for r in store.query(limit=100_000)}
        assert store._sql("PRAGMA integrity_check")[0][0] == "ok"
    entered = rt.counts["captured"] - rt._queue.dropped
    wait_until(lambda: len({r["part_id"] for r in results()}) >= entered, 60, "a result for every part")
    got = {r["part_id"]: r for r in results()}
    unrecorded = {k for k, r in got.items() if r.get("recorded") is False}
    assert rows | unrecorded == set(got) and len(got) == entered
    print(f"{entered} parts: {len(rows)} rows, {len(unrecorded)} published unrecorded, "
          f"{rt.counts['store_retries']} write retries, {rt.counts['output_errors']} output errors")
