"""The inspection handshake over OPC UA (`plc.opcua:`): an asyncua server in its own thread and event loop.

Address space (namespace urn:anomaly-edge:<line>:<station>, string node ids "Station.Inspection.Trigger"...):

    Station/Status, ModelId                                  station state, read only
    Station/Inspection/Trigger, ResultAck, PartId            written by the PLC (operator users)
    Station/Inspection/TriggerAck, Busy, ResultValid, Pass, Verdict, Score, Threshold, RegionCount, Error
    Station/Inspection/BufferOverrun                         latched by the station, cleared by the PLC (false)
    Station/LastResult/...                                   the last part the station recorded, any trigger
    Station.Trigger(partId) -> (Accepted, Reason), Station.EnrollGood(partId) -> (Accepted, Reason)

The handshake (docs/plc.md has the timing diagram): the PLC writes PartId (optional) and Trigger true ->
the station accepts the part (edge.line.runtime's trigger: durable before it is acknowledged), sets TriggerAck
and Busy -> the PLC drops Trigger, the station drops TriggerAck -> the part is scored -> the station writes
the result variables, then ResultValid -> the PLC reads them and sets ResultAck -> the station clears
ResultValid -> the PLC drops ResultAck -> the next result waiting (if any) is presented. Triggers while
busy are queued up to `trigger_queue` parts; one more is refused, sets BufferOverrun and says why in
Error, so no trigger is lost without the PLC being told.

Security: channel security none, encrypted (Basic256Sha256 SignAndEncrypt, with the server's certificate)
or both; anonymous sessions only when allow_anonymous, and then read-only; users are operators (write,
call) or read_only (browse, read). Writes and calls a session may not make are refused for the whole
request (BadUserAccessDenied); writes of a wrong type are refused by the server (BadTypeMismatch); both
are logged with the node, the user and the reason.

Owns the address space and the OPC UA server. Must not decide the handshake (handshake.py does).
"""
from __future__ import annotations

import asyncio
import collections
import hmac
import json
import logging
from datetime import datetime

from asyncua import Server, ua
from asyncua.common.callback import CallbackType
from asyncua.crypto.permission_rules import USER_TYPES, PermissionRuleset, User, UserRole

from edge.line.plc import largest_region_mm
from edge.line.plc.handshake import Handshake
from edge.line.plc.served import LoopServer

log = logging.getLogger(__name__)

V = ua.VariantType
# name -> (type, initial value, written by the PLC)
INSPECTION = {
    "Trigger": (V.Boolean, False, True), "TriggerAck": (V.Boolean, False, False), "Busy": (V.Boolean, False, False),
    "ResultValid": (V.Boolean, False, False), "ResultAck": (V.Boolean, False, True),
    "Pass": (V.Boolean, False, False), "Verdict": (V.String, "", False), "Score": (V.Double, 0.0, False),
    "Threshold": (V.Double, 0.0, False), "PartId": (V.String, "", True), "RegionCount": (V.UInt32, 0, False),
    "BufferOverrun": (V.Boolean, False, True), "Error": (V.String, "", False),
}
LAST_RESULT = {
    "PartId": (V.String, ""), "Verdict": (V.String, ""), "Pass": (V.Boolean, False), "Score": (V.Double, 0.0),
    "Threshold": (V.Double, 0.0), "Severity": (V.Double, 0.0), "RegionCount": (V.UInt32, 0),
    "LargestRegionMm": (V.Double, 0.0), "Trigger": (V.String, ""), "Timestamp": (V.DateTime, None),
    "ModelId": (V.String, ""), "LatencyMs": (V.Double, 0.0), "Error": (V.String, ""),
}
POLICIES = {"none": [ua.SecurityPolicyType.NoSecurity],
            "encrypted": [ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt],
            "both": [ua.SecurityPolicyType.NoSecurity, ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt]}
_WRITE_OR_CALL = {ua.NodeId(ua.ObjectIds.WriteRequest_Encoding_DefaultBinary),
                  ua.NodeId(ua.ObjectIds.CallRequest_Encoding_DefaultBinary)}
_ALLOWED = set(map(ua.NodeId, USER_TYPES))


