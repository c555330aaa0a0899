"""Plant protocols beside the JSON topics: a Sparkplug B edge node (SCADA) and an OPC UA inspection
handshake (PLC), the same handshake over Modbus TCP. Each is a *sink* the runtime feeds with every recorded result:

    sink.on_result(result)   the JSON `result` message of a part, after it is recorded (output thread;
                             must return at once: sinks hand it to their own thread or loop)
    sink.close()             at the station's stop, before the MQTT publisher closes

A sink acts on the station only through `Runtime.command(name, payload)` (the JSON command handling of
edge.line.commands, so a command means the same on every protocol) and `Runtime.trigger` / `Runtime.health`.

Owns starting, feeding and closing the sinks. Must not change the station's models or store.
"""
from __future__ import annotations

import logging
from typing import Protocol

log = logging.getLogger(__name__)


class Sink(Protocol):
    name: str

    def on_result(self, result: dict) -> None: ...

    def close(self) -> None: ...


def start_sinks(runtime) -> list[Sink]:
    """The sinks the station config enables, started (a sink that cannot start stops the station's start)."""
    config = runtime.config
    sinks: list[Sink] = []
    try:
        if config.mqtt.sparkplug.enabled:
            from edge.line.plc.sparkplug import SparkplugNode

            sinks.append(SparkplugNode(runtime).start())
        if config.plc.opcua.enabled:
            from edge.line.plc.opcua import OpcUaServer

            sinks.append(OpcUaServer(runtime).start())
        if config.plc.modbus.enabled:
            from edge.line.plc.modbus import ModbusServer

            sinks.append(ModbusServer(runtime).start())
    except BaseException:
        close_sinks(sinks)
        raise
    return sinks


def result_to_sinks(sinks: list[Sink], result: dict) -> None:
    for sink in sinks:
        try:
            sink.on_result(result)
        except Exception:  # a sink is never a reason to lose the line's output
            log.exception("%s: could not take the result of part %s", sink.name, result.get("part_id"))


def close_sinks(sinks: list[Sink]) -> None:
    for sink in reversed(sinks):
        try:
            sink.close()
        except Exception:
            log.exception("%s: close failed", sink.name)


def largest_region_mm(result: dict, mm_per_pixel: float | None) -> float | None:
    """The longest side of the largest region's bounding box, in mm (0.0 with no region; None without a
    scale or without a score)."""
    if mm_per_pixel is None or result.get("score") is None:
        return None
    regions = result.get("regions") or []
    if not regions:
        return 0.0
    biggest = max(regions, key=lambda r: r["area"])
    return round(max(biggest["width"], biggest["height"]) * mm_per_pixel, 3)
