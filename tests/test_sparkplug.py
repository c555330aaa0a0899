"""The Sparkplug B edge node against a real Mosquitto, checked by a subscriber that decodes every message
with the schema and holds it to the 3.0 rules: bdSeq in the Will and the NBIRTH, seq continuity,
DBIRTH before DDATA, every DDATA metric declared in the DBIRTH (alias and datatype), rebirth on NCMD,
NDEATH when the station is SIGKILLed; malformed and unknown commands refused with a logged reason."""
import json
import logging
import signal
import subprocess
import sys
import threading
import time

import paho.mqtt.client as mqtt
import paho.mqtt.publish as publish
import pytest

pytest.importorskip("google.protobuf", reason="needs the plc extra (pip install -e .[plc])")
from paho.mqtt.enums import CallbackAPIVersion

from conftest import ROOT
from edge.line.plc.sparkplug_metrics import DEVICE_METRICS, NODE_METRICS
from edge.line.plc.sparkplug_schema import DATA_TYPE_NAMES, DATA_TYPES, VALUE_FIELD, Payload
from mqtt_helpers import Subscriber, needs_mosquitto, wait_until
from station_helpers import finish, start, write_config

pytestmark = needs_mosquitto

GROUP, EDGE, DEVICE = "plant-a", "s1", "cam-1"
BASE = f"spBv1.0/{GROUP}"


def test_the_schema_encodes_the_specification_field_numbers():
    """Bytes written by hand from the specification's field numbers (Payload: timestamp 1, metrics 2,
    seq 3; Metric: name 1, alias 2, timestamp 3, datatype 4, is_null 7, boolean 14, double 13, string 15)."""
    p = Payload(timestamp=1, seq=2)
    p.metrics.add(name="a", alias=3, timestamp=4, datatype=DATA_TYPES["Boolean"], boolean_value=True)
    p.metrics.add(alias=5, is_null=True)
    p.metrics.add(alias=6, string_value="x")
    assert p.SerializeToString() == bytes.fromhex(
        "0801" "120b" "0a0161" "1003" "1804" "200b" "7001"
        "1204" "1005" "3801" "1205" "1006" "7a0178" "1802")
    assert DATA_TYPES == {**DATA_TYPES, "Int64": 4, "UInt32": 7, "UInt64": 8, "Double": 10, "Boolean": 11,
                          "String": 12}
    d = Payload.FromString(bytes.fromhex("120b" "10" "07" "69" "000000000000f03f"))  # alias 7, double 1.0
    assert d.metrics[0].alias == 7 and d.metrics[0].double_value == 1.0


