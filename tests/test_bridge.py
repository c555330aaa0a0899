"""The shipped station-local bridge (configs/mosquitto-bridge.conf) between two real Mosquitto
processes: results published while the central broker is away for 15 s reach a persistent central
subscriber in order and complete, and the central side sees the station's retained status, its Last
Will and the bridge's own presence."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_cli
from mqtt_helpers import BRIDGE_PREFIX as PREFIX
from mqtt_helpers import Broker, Subscriber, needs_mosquitto, render_bridge, retained, wait_until

pytestmark = needs_mosquitto

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bridged(tmp_path):
    central_dir, local_dir = tmp_path / "central", tmp_path / "local"
    central_dir.mkdir(), local_dir.mkdir()
    central, local = Broker(central_dir), Broker(local_dir)
    render_bridge(local, central.port)
    central.start()
    local.start()
    yield central, local
    for b in (local, central):
        b.stop()
        b.log.close()


def start_station(port: int, outbox: Path, count: int, rate: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "tests" / "bridge_station.py"), str(port), PREFIX,
                             str(outbox), str(count), str(rate)],
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True)


@pytest.mark.timeout(120)
def test_results_cross_a_15s_central_outage_in_order_with_status_and_last_will(bridged, tmp_path):
    central, local = bridged
    subscriber = Subscriber(central.port, topic=f"{PREFIX}/#")  # persistent session, QoS 1
    wait_for_bridge(central, local)
    count, rate = 600, 40.0  # 15 s of results
    station = start_station(local.port, tmp_path / "outbox.sqlite", count, rate)
    try:
        wait_until(lambda: len(_results(subscriber)) >= 40, 20, "results through the bridge")
        central.stop()  # the bridge link drops; the station keeps publishing to its local broker
        down_at = time.monotonic()
        time.sleep(15)
        central.start()
        results = None
        wait_until(lambda: len(_results(subscriber)) >= count, 60, f"all {count} results after the outage")
        results = _results(subscriber)
        assert [p["n"] for p in results] == list(range(count))  # in order, none lost, none doubled
        assert time.monotonic() - down_at > 15
        assert retained(central.port, f"{PREFIX}/status")["state"] == "online"
        assert _retained_or_none(central.port, f"{PREFIX}/bridge") == "1"

        station.send_signal(signal.SIGKILL)  # an unclean end: the local broker publishes the Last Will
        station.wait(5)
        wait_until(lambda: _retained_or_none(central.port, f"{PREFIX}/status") == '{"state": "offline"}', 10,
                   "the station's Last Will on the central broker")
        with subscriber.lock:
            statuses = [m.payload.decode() for m in subscriber.messages if m.topic == f"{PREFIX}/status"]
        assert json.loads(statuses[-1]) == {"state": "offline"}
    finally:
        if station.poll() is None:
            station.kill()
            station.wait()
        subscriber.close()


@pytest.mark.timeout(60)
def test_commands_come_down_the_bridge_once_and_the_bridge_last_will_reaches_central(bridged):
    central, local = bridged
    wait_for_bridge(central, local)
    on_station = Subscriber(local.port, topic=f"{PREFIX}/cmd/#", persistent=False)
    on_central = Subscriber(central.port, topic=f"{PREFIX}/cmd/#", persistent=False)
    try:
        import paho.mqtt.publish as single
        single.single(f"{PREFIX}/cmd/trigger", json.dumps({"part_id": "A-1"}), qos=1, hostname="127.0.0.1",
                      port=central.port)
        wait_until(lambda: len(on_station.messages) >= 1, 10, "the command on the station's broker")
        time.sleep(1.0)  # a loop would bring it back up to the central broker
        assert [json.loads(m.payload) for m in on_station.messages] == [{"part_id": "A-1"}]
        assert len(on_central.messages) == 1
    finally:
        on_station.close()
        on_central.close()
    local.process.send_signal(signal.SIGKILL)  # the station's box is gone: the bridge's Last Will
    local.process.wait()
    local.process = None
    wait_until(lambda: _retained_or_none(central.port, f"{PREFIX}/bridge") == "0", 10, "the bridge's Last Will")
    rows = json.loads(run_cli("fleet", "--broker", "127.0.0.1", "--port", central.port, "--once", "--json").stdout)
    assert [(r["station"], r["state"]) for r in rows] == [(PREFIX, "unreachable")]  # the fleet view says so


def _results(subscriber: Subscriber) -> list[dict]:
    return subscriber.unique_by_topic().get(f"{PREFIX}/result", [])


def wait_for_bridge(central: Broker, local: Broker, timeout: float = 30) -> None:
    """Until the central broker holds the bridge's retained presence "1"; on a timeout the assertion
    carries both brokers' logs (the bridge's connection attempts are in the local one)."""
    try:
        wait_until(lambda: _retained_or_none(central.port, f"{PREFIX}/bridge") == "1", timeout, "the bridge to connect")
    except AssertionError as e:
        logs = "\n".join(f"--- {name} broker log (port {b.port}):\n"
                         f"{Path(b.log.name).read_text(errors='replace')[-3000:]}"
                         for name, b in (("local", local), ("central", central)))
        raise AssertionError(f"{e}\n{logs}") from None


def _retained_or_none(port: int, topic: str):
    try:
        payload = retained(port, topic, timeout=0.5)
    except AssertionError:
        return None
    except (ConnectionError, OSError):
        return None
    return payload if isinstance(payload, str) else json.dumps(payload)
