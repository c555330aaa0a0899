"""A real Mosquitto per test and a collecting subscriber, shared by the MQTT tests."""
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

MOSQUITTO = shutil.which("mosquitto") or (
    "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
)
needs_mosquitto = pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto broker not installed (apt install mosquitto)")

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

    def __init__(self, workdir: Path, security: str = "allow_anonymous true\n"):
        self.port = free_port()
        self.config = workdir / "mosquitto.conf"
        self.config.write_text(
            f"listener {self.port} 127.0.0.1\n{security}"
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
                try:
                    payload = json.loads(m.payload)
                except ValueError:
                    continue
                if not isinstance(payload, dict) or "message_id" not in payload:
                    continue  # status and source state: not store-and-forward messages
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




def retained(port: int, topic: str, timeout: float = 5.0) -> dict:
    """The retained JSON message on `topic` (AssertionError when there is none)."""
    got = threading.Event()
    holder = {}
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"retained-reader-{time.monotonic_ns()}")

    def on_message(c, u, message):
        if message.retain:
            holder["payload"] = json.loads(message.payload)
            got.set()

    client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        assert got.wait(timeout), f"no retained message on {topic}"
    finally:
        client.disconnect()
        client.loop_stop()
    return holder["payload"]


SHIPPED_BRIDGE = Path(__file__).resolve().parents[1] / "configs" / "mosquitto-bridge.conf"
BRIDGE_PREFIX = "anomaly-edge/line-1/station-1"  # the prefix the shipped bridge file is written for


def render_bridge(local: Broker, central_port: int, prefix: str = BRIDGE_PREFIX) -> None:
    """configs/mosquitto-bridge.conf as `local`'s config: only its port, folder, the central port and
    (when given) another station prefix and client id put in."""
    import re

    text = SHIPPED_BRIDGE.read_text()
    substitutions = {r"^listener 1883 127\.0\.0\.1$": f"listener {local.port} 127.0.0.1",
                     r"^persistence_location .*$": f"persistence_location {local.config.parent}/",
                     r"^address .*$": f"address 127.0.0.1:{central_port}"}
    for pattern, value in substitutions.items():
        text, n = re.subn(pattern, value, text, flags=re.M)
        assert n == 1, f"{SHIPPED_BRIDGE}: expected one line matching {pattern!r}"
    if prefix != BRIDGE_PREFIX:
        text = text.replace(BRIDGE_PREFIX, prefix).replace("bridge-line-1-station-1", f"bridge-{prefix.replace('/', '-')}")
    # Run as root, mosquitto drops to user "mosquitto", which cannot write tmp_path.
    local.config.write_text(f"user {pwd.getpwuid(os.getuid()).pw_name}\n{text}")