class SparkplugWatcher:
    """Decodes every spBv1.0 message; `check()` applies the 3.0 rules to what arrived."""

    def __init__(self, port: int):
        self.messages: list[tuple[str, str, Payload, bool, int]] = []  # topic, kind, payload, retain, qos
        self.lock = threading.Lock()
        self.undecodable: list[str] = []
        ready = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"spb-watcher-{port}")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"{BASE}/#", qos=1)
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert ready.wait(10)

    def _on_message(self, client, userdata, message):
        kind = message.topic.split("/")[2]
        if kind in ("NCMD", "DCMD"):
            return  # ours
        try:
            payload = Payload.FromString(message.payload)
        except Exception as e:
            self.undecodable.append(f"{message.topic}: {e}")
            return
        with self.lock:
            self.messages.append((message.topic, kind, payload, bool(message.retain), message.qos))

    def of(self, kind: str) -> list[Payload]:
        with self.lock:
            return [p for _, k, p, _, _ in self.messages if k == kind]

    def metric(self, payload: Payload, name: str):
        return next(m for m in payload.metrics if m.name == name)

    def check(self) -> dict:
        """The rules, over the whole recording; returns counts per kind."""
        assert not self.undecodable, self.undecodable
        with self.lock:
            messages = list(self.messages)
        counts: dict[str, int] = {}
        seq = None
        declared: dict[int, tuple[str, int]] = {}  # alias -> (name, datatype), from the births of this session
        bdseq = None
        now = time.time() * 1000
        for topic, kind, p, retain, qos in messages:
            counts[kind] = counts.get(kind, 0) + 1
            assert not retain, f"{kind} retained"
            assert 1e12 < p.timestamp <= now + 5000, f"{kind}: timestamp {p.timestamp} is not ms since the epoch"
            if kind == "NDEATH":
                assert qos == 1
                assert not p.HasField("seq"), "NDEATH carries no seq"
                assert self.metric(p, "bdSeq").long_value == bdseq, "NDEATH bdSeq is the NBIRTH's"
                seq, declared = None, {}
                continue
            assert p.HasField("seq") and 0 <= p.seq <= 255
            if kind == "NBIRTH":
                assert p.seq == 0
                bdseq = self.metric(p, "bdSeq").long_value
                assert self.metric(p, "Node Control/Rebirth").boolean_value is False
                declared = {}
            else:
                assert seq is not None, f"{kind} before any NBIRTH"
                assert p.seq == (seq + 1) % 256, f"{kind}: seq {p.seq} after {seq}"
            seq = p.seq
            if kind in ("NBIRTH", "DBIRTH"):
                for m in p.metrics:
                    assert m.name and m.HasField("alias") and m.HasField("datatype"), m
                    assert m.alias not in declared or declared[m.alias][0] == m.name, "alias reused"
                    declared[m.alias] = (m.name, m.datatype)
                    self._value_matches(m, m.datatype)
            if kind == "DBIRTH":
                assert {m.name for m in p.metrics} == {m.name for m in DEVICE_METRICS}
            if kind == "DDATA":
                assert any(n.startswith("Inspection/") for n, _ in declared.values()), "DDATA before DBIRTH"
                for m in p.metrics:
                    assert m.HasField("alias") and m.alias in declared, f"DDATA alias {m.alias} not born"
                    assert not m.name, "DDATA uses aliases only"
                    self._value_matches(m, declared[m.alias][1])
                    assert 1e12 < m.timestamp <= now + 5000
        return counts

    @staticmethod
    def _value_matches(m, datatype: int) -> None:
        field = m.WhichOneof("value")
        if m.is_null:
            assert field is None
        else:
            assert field == VALUE_FIELD[DATA_TYPE_NAMES[datatype]], f"alias {m.alias}: {field} for {datatype}"

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def decoded_ddata(watcher: SparkplugWatcher) -> list[dict]:
    """Each DDATA as {metric name: value}, names from the births."""
    names = {m.alias: m.name for m in NODE_METRICS + DEVICE_METRICS}
    return [{names[m.alias]: (None if m.is_null else getattr(m, m.WhichOneof("value"))) for m in p.metrics}
            for p in watcher.of("DDATA")]


def command(port: int, kind: str, metrics: list[dict] | bytes) -> None:
    topic = f"{BASE}/{kind}/{EDGE}" + (f"/{DEVICE}" if kind == "DCMD" else "")
    if isinstance(metrics, bytes):
        body = metrics
    else:
        p = Payload(timestamp=int(time.time() * 1000))
        for m in metrics:
            p.metrics.add(**m)
        body = p.SerializeToString()
    publish.single(topic, body, qos=1, hostname="127.0.0.1", port=port)


def sparkplug(**kw) -> dict:
    return {"sparkplug": {"enabled": True, "group_id": GROUP, "edge_node_id": EDGE, "device_id": DEVICE,
                          "health_interval_s": 0.2, **kw}}