class StationUsers:
    """asyncua user manager: configured users by password (constant-time compare); anonymous as configured."""

    def __init__(self, spec):
        self.allow_anonymous = spec.allow_anonymous
        self.users = {u.name: (u.secret(), u.role) for u in spec.users}

    def get_user(self, iserver, username=None, password=None, certificate=None):
        if username is None:
            if self.allow_anonymous:
                return User(role=UserRole.Anonymous, name=None)
            log.warning("opcua: anonymous session refused (plc.opcua.allow_anonymous is false)")
            return None
        known = self.users.get(username)
        if known is None or not hmac.compare_digest(known[0].encode(), (password or "").encode()):
            log.warning("opcua: session for user %r refused: unknown user or wrong password", username)
            return None
        return User(role=UserRole.User if known[1] == "operator" else UserRole.Anonymous, name=username)


class StationRules(PermissionRuleset):
    """Operators write and call; read-only users and anonymous sessions browse, read and subscribe."""

    def check_validity(self, user, action_type, body):
        if action_type not in _ALLOWED:
            return False  # node management and the like: not for clients of a station
        if action_type in _WRITE_OR_CALL and (user is None or user.role != UserRole.User):
            what = "write" if action_type == ua.NodeId(ua.ObjectIds.WriteRequest_Encoding_DefaultBinary) else "call"
            log.warning("opcua: %s refused for %s: read-only access", what,
                        f"user {user.name!r}" if user is not None and user.name else "an anonymous session")
            return False
        return True


def _utc(iso: str | None) -> datetime | None:
    try:
        return datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except (AttributeError, ValueError):
        return None


