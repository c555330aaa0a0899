"""The bridge's end-to-end delay: S stations, each with its own station-local Mosquitto bridged to one
central Mosquitto by configs/mosquitto-bridge.conf (ports, folders and prefix put in), each publishing
results at R parts/s through the real outbox publisher (edge.line.publish); a subscriber on the central
broker measures publish() -> arrival per message.

    PYTHONPATH=. python bench/bench_bridge.py --stations 4 --rate 30 --seconds 20 [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stations", type=int, default=4)
    ap.add_argument("--rate", type=float, default=30.0, help="results per second per station")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--json")
    args = ap.parse_args()

    from edge.line.publish import MqttPublisher
    from mqtt_helpers import Broker, Subscriber, render_bridge, wait_until

    tmp = Path(tempfile.mkdtemp(prefix="bench-bridge-"))
    (tmp / "central").mkdir()
    central = Broker(tmp / "central")
    central.start()
    brokers, publishers = [], []
    prefixes = [f"anomaly-edge/line-1/station-{s + 1}" for s in range(args.stations)]
    arrivals: list[tuple[str, float]] = []
    sub = Subscriber(central.port, topic="anomaly-edge/+/+/result")
    sub.client.on_message = lambda c, u, m: arrivals.append((m.payload, time.time()))
    try:
        for s, prefix in enumerate(prefixes):
            d = tmp / f"station-{s + 1}"
            d.mkdir()
            b = Broker(d)
            render_bridge(b, central.port, prefix)
            b.start()
            brokers.append(b)
            publishers.append(MqttPublisher(d / "outbox.sqlite", host="127.0.0.1", port=b.port, topic_prefix=prefix,
                                            client_id=f"station-{s + 1}"))
        wait_until(lambda: all(p.stats()["connected"] for p in publishers), 10, "stations connected")
        time.sleep(2)  # the bridges connect
        count = int(args.rate * args.seconds)

        def station(p: MqttPublisher, s: int) -> None:
            t0 = time.monotonic()
            for n in range(count):
                p.publish("result", {"n": n, "station": s, "sent_at": time.time()})
                time.sleep(max(0.0, t0 + (n + 1) / args.rate - time.monotonic()))

        threads = [threading.Thread(target=station, args=(p, s)) for s, p in enumerate(publishers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wait_until(lambda: len(arrivals) >= count * args.stations, 60, "every result at the central broker")
        seen, delays, order_ok = set(), [], True
        last = {}
        for payload, at in arrivals:
            m = json.loads(payload)
            key = (m["station"], m["n"])
            if key in seen:
                continue
            seen.add(key)
            order_ok &= m["n"] == last.get(m["station"], -1) + 1
            last[m["station"]] = m["n"]
            delays.append((at - m["sent_at"]) * 1000)
        d = np.array(delays)
        out = {"stations": args.stations, "rate_per_station": args.rate, "seconds": args.seconds,
               "results": len(seen), "duplicates": len(arrivals) - len(seen), "in_order": bool(order_ok),
               "delay_ms_p50": round(float(np.percentile(d, 50)), 2), "delay_ms_p99": round(float(np.percentile(d, 99)), 2),
               "delay_ms_max": round(float(d.max()), 2)}
        print(json.dumps(out, indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1))
    finally:
        sub.close()
        for p in publishers:
            p.close(flush_timeout=1)
        for b in brokers + [central]:
            b.stop()


if __name__ == "__main__":
    main()
