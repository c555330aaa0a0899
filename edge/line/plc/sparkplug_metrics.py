"""The Sparkplug B metrics of the station's Edge Node and Device (names, aliases, datatypes, the
commands they carry), their encoding into a payload, and the bdSeq kept on disk across restarts.

Owns what a metric is and how it is written. Must not open MQTT sessions (edge.line.plc.sparkplug).
"""
from __future__ import annotations

import dataclasses
import os
import time
from datetime import datetime
from pathlib import Path

from edge.line.plc.sparkplug_schema import DATA_TYPES, VALUE_FIELD, Payload


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    name: str
    datatype: str            # a DataType name (sparkplug_b.proto)
    alias: int
    command: str | None = None  # NCMD/DCMD: the station command a write of this metric carries out


NODE_METRICS = (
    MetricSpec("bdSeq", "Int64", 1),
    MetricSpec("Node Control/Rebirth", "Boolean", 2, command="rebirth"),
    MetricSpec("Node Control/Reload", "Boolean", 3, command="reload"),
)
DEVICE_METRICS = (
    MetricSpec("Inspection/Part Id", "String", 10),
    MetricSpec("Inspection/Verdict", "String", 11),
    MetricSpec("Inspection/Pass", "Boolean", 12),
    MetricSpec("Inspection/Score", "Double", 13),
    MetricSpec("Inspection/Threshold", "Double", 14),
    MetricSpec("Inspection/Severity", "Double", 15),
    MetricSpec("Inspection/Region Count", "UInt32", 16),
    MetricSpec("Inspection/Largest Region mm", "Double", 17),
    MetricSpec("Inspection/Trigger", "String", 18),
    MetricSpec("Inspection/Error", "String", 19),
    MetricSpec("Model/Id", "String", 20),
    MetricSpec("Latency/Score ms", "Double", 21),
    MetricSpec("Latency/Capture To Publish ms", "Double", 22),
    MetricSpec("Health/Parts", "UInt64", 30),
    MetricSpec("Health/Flagged", "UInt64", 31),
    MetricSpec("Health/Errors", "UInt64", 32),
    MetricSpec("Health/Dropped Frames", "UInt64", 33),
    MetricSpec("Health/Bad Frames", "UInt64", 34),
    MetricSpec("Health/Bad Commands", "UInt64", 35),
    MetricSpec("Health/Source Reconnects", "UInt64", 36),
    MetricSpec("Source/Name", "String", 40),
    MetricSpec("Source/State", "String", 41),
    MetricSpec("Command/Trigger", "String", 50, command="trigger"),
    MetricSpec("Command/Enroll Good", "String", 51, command="enroll-good"),
)


def now_ms() -> int:
    return int(time.time() * 1000)


def ms_of(iso: str | None) -> int:
    try:
        return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000)
    except (AttributeError, ValueError):
        return now_ms()


def add_metric(payload: Payload, spec: MetricSpec, value, timestamp: int, birth: bool) -> None:
    """Births name, alias and type every metric; data messages carry the alias and the value only."""
    m = payload.metrics.add(alias=spec.alias, timestamp=timestamp)
    if birth:
        m.name = spec.name
        m.datatype = DATA_TYPES[spec.datatype]
    if value is None:
        m.is_null = True
    else:
        setattr(m, VALUE_FIELD[spec.datatype], value)


class BdSeqFile:
    """The birth/death sequence number across restarts: `take()` returns this session's value after
    writing the next one to disk."""

    def __init__(self, path: Path):
        self.path = path

    def take(self) -> int:
        try:
            value = int(self.path.read_text().strip()) % 256
        except (OSError, ValueError):
            value = 0
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            f.write(f"{(value + 1) % 256}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        return value
