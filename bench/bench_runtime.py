"""End-to-end runtime benchmark: synthetic line -> runtime -> outbox -> a real Mosquitto -> a subscriber.

    python bench/bench_runtime.py --pack packs/default throughput --frames 2000
    python bench/bench_runtime.py --pack packs/default camera --fps 30 --frames 1500
    python bench/bench_runtime.py --pack packs/default soak --frames 20000

throughput: the source as fast as scoring takes it (nothing dropped): results/s on the broker.
camera:     the source paced like a camera at --fps (oldest frames dropped when scoring lags):
            latency from capture to the result's arrival at a subscriber on the same broker (the
            broker forwards a QoS 1 message before it acknowledges it, so this bounds capture->PUBACK).
soak:       --frames parts as fast as possible; RSS and outbox size sampled every --sample-s seconds.
Prints a JSON summary (and writes it with --json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_scoring import cpu_name  # noqa: E402
from edge.line.config import load_config  # noqa: E402
from edge.pack import load_pack  # noqa: E402
from edge.line.runtime import Runtime  # noqa: E402
from edge.station.enrollment import enroll  # noqa: E402
from edge.line.synthetic import write_good_parts  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_broker(workdir: Path) -> tuple[subprocess.Popen, int]:
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("mosquitto did not start")


class Receiver:
    """Counts results and records capture -> arrival latency from each result's capture timestamp."""

    def __init__(self, port: int, topic: str):
        self.latencies: list[float] = []
        self.count = 0
        self.lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-{port}")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client, userdata, message):
        now = time.time()
        body = json.loads(message.payload)
        captured = datetime.fromisoformat(body["timestamp"].replace("Z", "+00:00")).timestamp()
        with self.lock:
            self.count += 1
            self.latencies.append((now - captured) * 1000)

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pack", default=str(ROOT / "packs" / "default"))
    ap.add_argument("mode", choices=["throughput", "camera", "soak"])
    ap.add_argument("--frames", type=int, default=2000)
    ap.add_argument("--fps", type=float, default=30)
    ap.add_argument("--sample-s", type=float, default=10)
    ap.add_argument("--json")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-runtime."))
    broker, port = start_broker(work)
    try:
        pack = load_pack(args.pack)
        enroll(pack, write_good_parts(work / "good", 16), work / "state", quiet=True, log=lambda m: None)
        source = {"kind": "synthetic", "seed": 0, "defect_rate": 0.2, "count": args.frames}
        if args.mode == "camera":
            source["fps"] = args.fps
        raw = {"station": {"line": "bench", "name": "s1", "mm_per_pixel": 0.1}, "pack": str(Path(args.pack).resolve()),
               "state": str(work / "state"), "source": source,
               "mqtt": {"host": "127.0.0.1", "port": port, "topic_prefix": "bench/s1"},
               "storage": {"dir": str(work / "var")}, "api": {"enabled": False}}
        (work / "station.yaml").write_text(yaml.safe_dump(raw))
        receiver = Receiver(port, "bench/s1/result")
        time.sleep(0.5)
        rt = Runtime(load_config(work / "station.yaml"), work / "station.yaml").start()
        t0 = time.monotonic()
        samples = []
        next_sample = t0
        while True:
            with receiver.lock:
                done = receiver.count
            parts = rt.counts["parts"]
            if rt._source_done.is_set() and done >= parts and parts + rt._queue.dropped >= rt.counts["captured"]:
                break
            if time.monotonic() >= next_sample:
                samples.append({"t_s": round(time.monotonic() - t0, 1), "parts": parts, "rss_mb": round(rss_mb(), 1),
                                "outbox": rt.publisher.stats()["outbox_size"]})
                next_sample += args.sample_s
                if args.mode == "soak":
                    print(json.dumps(samples[-1]), file=sys.stderr, flush=True)
            time.sleep(0.05)
        wall = time.monotonic() - t0
        samples.append({"t_s": round(wall, 1), "parts": rt.counts["parts"], "rss_mb": round(rss_mb(), 1),
                        "outbox": rt.publisher.stats()["outbox_size"]})
        health = rt.health()
        rt.stop()
        receiver.close()
        lat = np.array(receiver.latencies)
        out = {
            "mode": args.mode, "frames": args.frames, "date": time.strftime("%Y-%m-%d"),
            "machine": f"{cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}",
            "results_on_broker": int(receiver.count), "dropped": int(rt._queue.dropped),
            "flagged": int(rt.counts["flagged"]), "wall_s": round(wall, 1),
            "results_per_s": round(receiver.count / wall, 1),
            "capture_to_broker_ms": {"p50": round(float(np.percentile(lat, 50)), 1),
                                     "p99": round(float(np.percentile(lat, 99)), 1)},
            "score_ms": health["latency_ms"]["score"],
        }
        if args.mode == "camera":
            out["camera_fps"] = args.fps
        if args.mode == "soak":
            warm = next((s for s in samples if s["parts"] >= 1000), samples[0])
            out["rss_mb"] = {"after_1000_parts": warm["rss_mb"], "end": samples[-1]["rss_mb"],
                             "growth_after_warmup": round(samples[-1]["rss_mb"] - warm["rss_mb"], 1)}
            out["outbox_max"] = max(s["outbox"] for s in samples)
            out["samples"] = samples
        print(json.dumps(out, indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1))
    finally:
        broker.terminate()
        broker.wait()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
