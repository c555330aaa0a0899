"""Store-and-forward publishing against a real Mosquitto: order, broker restarts, process restarts.

The subscriber keeps a persistent session (clean_session=False, QoS 1) and the broker persists it
on a graceful stop, so messages the publisher delivered while the subscriber was reconnecting are
still handed to it; what is being tested is that the publisher loses nothing.
"""
import time
from pathlib import Path

import pytest

from edge.line.outbox import Outbox
from edge.line.publish import MqttPublisher
from mqtt_helpers import PREFIX, Subscriber, needs_mosquitto, retained, wait_until

pytestmark = needs_mosquitto


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
        assert publisher.stats() == {"connected": True, "outbox_size": 0, "sent": 50, "last_error": None}
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
    publisher = make_publisher(tmp_path / "outbox.sqlite", broker.port)
    wait_until(lambda: publisher.stats()["connected"], 5, "publisher to connect")
    wait_until(lambda: retained(broker.port, f"{PREFIX}/status") == {"state": "online"}, 5, "status online")
    publisher.close()
    assert retained(broker.port, f"{PREFIX}/status") == {"state": "offline"}


@pytest.mark.timeout(30)
def test_broker_down_at_start_publish_returns_at_once_and_sends_later(broker, tmp_path):
    subscriber = Subscriber(broker.port)  # its persistent session outlives the broker stop
    broker.stop()
    publisher = make_publisher(tmp_path / "outbox.sqlite", broker.port)
    try:
        for n in range(10):
            assert_fast(lambda n=n: publisher.publish("parts", {"n": n}))
        time.sleep(0.3)
        stats = publisher.stats()
        assert {k: stats[k] for k in ("connected", "outbox_size", "sent")} == {"connected": False, "outbox_size": 10,
                                                                               "sent": 0}
        assert "Connection refused" in stats["last_error"]  # why it is not connected, until it is
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
