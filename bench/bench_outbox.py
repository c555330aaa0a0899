"""How fast the outbox drains a backlog to a broker on loopback.

    python bench/bench_outbox.py [--messages 20000] [--rounds 3]

A real Mosquitto on a free loopback port; the outbox is filled with `--messages` result-sized JSON
messages while no broker runs (a station that was cut off), then the broker starts and the time until
the outbox is empty is measured. Prints markdown for docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import pwd
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_scoring import cpu_name  # noqa: E402
from edge.line.publish import MqttPublisher  # noqa: E402

PAYLOAD = {"station": "s1", "verdict": "normal", "score": 1.234, "threshold": 2.5, "p_value": 0.41,
           "regions": [], "latency_ms": {"queue": 0.4, "score": 13.1, "capture_to_publish": 15.2}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_broker(work: Path, port: int) -> subprocess.Popen:
    conf = work / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nuser {pwd.getpwuid(os.getuid()).pw_name}\n")
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    proc = subprocess.Popen([mosquitto, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError("mosquitto did not start")
            time.sleep(0.02)


def drain(n: int) -> float:
    with tempfile.TemporaryDirectory(prefix="bench-outbox.") as tmp:
        work, port = Path(tmp), free_port()
        pub = MqttPublisher(work / "outbox.sqlite", host="127.0.0.1", port=port, topic_prefix="bench/s1",
                            client_id="bench-outbox", reconnect_min_delay=1, reconnect_max_delay=1)
        for i in range(n):
            pub.publish("result", {**PAYLOAD, "part_id": f"P-{i:06d}"})
        broker = start_broker(work, port)
        try:
            t0 = time.monotonic()
            while not pub.stats()["connected"]:
                time.sleep(0.01)
            t_connected = time.monotonic()
            while pub.outbox.size():
                time.sleep(0.05)
            rate = n / (time.monotonic() - t_connected)
            print(f"  {n} messages in {time.monotonic() - t_connected:.2f} s after connecting "
                  f"({t_connected - t0:.2f} s to connect): {rate:.0f} messages/s", file=sys.stderr)
        finally:
            pub.close(flush_timeout=1)
            broker.terminate()
            broker.wait(10)
        return rate


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    rates = [drain(args.messages) for _ in range(args.rounds)]
    print(f"\n{cpu_name()}, {dt.date.today().isoformat()}, {args.messages} messages, Mosquitto on loopback\n")
    print(f"drain rate after the broker comes back: median {statistics.median(rates):.0f} messages/s "
          f"(min {min(rates):.0f}, max {max(rates):.0f}, {args.rounds} rounds)")
    if args.json:
        Path(args.json).write_text(json.dumps({"messages": args.messages, "rates": rates}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
