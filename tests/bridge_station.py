"""A station process for the bridge tests: the real store-and-forward publisher on the station-local
broker, publishing numbered results at a steady rate and its retained status, then waiting to be killed
(so that the broker publishes its Last Will)."""
import sys
import time

from edge.line.publish import MqttPublisher


def main(port: int, prefix: str, outbox: str, count: int, rate: float) -> None:
    publisher = MqttPublisher(outbox, host="127.0.0.1", port=port, topic_prefix=prefix,
                              client_id=f"station-{prefix.replace('/', '-')}",
                              reconnect_min_delay=0.2, reconnect_max_delay=1)
    deadline = time.monotonic() + 10
    while not publisher.stats()["connected"]:
        if time.monotonic() > deadline:
            sys.exit(f"station could not reach the local broker on port {port}")
        time.sleep(0.02)
    publisher.publish_now("status", {"state": "online", "station": prefix.rsplit("/", 1)[-1]}, retain=True)
    started = time.monotonic()
    for n in range(count):
        publisher.publish("result", {"n": n, "part_id": f"P-{n:06d}"})
        time.sleep(max(0.0, started + (n + 1) / rate - time.monotonic()))
    print("published", count, flush=True)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]))
