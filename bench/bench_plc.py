"""The plant protocols under load: OPC UA handshake latency and the Sparkplug B DDATA rate.

    python bench/bench_plc.py [--pack /work/main/packs/default] [--handshakes 200] [--seconds 20]

1. OPC UA and Modbus TCP: a station (default pack, synthetic parts, trigger.mode mqtt, plc.opcua and
   plc.modbus on) and the PLC stand-ins tests/opcua_plc.py, tests/modbus_plc.py in their own process,
   one after the other, each doing the full handshake `--handshakes` times back to back; Trigger ->
   ResultValid p50/p99 as the PLC sees it (includes scoring the part) and full handshakes per second.
2. Sparkplug, whole station: a free-running synthetic camera at 30 frames/s with mqtt.sparkplug on; a
   subscriber decodes every DDATA for `--seconds` s: DDATA/s received against parts/s scored.
3. Sparkplug, the edge node alone: results fed at 30/s and then as fast as it takes them (no scorer),
   received and decoded by a subscriber: what the node sustains, and its cost per message.
A real Mosquitto on a free loopback port. Prints markdown for docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import logging
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import paho.mqtt.client as mqtt  # noqa: E402
import yaml  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from bench.bench_outbox import free_port, start_broker  # noqa: E402
from bench.bench_scoring import cpu_name  # noqa: E402
from edge.line.config import load_config  # noqa: E402
from edge.line.plc.sparkplug import SparkplugNode  # noqa: E402
from edge.line.plc.sparkplug_schema import Payload  # noqa: E402


class DdataCounter:
    """Subscribes to spBv1.0/#, decodes every DDATA, timestamps its arrival."""

    def __init__(self, port: int):
        self.arrivals: list[float] = []
        self.undecodable = 0
        ready = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-spb-{port}")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe("spBv1.0/#", qos=0)
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        ready.wait(10)

    def _on_message(self, client, userdata, message):
        if "/DDATA/" in message.topic:
            try:
                Payload.FromString(message.payload)
            except Exception:
                self.undecodable += 1
                return
            self.arrivals.append(time.monotonic())

    def rate(self, since: float, until: float) -> float:
        n = sum(1 for t in self.arrivals if since <= t <= until)
        return n / (until - since)

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def station_config(work: Path, pack: Path, state: Path, broker_port: int, source: dict, **sections) -> Path:
    raw = {"station": {"line": "l1", "name": "s1", "mm_per_pixel": 0.1}, "pack": str(pack), "state": str(state),
           "source": source, "mqtt": {"host": "127.0.0.1", "port": broker_port, "topic_prefix": "bench/s1"},
           "storage": {"dir": str(work / "var")}, "explain": {"enabled": False}, **sections}
    path = work / "station.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def bench_handshakes(work: Path, pack: Path, state: Path, broker_port: int, n: int) -> dict:
    from edge.line.runtime import Runtime

    ua_port, mb_port = free_port(), free_port()
    cfg = station_config(work / "opcua", pack, state, broker_port, {"kind": "synthetic", "seed": 0},
                         trigger={"mode": "mqtt"},
                         plc={"opcua": {"enabled": True, "port": ua_port,
                                        "users": [{"name": "plc", "password": "bench", "role": "operator"}]},
                              "modbus": {"enabled": True, "port": mb_port}})
    rt = Runtime(load_config(cfg), cfg).start()
    out = {}
    try:
        for name, argv in (("OPC UA", ["opcua_plc.py", f"opc.tcp://127.0.0.1:{ua_port}/anomaly-edge/", "plc",
                                       "bench", "handshake", str(n)]),
                           ("Modbus TCP", ["modbus_plc.py", str(mb_port), "handshake", str(n)])):
            rt.pipeline.score_ms._samples.clear()
            proc = subprocess.run([sys.executable, str(ROOT / "tests" / argv[0]), *argv[1:]],
                                  capture_output=True, text=True, timeout=1800)
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr[-2000:])
            summary = json.loads(proc.stdout.splitlines()[-1])
            out[name] = {"n": n, "p50_ms": summary["p50_ms"], "p99_ms": summary["p99_ms"],
                         "score_ms": rt.health()["latency_ms"]["score"], "per_s": n / summary["wall_s"]}
        return out
    finally:
        rt.stop()


def bench_station_sparkplug(work: Path, pack: Path, state: Path, broker_port: int, seconds: float) -> dict:
    from edge.line.runtime import Runtime

    counter = DdataCounter(broker_port)
    cfg = station_config(work / "spb", pack, state, broker_port, {"kind": "synthetic", "seed": 0, "fps": 30},
                         mqtt={"host": "127.0.0.1", "port": broker_port, "topic_prefix": "bench/s1",
                               "sparkplug": {"enabled": True, "group_id": "bench", "health_interval_s": 1.0}})
    rt = Runtime(load_config(cfg), cfg).start()
    try:
        time.sleep(3)  # warm up
        t0, parts0 = time.monotonic(), rt.counts["parts"]
        time.sleep(seconds)
        t1, parts1 = time.monotonic(), rt.counts["parts"]
        time.sleep(0.5)
        return {"parts_per_s": (parts1 - parts0) / (t1 - t0), "ddata_per_s": counter.rate(t0, t1),
                "captured_per_s": rt.pipeline.captured.rate(), "dropped": rt._queue.dropped,
                "undecodable": counter.undecodable}
    finally:
        rt.stop()
        counter.close()