@pytest.mark.timeout(240)
def test_a_run_follows_the_rules_rebirths_on_command_and_refuses_bad_commands(
        broker, tmp_path, default_pack_dir, enrolled_state, caplog):
    caplog.set_level(logging.WARNING, logger="edge.line.plc.sparkplug")
    watcher = SparkplugWatcher(broker.port)
    sub = Subscriber(broker.port, "test/s1/#")
    n = 300  # more than 256 messages: seq wraps
    cfg = write_config(tmp_path, default_pack_dir, enrolled_state, broker.port,
                       {"kind": "synthetic", "seed": 0, "defect_rate": 0.3, "count": n},
                       mqtt=sparkplug(), explain={"enabled": False})
    rt = start(cfg)
    try:
        wait_until(lambda: len(watcher.of("DBIRTH")) == 1, 30, "the births")
        wait_until(lambda: len(watcher.of("DDATA")) >= 20, 60, "data")
        command(broker.port, "NCMD", [{"name": "Node Control/Rebirth", "datatype": DATA_TYPES["Boolean"],
                                       "boolean_value": True}])
        wait_until(lambda: len(watcher.of("NBIRTH")) == 2 and len(watcher.of("DBIRTH")) == 2, 10, "the rebirth")
        first, again = watcher.of("NBIRTH")
        assert watcher.metric(again, "bdSeq").long_value == watcher.metric(first, "bdSeq").long_value
        # The DBIRTH of a rebirth carries the current values, not empty ones.
        reborn = watcher.of("DBIRTH")[1]
        assert watcher.metric(reborn, "Inspection/Part Id").string_value.startswith("s1-")
        assert watcher.metric(reborn, "Health/Parts").long_value > 0

        parts_before = rt.counts["parts"]
        command(broker.port, "NCMD", b"\xff\xff\xff not protobuf")
        command(broker.port, "NCMD", [{"name": "Node Control/Explode", "boolean_value": True}])
        command(broker.port, "NCMD", [{"name": "Node Control/Rebirth", "string_value": "yes"}])
        command(broker.port, "DCMD", [{"name": "Inspection/Score", "double_value": 0.0}])
        command(broker.port, "DCMD", [{"alias": 999, "string_value": "P-1"}])
        wait_until(lambda: rt.counts["bad_commands"] >= 5, 10, "five refusals")
        reasons = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
        assert any("not a Sparkplug B protobuf" in r for r in reasons), reasons
        assert any("unknown metric 'Node Control/Explode'" in r for r in reasons), reasons
        assert any("takes a Boolean (boolean_value), got string_value" in r for r in reasons), reasons
        assert any("read-only metric 'Inspection/Score'" in r for r in reasons), reasons
        assert any("unknown metric alias 999" in r for r in reasons), reasons
        assert len(watcher.of("NBIRTH")) == 2  # none of them rebirthed
        wait_until(lambda: rt.counts["parts"] > parts_before + 10, 30, "scoring to go on")
        finish(rt, timeout=120)
    finally:
        rt.stop()
    wait_until(lambda: len(watcher.of("NDEATH")) == 1, 10, "NDEATH at the clean stop")
    counts = watcher.check()
    assert counts["DDEATH"] == 1 and counts["NBIRTH"] == 2
    assert counts["NBIRTH"] + counts["DBIRTH"] + counts["DDATA"] + counts["DDEATH"] > 256  # seq wrapped
    # Every part's result is in a DDATA, equal to its JSON result.
    wait_until(lambda: len(sub.unique_by_topic().get("test/s1/result", [])) == n, 30, "every JSON result")
    json_results = {r["part_id"]: r for r in sub.unique_by_topic()["test/s1/result"]}
    data = [d for d in decoded_ddata(watcher) if "Inspection/Part Id" in d]
    state: dict = {}
    seen = {}
    for d in data:
        state |= d
        seen[d["Inspection/Part Id"]] = dict(state)
    assert len(seen) >= n - 5  # parts scored before the first birth are only in its DBIRTH (current state)
    for part_id, s in seen.items():
        r = json_results[part_id]
        assert s["Inspection/Verdict"] == r["verdict"]
        assert s["Inspection/Pass"] == (r["verdict"] == "normal")
        assert s["Inspection/Score"] == pytest.approx(r["score"])
        assert s["Inspection/Threshold"] == pytest.approx(r["threshold"])
        assert s["Inspection/Region Count"] == len(r["regions"])
    # DDATA carries only what changed: the threshold is sent once, not with each part.
    assert sum("Inspection/Threshold" in d for d in decoded_ddata(watcher)) <= 2
    watcher.close()
    sub.close()


