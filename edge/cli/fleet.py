"""The fleet view: every station's retained `P/status` (and the bridge's `P/bridge`, docs/fleet.md) read
from one broker, one line per station (`anomaly-edge fleet`). Owns the reduction of a health payload to a
row and the table; it only reads the broker, never publishes."""
from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timezone

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge.errors import EdgeError

COLUMNS = (("station", 28), ("state", 12), ("model", 30), ("parts/h", 8), ("flagged", 8), ("outbox", 7),
           ("explain", 8), ("age_s", 6))


class FleetError(EdgeError):
    """The broker cannot be reached or refused the fleet view."""


def station_row(prefix: str, status: dict | None, bridge: str | None, now: float, stale_s: float) -> dict:
    """One station's line from its retained health (edge/line/runtime.py health()) and bridge presence."""
    status = status if isinstance(status, dict) else {}
    state = str(status.get("state", "unknown"))
    age_s = None
    if status.get("time"):
        try:
            age_s = now - datetime.fromisoformat(str(status["time"]).replace("Z", "+00:00")).timestamp()
        except ValueError:
            age_s = None
    if bridge == "0":
        state = "unreachable"  # the station's box or its network is gone; its status is its last word
    elif state == "online" and age_s is not None and age_s > stale_s:
        state = "stale"
    counts = status.get("counts") or {}
    parts, flagged = counts.get("parts"), counts.get("flagged")
    scored = (status.get("fps") or {}).get("scored")
    broker = status.get("broker") or {}
    explain = status.get("explain") or {}
    return {"station": prefix, "state": state, "model": status.get("model_id"),
            "parts/h": None if scored is None else round(float(scored) * 3600),
            "flagged": None if not parts else round(flagged / parts, 4),
            "outbox": broker.get("outbox_size"),
            "explain": explain.get("pending") if "pending" in explain else explain.get("state"),
            "age_s": None if age_s is None else round(max(age_s, 0.0), 1)}


def render(rows: list[dict]) -> str:
    def cell(key, value):
        if value is None:
            return "-"
        if key == "flagged":
            return f"{100 * value:.1f}%"
        return str(value)

    head = " ".join(name.ljust(width) for name, width in COLUMNS).rstrip()
    lines = [head] + [" ".join(cell(name, row[name]).ljust(width) for name, width in COLUMNS).rstrip()
                      for row in rows]
    return "\n".join(lines) + "\n"


class FleetView:
    """Subscribes to `<prefix>/status` and `<prefix>/bridge` for a prefix pattern such as
    `anomaly-edge/+/+` and keeps the latest of each per station."""

    def __init__(self, host: str, port: int = 1883, prefix: str = "anomaly-edge/+/+", username: str | None = None,
                 password: str | None = None, stale_s: float = 60.0):
        self.prefix, self.stale_s = prefix.rstrip("/"), stale_s
        self.host, self.port = host, port
        self._status: dict[str, dict] = {}
        self._bridge: dict[str, str] = {}
        self._lock = threading.Lock()
        self.last_message = time.monotonic()
        self._subscribed = threading.Event()
        self._refused: str | None = None
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"anomaly-edge-fleet-{time.time_ns()}",
                                   protocol=mqtt.MQTTv311)
        if username is not None:
            self._client.username_pw_set(username, password)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = lambda *a: self._subscribed.set()
        self._client.on_message = self._on_message

    def start(self, timeout: float = 10.0) -> "FleetView":
        try:
            self._client.connect(self.host, self.port, keepalive=30)
        except OSError as e:
            raise FleetError(f"cannot reach the broker {self.host}:{self.port}: {e}") from e
        self._client.loop_start()
        if not self._subscribed.wait(timeout):
            self.close()
            raise FleetError(f"broker {self.host}:{self.port} did not accept the subscription to "
                             f"{self.prefix}/status within {timeout:g}s" + (f": {self._refused}" if self._refused else ""))
        return self

    def settle(self, quiet_s: float = 0.5, limit_s: float = 5.0) -> None:
        """Wait until the retained messages have arrived: `quiet_s` without a new one, at most `limit_s`."""
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline and time.monotonic() - self.last_message < quiet_s:
            time.sleep(0.05)

    def rows(self) -> list[dict]:
        now = time.time()
        with self._lock:
            stations = sorted(set(self._status) | set(self._bridge))
            return [station_row(s, self._status.get(s), self._bridge.get(s), now, self.stale_s) for s in stations]

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._refused = str(reason_code)
            return
        client.subscribe([(f"{self.prefix}/status", 1), (f"{self.prefix}/bridge", 1)])

    def _on_message(self, client, userdata, message) -> None:
        station, _, kind = message.topic.rpartition("/")
        self.last_message = time.monotonic()
        with self._lock:
            if not message.payload:  # a cleared retained message: the station was removed
                self._status.pop(station, None) if kind == "status" else self._bridge.pop(station, None)
                return
            if kind == "bridge":
                self._bridge[station] = message.payload.decode("utf-8", "replace").strip()
                return
            try:
                payload = json.loads(message.payload)
            except ValueError:
                payload = {"state": "unreadable"}
            payload = payload if isinstance(payload, dict) else {"state": "unreadable"}
            if payload.get("state") == "offline" and station in self._status:
                payload = {**self._status[station], **payload}  # keep what it last said (model, counts, time)
            self._status[station] = payload


def run_fleet(host: str, port: int, prefix: str, once: bool, interval_s: float, as_json: bool,
              username: str | None = None, password: str | None = None, stale_s: float = 60.0,
              out=None) -> int:
    import sys

    out = out or sys.stdout
    view = FleetView(host, port, prefix, username, password, stale_s).start()
    try:
        view.settle()
        while True:
            rows = view.rows()
            text = json.dumps(rows) + "\n" if as_json else render(rows)
            if once:
                out.write(text)
                out.flush()
                return 0
            if out.isatty():
                out.write("\x1b[H\x1b[2J")
            out.write(f"{host}:{port} {prefix}  {datetime.now(timezone.utc).strftime('%H:%M:%S')} UTC\n{text}")
            out.flush()
            time.sleep(interval_s)
    finally:
        view.close()
