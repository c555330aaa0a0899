"""Configuration sections for the plant protocols: `mqtt.sparkplug:` and `plc.opcua:` (edge.line.config uses them).

    mqtt:
      sparkplug: {enabled: true, group_id: line-1, edge_node_id: station-1, device_id: camera,
                  primary_host_id: scada}        # optional: wait for spBv1.0/STATE/scada online
    plc:
      opcua:
        enabled: true
        port: 4840
        users: [{name: plc, password_file: /etc/anomaly-edge/opcua-plc.pw, role: operator},
                {name: hmi, password_file: /etc/anomaly-edge/opcua-hmi.pw, role: read_only}]
      modbus: {enabled: true, port: 5020}        # the same handshake on holding registers

Owns these sections' keys and checks. Must not start any protocol.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

# Sparkplug ids are topic levels: no '/', '+', '#'; the station's name rule keeps them safe.
SPARKPLUG_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SparkplugSpec(_Strict):
    enabled: bool = False
    group_id: str = Field(default="anomaly-edge", pattern=SPARKPLUG_ID)
    edge_node_id: str | None = Field(default=None, pattern=SPARKPLUG_ID)  # default: station.name
    device_id: str = Field(default="camera", pattern=SPARKPLUG_ID)
    # Wait for this primary host application's spBv1.0/STATE/<id> "online" before the births, and end
    # the session (NDEATH, reconnect, wait again) when it says offline.
    primary_host_id: str | None = Field(default=None, pattern=SPARKPLUG_ID)
    client_id: str | None = None  # default anomaly-edge-spb-<group>-<edge node>
    health_interval_s: float = Field(default=1.0, gt=0, le=3600)  # how often health metrics are compared


class OpcUaUser(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
    password: str | None = Field(default=None, min_length=1)
    password_file: Path | None = None
    # operator: trigger, acknowledge, enroll; read_only: browse and read.
    role: Literal["operator", "read_only"] = "read_only"

    @model_validator(mode="after")
    def _one_password(self):
        if (self.password is None) == (self.password_file is None):
            raise ValueError(f"user {self.name}: give password or password_file (one of them)")
        return self

    def secret(self) -> str:
        return Path(self.password_file).read_text().strip() if self.password_file else self.password


class OpcUaSpec(_Strict):
    enabled: bool = False
    host: str = "127.0.0.1"
    port: StrictInt = Field(default=4840, ge=1, le=65535)
    # Anonymous sessions are refused unless this is true; even then they browse and read only.
    allow_anonymous: bool = False
    users: list[OpcUaUser] = []
    # Parts triggered and not yet acknowledged (ResultAck) at most; one more sets BufferOverrun.
    trigger_queue: int = Field(default=4, ge=1, le=256)
    namespace: str | None = None  # default urn:anomaly-edge:<line>:<station>
    # none: no channel security (passwords in clear); encrypted: Basic256Sha256 SignAndEncrypt only;
    # both: either. encrypted and both need the server's certificate (DER or PEM) and private key (PEM),
    # made for the application URI urn:anomaly-edge:<line>:<station>:opcua.
    security: Literal["none", "encrypted", "both"] = "none"
    certificate: Path | None = None
    private_key: Path | None = None

    @model_validator(mode="after")
    def _someone_can_connect(self):
        if self.enabled and not self.users and not self.allow_anonymous:
            raise ValueError("enabled with no users and allow_anonymous false: no client could connect; "
                             "add users: [{name, password_file, role: operator}]")
        if self.security != "none" and (self.certificate is None or self.private_key is None):
            raise ValueError(f"security {self.security} needs certificate and private_key (the server's)")
        names = [u.name for u in self.users]
        if len(set(names)) != len(names):
            raise ValueError(f"users: a name is given twice ({', '.join(sorted(names))})")
        return self


class ModbusSpec(_Strict):
    # Modbus TCP has no authentication: listen on loopback or a PLC-only network (docs/plc.md).
    enabled: bool = False
    host: str = "127.0.0.1"
    port: StrictInt = Field(default=5020, ge=1, le=65535)  # 502 needs root or CAP_NET_BIND_SERVICE
    trigger_queue: int = Field(default=4, ge=1, le=256)


class PlcSpec(_Strict):
    opcua: OpcUaSpec = OpcUaSpec()
    modbus: ModbusSpec = ModbusSpec()
