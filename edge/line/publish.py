"""Store-and-forward MQTT publishing: `publish()` writes to the durable `Outbox`, a sender thread
drains it to the broker one message at a time and deletes a row only after the broker's PUBACK.

Delivery is at least once and in `put` order: a message is not sent before the previous one is
acknowledged, and one in flight when the link drops is retransmitted by paho on reconnect (or
replayed from the outbox after a process restart), so subscribers de-duplicate by `message_id`.
The station's presence is `<prefix>/status`, retained: online on every connect (the full status when
the station passes `online_status`), "offline" from the Last Will on an unclean drop and published
explicitly on `close()`.

With `persistent_session` (a stable client id, MQTT 3.1.1 clean_session false) the broker keeps our
subscriptions and queues the QoS 1 messages (commands) sent to them while we are away; they arrive
at the next connect. How long it keeps a session is the broker's setting (Mosquitto:
`persistent_client_expiration`, unset: for ever).
"""
from __future__ import annotations

import json
import logging
import socket
import ssl
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge.errors import EdgeError
from edge.line.outbox import Message, Outbox

log = logging.getLogger(__name__)

ONLINE = json.dumps({"state": "online"})
OFFLINE = json.dumps({"state": "offline"})


class PublisherError(EdgeError):
    """The publisher is misconfigured or used after `close()`."""


def tls_context(ca: str | Path, cert: str | Path | None = None, key: str | Path | None = None) -> ssl.SSLContext:
    """The client TLS context for mqtt.tls (server certificate and host name verified); a CA, certificate
    or key file that cannot be used raises PublisherError naming the file."""
    try:
        context = ssl.create_default_context(cafile=str(ca))
    except (ssl.SSLError, OSError, ValueError) as e:
        raise PublisherError(f"mqtt.tls.ca {ca}: not a usable CA certificate file (PEM expected): {e}") from None
    if cert or key:
        if not (cert and key):
            raise PublisherError("mqtt.tls: give both cert and key (the client certificate and its private key)")
        try:
            context.load_cert_chain(str(cert), str(key))
        except (ssl.SSLError, OSError, ValueError) as e:
            raise PublisherError(f"mqtt.tls.cert {cert} / mqtt.tls.key {key}: not a usable client certificate "
                                 f"and key (PEM expected, the key must match): {e}") from None
    return context


