"""The station as a Sparkplug B 3.0 Edge Node (`mqtt.sparkplug:`), its camera as a Device.

    spBv1.0/<group>/NBIRTH/<edge>            node metrics (bdSeq, Node Control/*), seq 0
    spBv1.0/<group>/DBIRTH/<edge>/<device>   every device metric, with name, alias, datatype, value
    spBv1.0/<group>/DDATA/<edge>/<device>    the metrics that changed (alias only), per part and health tick
    spBv1.0/<group>/DDEATH/<edge>/<device>   at a clean stop
    spBv1.0/<group>/NDEATH/<edge>            the MQTT Will (QoS 1, not retained) and at a clean stop
    spBv1.0/<group>/NCMD/<edge>              Node Control/Rebirth, Node Control/Reload
    spBv1.0/<group>/DCMD/<edge>/<device>     Command/Trigger, Command/Enroll Good (a part id each)

bdSeq counts MQTT sessions 0..255: the value a session's Will carries is the one its NBIRTH carries, and
the next value is on disk (<storage.dir>/sparkplug-bdseq) before the session connects, so a station that
is killed and restarted never reuses one. seq counts every message but NDEATH, 0..255 wrapping, and
restarts at 0 with each NBIRTH. Births and data are QoS 0 as the specification says: the durable record
of each part stays the JSON `result` topic (outbox-backed) and the store; a SCADA that reconnects gets
the current values from a rebirth (NCMD Node Control/Rebirth). Commands are carried out by the JSON
command handling (Runtime.command), so a trigger means the same over either topic family.

Owns the Edge Node's session (births, deaths, bdSeq/seq, commands in). Must not carry out commands
itself or touch the runtime beyond its config, pack, health(), counts and command(); the metrics and
their encoding are edge.line.plc.sparkplug_metrics.
"""
from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
from google.protobuf.message import DecodeError
from paho.mqtt.enums import CallbackAPIVersion

from edge.line.config import mqtt_password
from edge.line.plc import largest_region_mm
from edge.line.plc.sparkplug_metrics import DEVICE_METRICS, NODE_METRICS, BdSeqFile, add_metric, ms_of, now_ms
from edge.line.plc.sparkplug_schema import DATA_TYPES, VALUE_FIELD, Payload

log = logging.getLogger(__name__)

NAMESPACE = "spBv1.0"


class CommandRefused(Exception):
    pass


