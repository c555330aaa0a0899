"""`anomaly-edge fleet` against a real Mosquitto and two real stations (Runtime instances publishing their
health() as retained status): one line each, online/offline, model, rates, outbox, explanation backlog,
refreshed while it runs."""
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT, run_cli
from edge.cli.fleet import render, station_row
from mqtt_helpers import needs_mosquitto, retained, wait_until
from station_helpers import finish, start, write_config

pytestmark = needs_mosquitto


def station(tmp_path, name, broker, pack_dir, state, count):
    d = tmp_path / name
    d.mkdir()
    cfg = write_config(d, pack_dir, state, broker.port,
                       {"kind": "synthetic", "seed": 1, "defect_rate": 0.5, "count": count, "fps": 10},
                       station={"name": name}, mqtt={"topic_prefix": f"anomaly-edge/l1/{name}"})
    return start(cfg)


@pytest.mark.timeout(300)  # the first test of a session also exports the pack
def test_fleet_lists_each_station_and_refreshes(broker, tmp_path, default_pack_dir, enrolled_state):
    running = station(tmp_path, "s1", broker, default_pack_dir, enrolled_state, None)
    done = station(tmp_path, "s2", broker, default_pack_dir, enrolled_state, 12)
    watcher = None
    try:
        finish(done)  # a clean stop: its retained status is "offline"
        wait_until(lambda: retained(broker.port, "anomaly-edge/l1/s1/status").get("counts", {}).get("parts", 0) >= 5,
                   60, "s1 to publish a status with parts")
        rows = json.loads(run_cli("fleet", "--broker", "127.0.0.1", "--port", broker.port, "--once", "--json").stdout)
        by_name = {r["station"]: r for r in rows}
        assert set(by_name) == {"anomaly-edge/l1/s1", "anomaly-edge/l1/s2"}
        s1, s2 = by_name["anomaly-edge/l1/s1"], by_name["anomaly-edge/l1/s2"]
        assert s1["state"] == "online" and s1["model"] == "efficientnet-lite0-bank-224"
        assert 0 < s1["parts/h"] <= 11 * 3600  # the source runs at 10 parts/s
        assert 0 <= s1["flagged"] <= 1 and isinstance(s1["outbox"], int)
        assert s2["state"] == "offline"  # the clean stop's message; the fields are gone with it

        table = run_cli("fleet", "--broker", "127.0.0.1", "--port", broker.port, "--once").stdout.splitlines()
        assert table[0].split()[:3] == ["station", "state", "model"]
        assert [line.split()[:2] for line in table[1:]] == [["anomaly-edge/l1/s1", "online"],
                                                            ["anomaly-edge/l1/s2", "offline"]]

        watcher = subprocess.Popen([sys.executable, "-m", "edge.cli.main", "fleet", "--broker", "127.0.0.1", "--port",
                                    str(broker.port), "--interval", "0.3"], cwd=ROOT, stdout=subprocess.PIPE,
                                   text=True, env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"})
        seen = []

        def s1_state():
            line = watcher.stdout.readline()
            seen.append(line)
            return line.startswith("anomaly-edge/l1/s1") and line.split()[1]

        wait_until(lambda: s1_state() == "online", 20, "the refreshing view to show s1 online")
        running.stop()
        running = None
        wait_until(lambda: s1_state() == "offline", 20, "the refreshing view to show s1 offline")
        line = seen[-1].split()
        assert line[2] == "efficientnet-lite0-bank-224"  # what it last said is kept beside "offline"
    finally:
        if watcher is not None:
            watcher.terminate()
            watcher.wait(5)
        if running is not None:
            running.stop()


def test_rows_from_health_payloads():
    now = float(int(time.time()))
    iso = lambda t: time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".000Z"
    health = {"state": "online", "model_id": "m", "time": iso(now - 5), "fps": {"scored": 0.5},
              "counts": {"parts": 200, "flagged": 10}, "broker": {"outbox_size": 3},
              "explain": {"state": "running", "pending": 7}}
    row = station_row("anomaly-edge/l1/s1", health, "1", now, stale_s=60)
    assert row == {"station": "anomaly-edge/l1/s1", "state": "online", "model": "m", "parts/h": 1800,
                   "flagged": 0.05, "outbox": 3, "explain": 7, "age_s": 5.0}
    assert station_row("p", health, None, now, stale_s=2)["state"] == "stale"
    assert station_row("p", health, "0", now, stale_s=60)["state"] == "unreachable"
    assert station_row("p", {"state": "offline"}, None, now, 60)["model"] is None
    assert "5.0%" in render([row])


def test_unreachable_broker_is_named():
    from socket import socket

    with socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = run_cli("fleet", "--broker", "127.0.0.1", "--port", port, "--once", check=False)
    assert proc.returncode == 2 and f"127.0.0.1:{port}" in proc.stderr