class MqttPublisher:
    """Publishes outbox messages to an MQTT broker in order, surviving broker and process restarts."""

    def __init__(
        self,
        outbox: Outbox | str | Path,
        host: str = "localhost",
        port: int = 1883,
        topic_prefix: str = "anomaly-edge",
        client_id: str | None = None,
        username: str | None = None,
        password: str | None = None,
        tls_ca: str | Path | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        keepalive: int = 30,
        reconnect_min_delay: int = 1,
        reconnect_max_delay: int = 30,
        persistent_session: bool = False,
        connect: bool = True,
        online_status=None,
    ):
        """`connect=False` leaves connecting to `connect()`, so handlers can be subscribed first (a
        persistent session delivers what waited right after the connection is accepted).
        `online_status`: a callable giving the station's full status (a dict), published retained on
        `<prefix>/status` at every connect so the first status a subscriber sees is complete; without
        it, {"state": "online"}."""
        self._owns_outbox = not isinstance(outbox, Outbox)
        self.outbox = Outbox(outbox) if self._owns_outbox else outbox
        self.topic_prefix = topic_prefix.rstrip("/")
        if not self.topic_prefix:
            raise PublisherError("topic_prefix must not be empty (status goes to '<prefix>/status')")
        self.status_topic = f"{self.topic_prefix}/status"
        self.host, self.port = host, port
        self._online_status = online_status

        self._connected = threading.Event()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._closing = False
        self._ack_cond = threading.Condition()
        self._acked_mids: set[int] = set()
        self._sent = 0
        self.last_error: str | None = None  # why the broker refused us, until we are in again
        self._subscriptions: dict[str, int] = {}  # full topic -> qos, (re)subscribed on every connect

        if persistent_session and not client_id:
            raise PublisherError("a persistent MQTT session needs a stable client_id (the broker keeps the "
                                 "session under it)")
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"anomaly-edge-{uuid.uuid4().hex[:12]}",
            clean_session=not persistent_session,
            protocol=mqtt.MQTTv311,
        )
        if username is not None:
            client.username_pw_set(username, password)
        self._tls: ssl.SSLContext | None = None
        if tls_ca is not None:
            self._tls = tls_context(tls_ca, tls_cert, tls_key)
            client.tls_set_context(self._tls)
        elif tls_cert or tls_key:
            raise PublisherError("tls_cert/tls_key given without tls_ca; pass the CA file to enable TLS")
        client.will_set(self.status_topic, OFFLINE, qos=1, retain=True)
        client.reconnect_delay_set(reconnect_min_delay, reconnect_max_delay)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = self._on_connect_fail
        client.on_publish = self._on_publish
        self._client = client
        self._keepalive = keepalive
        self._sender = threading.Thread(target=self._send_loop, name="mqtt-outbox-sender", daemon=True)
        if connect:
            self.connect()

    def connect(self) -> None:
        """Start connecting (in the background, retried while the broker is down) and sending."""
        if self._sender.is_alive():
            return
        # connect_async + loop_start keeps retrying when the broker is down at start.
        self._client.connect_async(self.host, self.port, self._keepalive)
        self._client.loop_start()
        self._sender.start()

    # -- public API ---------------------------------------------------------------------------

    def publish(self, topic_suffix: str, payload: bytes | str | dict, qos: int = 1, retain: bool = False,
                message_id: str | None = None) -> str:
        """Queue a message for `<prefix>/<topic_suffix>`; returns its message id without touching the network."""
        if self._closing:
            raise PublisherError(f"publisher for {self.host}:{self.port} is closed; cannot publish to {topic_suffix!r}")
        message_id = self.outbox.put(f"{self.topic_prefix}/{topic_suffix.lstrip('/')}", payload, qos, retain,
                                     message_id)
        self._wake.set()
        return message_id

    def publish_now(self, topic_suffix: str, payload: bytes | str | dict, retain: bool = False) -> bool:
        """Publish without storing (for state that a newer message supersedes, such as health);
        False when not connected."""
        if self._closing or not self._connected.is_set():
            return False
        body = json.dumps(payload) if isinstance(payload, dict) else payload
        self._client.publish(f"{self.topic_prefix}/{topic_suffix.lstrip('/')}", body, qos=1, retain=retain)
        return True

    def subscribe(self, topic_suffix: str, handler, qos: int = 1) -> str:
        """Call `handler(topic, payload_bytes, retained)` (on the network thread) for messages on
        `<prefix>/<topic_suffix>`; kept across reconnects. `retained` is the MQTT retain flag: true for a
        message the broker kept and delivers because we (re)subscribed, not one sent just now."""
        topic = f"{self.topic_prefix}/{topic_suffix.lstrip('/')}"

        def on_message(client, userdata, message):
            try:
                handler(message.topic, message.payload, bool(message.retain))
            except Exception:  # a bad handler must not kill paho's network loop
                log.exception("handler for %s failed", message.topic)

        self._client.message_callback_add(topic, on_message)
        self._subscriptions[topic] = qos
        if self._connected.is_set():
            self._client.subscribe(topic, qos)
        return topic

    def stats(self) -> dict:
        """connected, outbox_size (messages waiting), sent (acknowledged since start), last_error."""
        return {"connected": self._connected.is_set(), "outbox_size": self.outbox.size(), "sent": self._sent,
                "last_error": self.last_error}

    def close(self, flush_timeout: float = 5.0) -> None:
        """Send what can be sent within `flush_timeout`, announce "offline", disconnect, stop threads."""
        if self._closing:
            return
        self._closing = True
        deadline = time.monotonic() + flush_timeout
        # Also while (re)connecting: the broker may be back and paho between two reconnect attempts.
        while self.outbox.size() > 0 and time.monotonic() < deadline:
            self._wake.set()
            time.sleep(0.02)
        self._stop.set()
        if self._sender.is_alive():
            self._sender.join(timeout=2.0)
        if self._connected.is_set():
            # A clean disconnect suppresses the Last Will, so say "offline" ourselves.
            info = self._client.publish(self.status_topic, OFFLINE, qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=2.0)
            except (RuntimeError, ValueError):
                pass
        self._client.disconnect()
        self._client.loop_stop()
        if self._owns_outbox:
            self.outbox.close()

    def __enter__(self) -> "MqttPublisher":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- paho callbacks (network thread) ------------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            if str(reason_code) != self.last_error:
                log.warning("MQTT broker %s:%s refused the connection: %s", self.host, self.port, reason_code)
            self.last_error = str(reason_code)
            return
        self.last_error = None
        online = self._online_payload()
        if online is not None:
            client.publish(self.status_topic, online, qos=1, retain=True)
        for topic, qos in list(self._subscriptions.items()):
            client.subscribe(topic, qos)
        self._connected.set()
        self._wake.set()

    def _on_connect_fail(self, client, userdata) -> None:
        """paho does not say why a connection failed: try once ourselves, so a TLS failure (unknown CA,
        host name mismatch, a plain port) is logged and in `last_error`, not only retried."""
        error = self._diagnose()
        if error != self.last_error:
            log.warning("cannot connect to the MQTT broker %s:%s: %s", self.host, self.port, error)
        self.last_error = error

    def _diagnose(self) -> str:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=3)
        except OSError as e:
            return f"{type(e).__name__}: {e}"
        with sock:
            if self._tls is None:
                return "connection failed (the broker accepted TCP, then the MQTT connect failed)"
            try:
                with self._tls.wrap_socket(sock, server_hostname=self.host):
                    return "connection failed (TCP and the TLS handshake succeed)"
            except ssl.SSLCertVerificationError as e:
                return f"TLS: the broker's certificate is refused: {e.verify_message} ({e.reason})"
            except (ssl.SSLError, OSError) as e:  # a plain listener resets or answers what is not TLS
                reason = getattr(e, "reason", None) or f"{type(e).__name__}: {e}"
                return (f"TLS handshake failed: {reason} (is {self.host}:{self.port} a TLS listener, of a "
                        "protocol version this client speaks?)")

    def _online_payload(self) -> str | None:
        """The retained status at connect; None when the station's status cannot be built yet (still
        starting: its health loop publishes the full status as soon as it runs)."""
        if self._online_status is None:
            return ONLINE
        try:
            return json.dumps({**self._online_status(), "state": "online"})
        except Exception as e:
            log.debug("status at connect not ready (%s): the health loop publishes it", e)
            return None

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if self._connected.is_set() and not self._closing:
            log.warning("lost the MQTT broker %s:%s (%s); messages wait in the outbox", self.host, self.port,
                        reason_code)
        self._connected.clear()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._ack_cond:
            self._acked_mids.add(mid)
            self._ack_cond.notify_all()

    # -- sender thread ------------------------------------------------------------------------

    def _send_loop(self) -> None:
        while not self._stop.is_set():
            if not self._connected.wait(0.2):
                continue
            self._wake.clear()
            try:
                batch = self.outbox.pending(100)
            except Exception:
                log.exception("cannot read outbox %s", self.outbox.path)
                self._stop.wait(1.0)
                continue
            if not batch:
                self._wake.wait(0.5)
                continue
            try:
                for message in batch:
                    if self._stop.is_set() or not self._send_one(message):
                        break
            except Exception:  # keep draining: a dead sender would silently stall the line's output
                log.exception("outbox sender for %s:%s failed; retrying", self.host, self.port)
                self._stop.wait(1.0)

    def _send_one(self, message: Message) -> bool:
        """Publish one message and wait for its acknowledgement; False when it was not (yet) sent."""
        with self._ack_cond:
            self._acked_mids.clear()  # only one outbox message is ever in flight
        info = self._client.publish(message.topic, message.payload, qos=message.qos, retain=message.retain)
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            return False
        if info.rc == mqtt.MQTT_ERR_NO_CONN and message.qos == 0:
            return False  # QoS 0 is not queued by paho; resend from the outbox after reconnect
        # QoS 1/2 stay in paho's in-flight store and are retransmitted on reconnect, so just wait.
        with self._ack_cond:
            while info.mid not in self._acked_mids:
                if self._stop.is_set():
                    return False
                self._ack_cond.wait(0.2)
            self._acked_mids.discard(info.mid)
        self.outbox.mark_sent(message.message_id)
        self._sent += 1
        return True