def _stand_in_runtime(work: Path, broker_port: int):
    """What SparkplugNode reads from a Runtime, without a scorer: config, pack id, health, counts."""
    raw = {"pack": "unused", "state": "unused", "source": {"kind": "synthetic"},
           "mqtt": {"host": "127.0.0.1", "port": broker_port, "sparkplug": {"enabled": True, "group_id": "bench",
                                                                           "edge_node_id": "alone"}},
           "storage": {"dir": str(work)}}
    from edge.line.config import parse_config

    config = parse_config(raw, work / "station.yaml", check_files=False)
    counts = collections.Counter()
    health = {"counts": {k: 0 for k in ("parts", "flagged", "errors", "dropped_frames", "bad_frames", "bad_commands",
                                        "reconnects")}, "source": {"name": "synthetic", "state": "streaming"}}
    return types.SimpleNamespace(config=config, pack=types.SimpleNamespace(model_id="bench-model"), counts=counts,
                                 health=lambda: health, command=lambda name, payload: None, station="s1")


def _result(i: int) -> dict:
    return {"part_id": f"P-{i:07d}", "verdict": "anomalous" if i % 5 == 0 else "normal", "score": 1.0 + (i % 97) / 100,
            "threshold": 1.8, "severity": 0.1 * (i % 5 == 0), "regions": [{"area": 40, "width": 8, "height": 5}] *
            (i % 5 == 0), "trigger": "free_run", "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(),
            "model_id": "bench-model", "latency_ms": {"score": 40.0 + i % 7, "capture_to_publish": 55.0 + i % 11}}


def bench_node_alone(work: Path, broker_port: int, seconds: float, burst: int) -> dict:
    counter = DdataCounter(broker_port)
    node = SparkplugNode(_stand_in_runtime(work / "alone", broker_port)).start()
    try:
        deadline = time.monotonic() + 10
        while node.counts["births"] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        n0, t0 = len(counter.arrivals), time.monotonic()
        i = 0
        while time.monotonic() - t0 < seconds:  # paced: 30 results/s
            node.on_result(_result(i))
            i += 1
            time.sleep(max(0.0, t0 + i / 30 - time.monotonic()))
        time.sleep(0.5)
        paced = (len(counter.arrivals) - n0, i)
        n1 = len(counter.arrivals)
        c0, t0, m0 = time.process_time(), time.perf_counter(), time.monotonic()
        for j in range(burst):
            node.on_result(_result(i + j))
        t_feed, cpu = time.perf_counter() - t0, time.process_time() - c0
        deadline = time.monotonic() + 30
        while len(counter.arrivals) - n1 < burst and time.monotonic() < deadline:
            time.sleep(0.01)
        t_all = counter.arrivals[-1] - m0 if len(counter.arrivals) > n1 else t_feed
        return {"paced_sent": paced[1], "paced_received": paced[0], "burst": burst,
                "burst_received": len(counter.arrivals) - n1, "burst_feed_per_s": burst / t_feed,
                "burst_received_per_s": (len(counter.arrivals) - n1) / max(t_all, t_feed),
                "cpu_us_per_message": cpu / burst * 1e6, "undecodable": counter.undecodable}
    finally:
        node.close()
        counter.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pack", type=Path, default=Path("/work/main/packs/default"))
    ap.add_argument("--handshakes", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--burst", type=int, default=5000)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from edge.pack import load_pack
    from edge.station.enrollment import enroll
    from edge.line.synthetic import write_good_parts

    with tempfile.TemporaryDirectory(prefix="bench-plc.") as tmp:
        work = Path(tmp)
        for sub in ("opcua", "spb", "alone"):
            (work / sub).mkdir()
        state = work / "state"
        enroll(load_pack(args.pack), write_good_parts(work / "good", 16), state, quiet=True, log=lambda m: None)
        port = free_port()
        broker = start_broker(work, port)
        try:
            handshakes = bench_handshakes(work, args.pack, state, port, args.handshakes)
            spb = bench_station_sparkplug(work, args.pack, state, port, args.seconds)
            alone = bench_node_alone(work, port, args.seconds, args.burst)
        finally:
            broker.terminate()
            broker.wait(5)
    print(f"\n{dt.date.today()}, {cpu_name()}, `python bench/bench_plc.py --handshakes {args.handshakes} "
          f"--seconds {args.seconds:g} --burst {args.burst}`\n")
    print("| measurement | value |\n|---|---|")
    for name, h in handshakes.items():
        print(f"| {name} Trigger -> ResultValid, {h['n']} handshakes back to back | p50 {h['p50_ms']:.1f} ms, "
              f"p99 {h['p99_ms']:.1f} ms (scoring alone p50 {h['score_ms']['p50']} ms, p99 {h['score_ms']['p99']} ms); "
              f"{h['per_s']:.1f} full handshakes/s |")
    print(f"| Sparkplug, whole station, camera at 30 frames/s | {spb['ddata_per_s']:.1f} DDATA/s received for "
          f"{spb['parts_per_s']:.1f} parts/s scored ({spb['captured_per_s']:.1f} frames/s captured, "
          f"{spb['dropped']} dropped by the capture queue, {spb['undecodable']} undecodable) |")
    print(f"| Sparkplug node alone, results at 30/s for {args.seconds:g} s | {alone['paced_received']} DDATA "
          f"received for {alone['paced_sent']} results (health changes add DDATA too) |")
    print(f"| Sparkplug node alone, {alone['burst']} results as fast as it takes them | "
          f"{alone['burst_feed_per_s']:.0f} results/s taken, {alone['burst_received']} DDATA received "
          f"({alone['burst_received_per_s']:.0f}/s), {alone['cpu_us_per_message']:.0f} us CPU per message |")


if __name__ == "__main__":
    main()