class SparkplugNode:
    """A Sink (edge.line.plc): `start()`, then `on_result()` per part; `close()` sends DDEATH and NDEATH."""

    name = "sparkplug"

    def __init__(self, runtime):
        self.runtime = runtime
        c = runtime.config
        spec = c.mqtt.sparkplug
        self.spec = spec
        self.group, self.edge = spec.group_id, spec.edge_node_id or c.station.name
        self.device = spec.device_id
        base = f"{NAMESPACE}/{self.group}"
        self.topics = {kind: f"{base}/{kind}/{self.edge}" for kind in ("NBIRTH", "NDEATH", "NCMD")}
        self.topics |= {kind: f"{base}/{kind}/{self.edge}/{self.device}" for kind in ("DBIRTH", "DDEATH", "DDATA",
                                                                                       "DCMD")}
        self.state_topic = f"{NAMESPACE}/STATE/{spec.primary_host_id}" if spec.primary_host_id else None
        self.mm_per_pixel = c.station.mm_per_pixel
        self.bdseq_file = BdSeqFile(Path(c.storage.dir) / "sparkplug-bdseq")
        self.by_name = {m.name: m for m in NODE_METRICS + DEVICE_METRICS}
        self.by_alias = {m.alias: m for m in NODE_METRICS + DEVICE_METRICS}
        self.values: dict[str, object] = {m.name: None for m in DEVICE_METRICS}
        self.values |= {"Model/Id": runtime.pack.model_id, "Command/Trigger": "", "Command/Enroll Good": ""}
        self.stamps: dict[str, int] = {name: now_ms() for name in self.values}
        self._sent: dict[str, object] = {}   # what the SCADA holds: the last value born or sent per metric
        self._lock = threading.RLock()       # seq and the metric values, across the network, output, health threads
        self._seq = 0
        self._born = False
        self._host_online = self.state_topic is None
        self._host_stamp = -1
        self._closing = False
        self._ending_session = False
        self._stop = threading.Event()
        self.bdseq = -1
        self.counts = {"births": 0, "ddata": 0, "refused": 0, "commands": 0}

        client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311,
                             client_id=spec.client_id or f"anomaly-edge-spb-{self.group}-{self.edge}")
        m = c.mqtt
        if m.username is not None:
            client.username_pw_set(m.username, mqtt_password(c))
        if m.tls is not None:
            client.tls_set(ca_certs=str(m.tls.ca), certfile=str(m.tls.cert) if m.tls.cert else None,
                           keyfile=str(m.tls.key) if m.tls.key else None)
        client.reconnect_delay_set(1, 10)
        client.max_queued_messages_set(10000)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.message_callback_add(self.topics["NCMD"], self._on_command_message)
        client.message_callback_add(self.topics["DCMD"], self._on_command_message)
        if self.state_topic:
            client.message_callback_add(self.state_topic, self._on_host_state)
        self.client = client
        self._health_thread = threading.Thread(target=self._health_loop, name="sparkplug-health", daemon=True)

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> "SparkplugNode":
        self._arm_will()
        m = self.runtime.config.mqtt
        self.client.connect_async(m.host, m.port, m.keepalive)
        self.client.loop_start()
        self._health_thread.start()
        log.info("sparkplug: edge node %s/%s, device %s, on %s:%s%s", self.group, self.edge, self.device, m.host,
                 m.port, f", births after {self.state_topic} is online" if self.state_topic else "")
        return self

    def close(self) -> None:
        """A clean stop: DDEATH, then NDEATH (a clean MQTT disconnect does not send the Will)."""
        self._closing = True
        self._stop.set()
        with self._lock:
            if self.client.is_connected():
                if self._born:
                    self._publish("DDEATH", self._payload([], seq=True))
                self._send_ndeath()
            self._born = False
        self.client.disconnect()
        self.client.loop_stop()
        self._health_thread.join(timeout=2.0)

    def _arm_will(self) -> None:
        """A new session: the next bdSeq, registered in the Will before the connection is made."""
        self.bdseq = self.bdseq_file.take()
        self.client.will_set(self.topics["NDEATH"], self._ndeath().SerializeToString(), qos=1, retain=False)

    def _send_ndeath(self) -> None:
        """NDEATH ourselves (a clean disconnect does not send the Will), waited for up to 2 s."""
        info = self.client.publish(self.topics["NDEATH"], self._ndeath().SerializeToString(), qos=1)
        try:
            info.wait_for_publish(timeout=2.0)
        except (RuntimeError, ValueError):
            pass

    def _ndeath(self) -> Payload:
        payload = Payload(timestamp=now_ms())
        payload.metrics.add(name="bdSeq", timestamp=payload.timestamp, datatype=DATA_TYPES["Int64"],
                            long_value=self.bdseq)
        return payload

    # -- paho callbacks (network thread) ------------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("sparkplug: broker refused the connection: %s", reason_code)
            return
        client.subscribe([(self.topics["NCMD"], 1), (self.topics["DCMD"], 1)]
                         + ([(self.state_topic, 1)] if self.state_topic else []))
        if self._host_online:
            self.rebirth()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        with self._lock:
            was_born, self._born = self._born, False
        if self._closing or self._ending_session:
            return  # _new_session arms the next Will itself
        if was_born:
            log.warning("sparkplug: lost the broker (%s); reconnecting with a new bdSeq", reason_code)
        self._arm_will()  # paho reconnects by itself, with the Will as it is now

    def _on_host_state(self, client, userdata, message) -> None:
        try:
            state = json.loads(message.payload)
            online, stamp = bool(state["online"]), int(state.get("timestamp", 0))
        except (ValueError, KeyError, TypeError) as e:
            log.warning("sparkplug: %s: not a Sparkplug 3.0 STATE message (%s); ignored", message.topic, e)
            return
        if stamp < self._host_stamp:
            return  # an older STATE than one already seen (a retained copy arriving late)
        self._host_stamp = stamp
        was, self._host_online = self._host_online, online
        if online and not was:
            log.info("sparkplug: primary host %s online: births", self.spec.primary_host_id)
            self.rebirth()
        elif not online and was:
            log.warning("sparkplug: primary host %s offline: ending the session, waiting for it",
                        self.spec.primary_host_id)
            threading.Thread(target=self._new_session, name="sparkplug-session", daemon=True).start()

    def _new_session(self) -> None:
        self._ending_session = True
        with self._lock:
            self._born = False
        self._send_ndeath()
        self.client.disconnect()
        self.client.loop_stop()
        self._ending_session = False
        if self._closing:
            return
        self._arm_will()
        m = self.runtime.config.mqtt
        self.client.connect_async(m.host, m.port, m.keepalive)
        self.client.loop_start()

    # -- births and data ----------------------------------------------------------------------

    def _payload(self, metrics: list, seq: bool) -> Payload:
        payload = Payload(timestamp=now_ms())
        if seq:
            payload.seq = self._seq
            self._seq = (self._seq + 1) % 256
        for spec, value, stamp, birth in metrics:
            add_metric(payload, spec, value, stamp, birth)
        return payload

    def _publish(self, kind: str, payload: Payload) -> None:
        self.client.publish(self.topics[kind], payload.SerializeToString(), qos=0, retain=False)

    def rebirth(self) -> None:
        """NBIRTH (seq 0, this session's bdSeq) and DBIRTH with every device metric's current value."""
        with self._lock:
            if not self.client.is_connected() or not self._host_online:
                return
            self._seq = 0
            t = now_ms()
            node = [(NODE_METRICS[0], self.bdseq, t, True)] + [(m, False, t, True) for m in NODE_METRICS[1:]]
            self._publish("NBIRTH", self._payload(node, seq=True))
            device = [(m, self.values[m.name], self.stamps[m.name], True) for m in DEVICE_METRICS]
            self._publish("DBIRTH", self._payload(device, seq=True))
            self._sent = dict(self.values)
            self._born = True
            self.counts["births"] += 1

    def _update(self, values: dict, stamp: int) -> None:
        """Take new values; send a DDATA with those that differ from what the SCADA holds."""
        with self._lock:
            for name, value in values.items():
                if value != self.values[name] or type(value) is not type(self.values[name]):
                    self.values[name] = value
                    self.stamps[name] = stamp
            if not self._born:
                return  # the next DBIRTH carries them
            changed = [m for m in DEVICE_METRICS if self.values[m.name] != self._sent.get(m.name)
                       or type(self.values[m.name]) is not type(self._sent.get(m.name))]
            if not changed:
                return
            self._publish("DDATA", self._payload([(m, self.values[m.name], self.stamps[m.name], False)
                                                  for m in changed], seq=True))
            for m in changed:
                self._sent[m.name] = self.values[m.name]
            self.counts["ddata"] += 1

    def on_result(self, result: dict) -> None:
        latency = result.get("latency_ms") or {}
        scored = result.get("score") is not None
        self._update({
            "Inspection/Part Id": result["part_id"],
            "Inspection/Verdict": result["verdict"],
            "Inspection/Pass": result["verdict"] == "normal",
            "Inspection/Score": float(result["score"]) if scored else None,
            "Inspection/Threshold": float(result["threshold"]) if result.get("threshold") is not None else None,
            "Inspection/Severity": float(result["severity"]) if result.get("severity") is not None else None,
            "Inspection/Region Count": len(result.get("regions") or []),
            "Inspection/Largest Region mm": largest_region_mm(result, self.mm_per_pixel),
            "Inspection/Trigger": result.get("trigger"),
            "Inspection/Error": result.get("error", ""),
            "Model/Id": result.get("model_id"),
            "Latency/Score ms": float(latency["score"]) if "score" in latency else None,
            "Latency/Capture To Publish ms": (float(latency["capture_to_publish"])
                                              if "capture_to_publish" in latency else None),
        }, ms_of(result.get("timestamp")))

    def _health_values(self) -> dict:
        h = self.runtime.health()
        counts = h["counts"]
        return {"Health/Parts": counts["parts"], "Health/Flagged": counts["flagged"], "Health/Errors": counts["errors"],
                "Health/Dropped Frames": counts["dropped_frames"], "Health/Bad Frames": counts["bad_frames"],
                "Health/Bad Commands": counts["bad_commands"], "Health/Source Reconnects": counts["reconnects"],
                "Source/Name": h["source"]["name"], "Source/State": h["source"]["state"]}

    def _health_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._update(self._health_values(), now_ms())
            except Exception:
                log.exception("sparkplug: health metrics not sent")
            self._stop.wait(self.spec.health_interval_s)

    # -- commands -----------------------------------------------------------------------------

    def _on_command_message(self, client, userdata, message) -> None:
        kind = "NCMD" if message.topic == self.topics["NCMD"] else "DCMD"
        try:
            actions = self._parse_command(kind, message.payload)
        except CommandRefused as e:
            self.counts["refused"] += 1
            self.runtime.counts["bad_commands"] += 1
            log.warning("sparkplug: %s on %s refused: %s", kind, message.topic, e)
            return
        for command, value in actions:
            self.counts["commands"] += 1
            if command == "rebirth":
                if value:
                    log.info("sparkplug: rebirth requested")
                    self.rebirth()
            elif command == "reload":
                if value:
                    self.runtime.command("reload", b"{}")
            elif command == "trigger":
                self.runtime.command("trigger", json.dumps({"part_id": value}).encode())
            elif command == "enroll-good":
                self.runtime.command("enroll-good", json.dumps({"part_id": value, "by": "sparkplug"}).encode())

    def _parse_command(self, kind: str, raw: bytes) -> list[tuple[str, object]]:
        """Every metric of the message checked before any is acted on: (command, value) pairs."""
        try:
            payload = Payload.FromString(raw)
        except DecodeError as e:
            raise CommandRefused(f"payload of {len(raw)} bytes is not a Sparkplug B protobuf ({e})") from None
        if not payload.metrics:
            raise CommandRefused("no metrics in the payload")
        writable = [m for m in (NODE_METRICS if kind == "NCMD" else DEVICE_METRICS) if m.command]
        actions = []
        for metric in payload.metrics:
            spec = self.by_name.get(metric.name) if metric.name else self.by_alias.get(metric.alias)
            label = repr(metric.name) if metric.name else f"alias {metric.alias}"
            if spec is None or spec not in writable:
                raise CommandRefused(f"{'unknown' if spec is None else 'read-only'} metric {label}; {kind} writes "
                                     + ", ".join(m.name for m in writable))
            field = metric.WhichOneof("value")
            if field != VALUE_FIELD[spec.datatype]:
                raise CommandRefused(f"metric {spec.name!r} takes a {spec.datatype} ({VALUE_FIELD[spec.datatype]}), "
                                     f"got {field or 'no value'}")
            actions.append((spec.command, getattr(metric, field)))
        return actions
