"""Store-and-forward publishing against a real Mosquitto: order, broker restarts, process restarts.

The subscriber keeps a persistent session (clean_session=False, QoS 1) and the broker persists it
on a graceful stop, so messages the publisher delivered while the subscriber was reconnecting are
still handed to it; what is being tested is that the publisher loses nothing.
"""
import json
import os
import pwd
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge.outbox import Outbox
from edge.publish import MqttPublisher

MOSQUITTO = shutil.which("mosquitto") or (
    "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
)
pytestmark = pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto broker not installed (apt install mosquitto)")

PREFIX = "test/station-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


class Broker:
    """A Mosquitto subprocess on a fixed loopback port that can be stopped and started again."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.config = workdir / "mosquitto.conf"
        self.config.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
            f"persistence true\npersistence_location {workdir}/\n"
            # Run as root, mosquitto drops to user "mosquitto", which cannot write tmp_path.
            f"user {pwd.getpwuid(os.getuid()).pw_name}\n"
        )
        self.log = open(workdir / "mosquitto.log", "ab")
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen([MOSQUITTO, "-c", str(self.config)], stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mosquitto did not start on port {self.port}; see {self.log.name}")
                time.sleep(0.02)

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


@pytest.fixture
def broker(tmp_path):
    broker = Broker(tmp_path)
    broker.start()
    yield broker
    broker.stop()
    broker.log.close()


class Subscriber:
    """A paho client that collects every message under the test prefix."""

    def __init__(self, port: int, topic: str = f"{PREFIX}/#", persistent: bool = True):
        self.messages: list[mqtt.MQTTMessage] = []
        self.lock = threading.Lock()
        self.arrived = threading.Event()
        self.subscribed = threading.Event()
        self.topic = topic
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"test-subscriber-{port}-{persistent}",
            clean_session=not persistent,
            protocol=mqtt.MQTTv311,
        )
        self.client.reconnect_delay_set(0.2, 0.5)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(self.topic, qos=1)
        self.client.on_subscribe = lambda *args: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect_async("127.0.0.1", port)
        self.client.loop_start()
        assert self.subscribed.wait(10), "subscriber never got its SUBACK"

    def _on_message(self, client, userdata, message):
        with self.lock:
            self.messages.append(message)
        self.arrived.set()

    def unique_by_topic(self) -> dict[str, list[dict]]:
        """Payloads per topic in arrival order, duplicates (same message_id) dropped."""
        seen, by_topic = set(), {}
        with self.lock:
            for m in self.messages:
                if m.topic.endswith("/status"):
                    continue
                payload = json.loads(m.payload)
                if payload["message_id"] not in seen:
                    seen.add(payload["message_id"])
                    by_topic.setdefault(m.topic, []).append(payload)
        return by_topic

    def wait_for_unique(self, count: int, timeout: float) -> dict[str, list[dict]]:
        wait_until(lambda: sum(map(len, self.unique_by_topic().values())) >= count, timeout, f"{count} messages")
        return self.unique_by_topic()

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def make_publisher(db: Path, port: int) -> MqttPublisher:
    return MqttPublisher(
        db, host="127.0.0.1", port=port, topic_prefix=PREFIX, client_id="test-publisher",
        reconnect_min_delay=0.2, reconnect_max_delay=1,
    )


def assert_in_order(by_topic: dict[str, list[dict]], per_topic: dict[str, int]) -> None:
    for suffix, n in per_topic.items():
        assert [p["n"] for p in by_topic[f"{PREFIX}/{suffix}"]] == list(range(n)), suffix


@pytest.mark.timeout(30)
def test_every_message_arrives_in_order_with_qos1(broker, tmp_path):
    subscriber = Subscriber(broker.port)
    publisher = make_publisher(tmp_path / "outbox.sqlite", broker.port)
    try:
        for n in range(50):
            publisher.publish("parts", {"n": n})
        by_topic = subscriber.wait_for_unique(50, timeout=10)
        assert_in_order(by_topic, {"parts": 50})
        with subscriber.lock:
            assert all(m.qos == 1 for m in subscriber.messages if m.topic == f"{PREFIX}/parts")
        wait_until(lambda: publisher.stats()["outbox_size"] == 0, 5, "empty outbox")
        assert publisher.stats() == {"connected": True, "outbox_size": 0, "sent": 50}
    finally:
        publisher.close()
        subscriber.close()


@pytest.mark.timeout(40)
def test_broker_restart_mid_stream_loses_no_message(broker, tmp_path):
    subscriber = Subscriber(broker.port)
    publisher = make_publisher(tmp_path / "outbox.sqlite", broker.port)
    try:
        for n in range(150):
            publisher.publish("parts", {"n": n})
            publisher.publish("explanations", {"n": n})
        wait_until(lambda: publisher.stats()["sent"] >= 40, 10, "first messages sent")
        broker.stop()  # mid-stream: most of the 300 are still in the outbox or in flight
        assert publisher.stats()["outbox_size"] > 0
        for n in range(150, 200):
            assert_fast(lambda n=n: publisher.publish("parts", {"n": n}))
        wait_until(lambda: not publisher.stats()["connected"], 5, "publisher to notice the broker is gone")
        broker.start()
        by_topic = subscriber.wait_for_unique(350, timeout=20)
        assert_in_order(by_topic, {"parts": 200, "explanations": 150})
        wait_until(lambda: publisher.stats()["outbox_size"] == 0, 5, "empty outbox")
    finally:
        publisher.close()
        subscriber.close()


@pytest.mark.timeout(40)
def test_publisher_crash_replays_the_outbox(broker, tmp_path):
    db = tmp_path / "outbox.sqlite"
    subscriber = Subscriber(broker.port)
    broker.stop()
    first = make_publisher(db, broker.port)
    for n in range(20):
        first.publish("parts", {"n": n})
    first.close(flush_timeout=0)  # the "crash": nothing was delivered
    with Outbox(db) as outbox:
        assert outbox.size() == 20

    second = make_publisher(db, broker.port)
    try:
        second.publish("parts", {"n": 20})
        broker.start()
        by_topic = subscriber.wait_for_unique(21, timeout=15)
        assert_in_order(by_topic, {"parts": 21})
        wait_until(lambda: second.stats()["outbox_size"] == 0, 5, "empty outbox")
    finally:
        second.close()
        subscriber.close()


@pytest.mark.timeout(30)
def test_retained_status_is_online_after_connect_and_offline_after_clean_close(broker, tmp_path):
    def retained_status() -> dict:
        got = threading.Event()
        holder = {}
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="status-reader")

        def on_message(c, u, message):
            holder["status"] = json.loads(message.payload)
            holder["retain"] = message.retain
            got.set()

        client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"{PREFIX}/status", qos=1)
        client.on_message = on_message
        client.connect("127.0.0.1", broker.port)
        client.loop_start()
        try:
            assert got.wait(5), "no retained status"
        finally:
            client.disconnect()
            client.loop_stop()
        assert holder["retain"] is True
        return holder["status"]

    publisher = make_publisher(tmp_path / "outbox.sqlite", broker.port)
    wait_until(lambda: publisher.stats()["connected"], 5, "publisher to connect")
    wait_until(lambda: retained_status() == {"state": "online"}, 5, "status online")
    publisher.close()
    assert retained_status() == {"state": "offline"}


@pytest.mark.timeout(30)
def test_broker_down_at_start_publish_returns_at_once_and_sends_later(broker, tmp_path):
    subscriber = Subscriber(broker.port)  # its persistent session outlives the broker stop
    broker.stop()
    publisher = make_publisher(tmp_path / "outbox.sqlite", broker.port)
    try:
        for n in range(10):
            assert_fast(lambda n=n: publisher.publish("parts", {"n": n}))
        time.sleep(0.3)
        assert publisher.stats() == {"connected": False, "outbox_size": 10, "sent": 0}
        broker.start()
        by_topic = subscriber.wait_for_unique(10, timeout=15)
        assert_in_order(by_topic, {"parts": 10})
    finally:
        publisher.close()
        subscriber.close()


def assert_fast(call, limit_s: float = 0.2):
    started = time.monotonic()
    call()
    assert time.monotonic() - started < limit_s, "publish() blocked"