class OpcUaServer(LoopServer):
    """A Sink (edge.line.plc): `start()` serves until `close()`; `on_result()` is called per recorded part."""

    name = "opcua"

    def __init__(self, runtime):
        super().__init__()
        self.runtime = runtime
        self.spec = runtime.config.plc.opcua
        c = runtime.config
        self.namespace = self.spec.namespace or f"urn:anomaly-edge:{c.station.line}:{c.station.name}"
        self.app_uri = f"urn:anomaly-edge:{c.station.line}:{c.station.name}:opcua"
        self.mm_per_pixel = c.station.mm_per_pixel
        self.endpoint = self.where = f"opc.tcp://{self.spec.host}:{self.spec.port}/anomaly-edge/"
        self.server: Server | None = None
        self.nodes: dict[str, ua.NodeId] = {}
        self.paths: dict[ua.NodeId, str] = {}
        self.handshake = Handshake(runtime, self.spec.trigger_queue, "opcua")  # event loop only
        self._next_part_id: str | None = None  # written by the PLC since the last trigger
        self.counts = collections.Counter()

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> "OpcUaServer":
        super().start()
        log.info("opcua: serving %s (namespace %s; security %s; %d user(s), anonymous %s)", self.endpoint,
                 self.namespace, self.spec.security, len(self.spec.users),
                 "read-only" if self.spec.allow_anonymous else "refused")
        return self

    async def _main(self) -> None:
        server = Server(user_manager=StationUsers(self.spec))
        await server.init()
        server.set_endpoint(self.endpoint)
        server.set_server_name(f"anomaly-edge {self.runtime.station}")
        if self.spec.certificate is not None:
            await server.load_certificate(str(self.spec.certificate))
            await server.load_private_key(str(self.spec.private_key))
        await server.set_application_uri(self.app_uri)
        server.set_security_policy(POLICIES[self.spec.security], permission_ruleset=StationRules())
        server.set_identity_tokens([ua.UserNameIdentityToken]
                                   + ([ua.AnonymousIdentityToken] if self.spec.allow_anonymous else []))
        self.server = server
        await self._build(server)
        server.subscribe_server_callback(CallbackType.PreWrite, self._before_write)
        server.subscribe_server_callback(CallbackType.PostWrite, self._after_write)
        async with server:
            self._ready.set()
            status = asyncio.ensure_future(self._status_loop())
            await self._stopping.wait()
            status.cancel()

    async def _build(self, server: Server) -> None:
        idx = await server.register_namespace(self.namespace)
        station = await server.nodes.objects.add_object(ua.NodeId("Station", idx), ua.QualifiedName("Station", idx))
        inspection = await station.add_object(ua.NodeId("Station.Inspection", idx),
                                              ua.QualifiedName("Inspection", idx))
        last = await station.add_object(ua.NodeId("Station.LastResult", idx), ua.QualifiedName("LastResult", idx))

        async def variable(parent, path: str, vtype, value, writable: bool = False):
            node = await parent.add_variable(ua.NodeId(path, idx), ua.QualifiedName(path.rsplit(".", 1)[1], idx),
                                             ua.Variant(value, vtype), varianttype=vtype)
            if writable:
                await node.set_writable()
            self.nodes[path] = node.nodeid
            self.paths[node.nodeid] = path.replace(".", "/")
            return node

        await variable(station, "Station.Status", V.String, "starting")
        await variable(station, "Station.ModelId", V.String, self.runtime.pack.model_id)
        for name, (vtype, value, writable) in INSPECTION.items():
            await variable(inspection, f"Station.Inspection.{name}", vtype, value, writable)
        for name, (vtype, value) in LAST_RESULT.items():
            await variable(last, f"Station.LastResult.{name}", vtype, value)
        part_arg = ua.Argument(Name="partId", DataType=ua.NodeId(ua.ObjectIds.String), ValueRank=-1,
                               Description=ua.LocalizedText("part id (empty: the station names the part)"))
        outputs = [ua.Argument(Name="Accepted", DataType=ua.NodeId(ua.ObjectIds.Boolean), ValueRank=-1),
                   ua.Argument(Name="Reason", DataType=ua.NodeId(ua.ObjectIds.String), ValueRank=-1)]
        # On Station, not Inspection: a method beside the Trigger variable would share its browse name.
        await station.add_method(ua.NodeId("Station.Trigger", idx),
                                 ua.QualifiedName("Trigger", idx), self._trigger_method, [part_arg], outputs)
        await station.add_method(ua.NodeId("Station.EnrollGood", idx),
                                 ua.QualifiedName("EnrollGood", idx), self._enroll_method, [part_arg], outputs)
        aspace = server.iserver.aspace
        aspace.add_datachange_callback(self.nodes["Station.Inspection.Trigger"], ua.AttributeIds.Value,
                                       self._on_trigger_written)
        aspace.add_datachange_callback(self.nodes["Station.Inspection.ResultAck"], ua.AttributeIds.Value,
                                       self._on_ack_written)

    async def _set(self, values: dict[str, object]) -> None:
        """Write station-side values in order; a bare name is a Station/Inspection variable."""
        for path, value in values.items():
            path = path if path.startswith("Station.") else f"Station.Inspection.{path}"
            vtype = (INSPECTION.get(path.rsplit(".", 1)[1]) if path.startswith("Station.Inspection.")
                     else LAST_RESULT.get(path.rsplit(".", 1)[1]) if path.startswith("Station.LastResult.")
                     else (V.String,))[0]
            await self.server.write_attribute_value(self.nodes[path], ua.DataValue(ua.Variant(value, vtype)))

    def _value(self, path: str):
        return self.server.iserver.aspace.read_attribute_value(self.nodes[path], ua.AttributeIds.Value).Value.Value

    async def _status_loop(self) -> None:
        while True:
            try:
                h = self.runtime.health()
                await self._set({"Station.Status": status_text(h)})
            except Exception:
                log.exception("opcua: status not updated")
            await asyncio.sleep(1.0)

    # -- the PLC's writes and calls ----------------------------------------------------------

    async def _before_write(self, event, dispatcher) -> None:
        """Note a part id the PLC writes (before the Trigger of the same request is acted on): it names the
        next triggered part, once. PartId also shows the presented result's id, which must not name the next."""
        if not event.is_external:
            return
        for wv in event.request_params.NodesToWrite:
            variant = wv.Value.Value if wv.Value is not None else None
            if (wv.NodeId == self.nodes["Station.Inspection.PartId"] and wv.AttributeId == ua.AttributeIds.Value
                    and variant is not None and variant.VariantType == V.String):
                self._next_part_id = variant.Value or None

    async def _after_write(self, event, dispatcher) -> None:
        """Log each refused write of a client: node, user, status."""
        if not event.is_external:
            return
        for wv, status in zip(event.request_params.NodesToWrite, event.response_params or []):
            if not status.is_good():
                self.counts["refused_writes"] += 1
                self.runtime.counts["bad_commands"] += 1
                user = event.user.name if event.user is not None and event.user.name else "anonymous"
                got = wv.Value.Value.VariantType.name if wv.Value and wv.Value.Value else "no value"
                log.warning("opcua: write of %s by %s refused: %s (value of type %s)",
                            self.paths.get(wv.NodeId, wv.NodeId.to_string()), user, status.name, got)

    async def _on_trigger_written(self, handle, value: ua.DataValue) -> None:
        high = bool(value.Value.Value)
        part_id = self._next_part_id if high and not self.handshake.trigger_high else None
        if part_id is not None:
            self._next_part_id = None  # used once
        await self._set(self.handshake.trigger_edge(high, part_id))

    async def _trigger_method(self, parent, *args) -> list[ua.Variant]:
        part_id = self._string_arg(args)
        if part_id is None:
            return self._answer(False, "Trigger(partId): partId must be one String")
        accepted, reason, outputs = self.handshake.accept(part_id, "Trigger()")
        await self._set(outputs)
        return self._answer(accepted, reason)

    async def _enroll_method(self, parent, *args) -> list[ua.Variant]:
        part_id = self._string_arg(args)
        if not part_id:
            return self._answer(False, "EnrollGood(partId): partId must be one non-empty String")
        self.runtime.command("enroll-good", json.dumps({"part_id": part_id, "by": "opcua"}).encode())
        return self._answer(True, "queued; the outcome is in the station's log and on <prefix>/reply")

    @staticmethod
    def _string_arg(args) -> str | None:
        if len(args) != 1 or not isinstance(args[0], ua.Variant) or args[0].VariantType != V.String:
            return None
        return args[0].Value or ""

    @staticmethod
    def _answer(accepted: bool, reason: str) -> list[ua.Variant]:
        return [ua.Variant(accepted, V.Boolean), ua.Variant(reason, V.String)]

    async def _on_ack_written(self, handle, value: ua.DataValue) -> None:
        await self._set(self.handshake.ack_edge(bool(value.Value.Value)))

    # -- results ------------------------------------------------------------------------------

    def on_result(self, result: dict) -> None:
        self.in_loop(lambda: self._take_result(result))

    async def _take_result(self, result: dict) -> None:
        scored = result.get("score") is not None
        await self._set({
            "Station.LastResult.PartId": result["part_id"], "Station.LastResult.Verdict": result["verdict"],
            "Station.LastResult.Pass": result["verdict"] == "normal",
            "Station.LastResult.Score": float(result["score"]) if scored else 0.0,
            "Station.LastResult.Threshold": float(result["threshold"]) if result.get("threshold") is not None else 0.0,
            "Station.LastResult.Severity": float(result.get("severity") or 0.0),
            "Station.LastResult.RegionCount": len(result.get("regions") or []),
            "Station.LastResult.LargestRegionMm": largest_region_mm(result, self.mm_per_pixel) or 0.0,
            "Station.LastResult.Trigger": result.get("trigger") or "",
            "Station.LastResult.Timestamp": _utc(result.get("timestamp")),
            "Station.LastResult.ModelId": result.get("model_id") or "",
            "Station.LastResult.LatencyMs": float((result.get("latency_ms") or {}).get("capture_to_publish", 0.0)),
            "Station.LastResult.Error": result.get("error", ""),
        })
        await self._set(self.handshake.result(result))


def status_text(h: dict) -> str:
    """Station/Status from the health: its state, the source's, and learn mode's or refinement's progress."""
    text = f"{h['state']}; source {h['source']['state']}"
    for key in ("learning", "refining"):
        if h.get(key):
            text += f"; {key} {h[key]['collected']}/{h[key]['of']}"
    return text