def _service(cfg) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edge.cli.main", "run", "--config", str(cfg)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.timeout(240)
def test_a_sigkilled_station_gets_its_ndeath_and_the_next_start_a_new_bdseq_and_dcmd_triggers(
        broker, tmp_path, default_pack_dir, enrolled_state):
    watcher = SparkplugWatcher(broker.port)
    sub = Subscriber(broker.port, "test/s1/#")
    cfg = write_config(tmp_path, default_pack_dir, enrolled_state, broker.port, {"kind": "synthetic", "seed": 1},
                       trigger={"mode": "mqtt"}, mqtt={**sparkplug(), "keepalive": 5}, explain={"enabled": False})
    service = _service(cfg)
    try:
        wait_until(lambda: len(watcher.of("DBIRTH")) == 1, 90, "the first births")
        bd0 = watcher.metric(watcher.of("NBIRTH")[0], "bdSeq").long_value
        command(broker.port, "DCMD", [{"name": "Command/Trigger", "string_value": "SPB-1"}])
        wait_until(lambda: any(d.get("Inspection/Part Id") == "SPB-1" for d in decoded_ddata(watcher)), 30,
                   "the triggered part in a DDATA")
        t_kill = time.monotonic()
        service.send_signal(signal.SIGKILL)
        service.wait(10)
        wait_until(lambda: len(watcher.of("NDEATH")) == 1, 10, "the Will (NDEATH)")
        print(f"NDEATH {time.monotonic() - t_kill:.2f} s after SIGKILL")
        assert watcher.metric(watcher.of("NDEATH")[0], "bdSeq").long_value == bd0

        service = _service(cfg)
        wait_until(lambda: len(watcher.of("NBIRTH")) == 2, 90, "the births after the restart")
        assert watcher.metric(watcher.of("NBIRTH")[1], "bdSeq").long_value == (bd0 + 1) % 256
        command(broker.port, "DCMD", [{"alias": 50, "string_value": "SPB-2"}])  # by alias this time
        wait_until(lambda: any(d.get("Inspection/Part Id") == "SPB-2" for d in decoded_ddata(watcher)), 30,
                   "the second triggered part")
        # The result topic is published on its own: wait for it too, not only for the DDATA.
        results = lambda: {r["part_id"] for r in sub.unique_by_topic().get("test/s1/result", [])}  # noqa: E731
        wait_until(lambda: {"SPB-1", "SPB-2"} <= results(), 30, "both triggered parts' results")
        service.send_signal(signal.SIGTERM)
        assert service.wait(30) == 0
        wait_until(lambda: len(watcher.of("NDEATH")) == 2, 10, "NDEATH at the clean stop")
        watcher.check()
    finally:
        service.kill()
        service.wait(10)
        watcher.close()
        sub.close()


@pytest.mark.timeout(240)  # with the session's pack export
def test_births_wait_for_the_primary_host(broker, tmp_path, default_pack_dir, enrolled_state):
    watcher = SparkplugWatcher(broker.port)
    cfg = write_config(tmp_path, default_pack_dir, enrolled_state, broker.port, {"kind": "synthetic", "seed": 2},
                       trigger={"mode": "mqtt"}, mqtt=sparkplug(primary_host_id="scada"), explain={"enabled": False})
    rt = start(cfg)
    state = "spBv1.0/STATE/scada"
    try:
        time.sleep(2)
        assert watcher.of("NBIRTH") == []
        publish.single(state, json.dumps({"online": True, "timestamp": int(time.time() * 1000)}), qos=1,
                       retain=True, hostname="127.0.0.1", port=broker.port)
        wait_until(lambda: len(watcher.of("DBIRTH")) == 1, 10, "births once the host is online")
        publish.single(state, json.dumps({"online": False, "timestamp": int(time.time() * 1000)}), qos=1,
                       retain=True, hostname="127.0.0.1", port=broker.port)
        wait_until(lambda: len(watcher.of("NDEATH")) == 1, 10, "the session ended for the offline host")
        publish.single(state, json.dumps({"online": True, "timestamp": int(time.time() * 1000)}), qos=1,
                       retain=True, hostname="127.0.0.1", port=broker.port)
        wait_until(lambda: len(watcher.of("NBIRTH")) == 2, 15, "births in a new session")
        bds = [watcher.metric(p, "bdSeq").long_value for p in watcher.of("NBIRTH")]
        assert bds[1] == (bds[0] + 1) % 256
    finally:
        rt.stop()
        publish.single(state, b"", retain=True, hostname="127.0.0.1", port=broker.port)
    watcher.check()
    watcher.close()
