"""The inspection handshake over Modbus TCP (`plc.modbus:`): a pymodbus server in its own thread and loop.

Holding registers, 0-based addresses (read with FC3 or FC4, write with FC6 or FC16; docs/plc.md):

    0  Trigger        PLC  0/1          3  TriggerAck     1  ...   8-9   Score      float32, high word first
    1  ResultAck      PLC  0/1          4  Busy                    10-11 Threshold  float32, high word first
    2  BufferOverrun  station sets 1,   5  ResultValid             12    RegionCount
                      PLC writes 0      6  Pass                    13    ResultCounter (+1 per result, wraps)
                                        7  Verdict 0 none, 1 normal, 2 anomalous, 3 error, 4 learning
    14 ErrorCode  0 none, 1 trigger refused: queue full, 2 trigger refused: part id, 3 part not scored
    16-31  PartId for the next trigger (PLC, 32 ASCII bytes, high byte first, NUL padded; empty: the
           station names the part; zeroed by the trigger that takes it)
    32-47  PartId of the result presented (station)

The handshake is edge.line.plc.handshake's, as over OPC UA. Writes to any other register, writes of values
out of range and coil functions are refused with a Modbus exception (ILLEGAL_ADDRESS, ILLEGAL_VALUE,
ILLEGAL_FUNCTION) and a logged reason; so are reads past register 47. Modbus has no authentication:
the server listens on loopback unless told otherwise.

Owns the register map and the Modbus server. Must not decide the handshake (handshake.py does).
"""
from __future__ import annotations

import logging
import struct

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from edge.line.plc.handshake import Handshake
from edge.line.plc.served import LoopServer

log = logging.getLogger(__name__)

REG = {"Trigger": 0, "ResultAck": 1, "BufferOverrun": 2, "TriggerAck": 3, "Busy": 4, "ResultValid": 5, "Pass": 6,
       "Verdict": 7, "Score": 8, "Threshold": 10, "RegionCount": 12, "ResultCounter": 13, "ErrorCode": 14}
PART_ID_IN, PART_ID_OUT, PART_ID_REGS = 16, 32, 16
MAP_SIZE = 48
VERDICT = {"normal": 1, "anomalous": 2, "error": 3, "learning": 4}
WRITABLE = {0, 1, 2} | set(range(PART_ID_IN, PART_ID_IN + PART_ID_REGS))
READ_FUNCTIONS, WRITE_FUNCTIONS = {3, 4}, {6, 16}
BLOCK = 65536  # every address reaches the action, so every refusal is logged


def float_registers(value: float) -> list[int]:
    hi, lo = struct.unpack(">HH", struct.pack(">f", value))
    return [hi, lo]


def string_registers(text: str) -> list[int]:
    raw = text.encode("ascii", "replace")[:2 * PART_ID_REGS].ljust(2 * PART_ID_REGS, b"\0")
    return list(struct.unpack(f">{PART_ID_REGS}H", raw))


def registers_string(regs: list[int]) -> str:
    return struct.pack(f">{len(regs)}H", *regs).rstrip(b"\0").decode("ascii", "replace")


class ModbusServer(LoopServer):
    """A Sink (edge.line.plc): `start()` serves until `close()`."""

    name = "modbus"

    def __init__(self, runtime):
        super().__init__()
        self.runtime = runtime
        self.spec = runtime.config.plc.modbus
        self.where = f"{self.spec.host}:{self.spec.port}"
        self.regs = [0] * MAP_SIZE
        self.handshake = Handshake(runtime, self.spec.trigger_queue, "modbus")
        self.refused = 0
        self.server: ModbusTcpServer | None = None

    def start(self) -> "ModbusServer":
        super().start()
        log.info("modbus: serving %s (register map in docs/plc.md)", self.where)
        return self

    async def _main(self) -> None:
        device = SimDevice(id=0, simdata=[SimData(0, count=BLOCK, values=0, datatype=DataType.REGISTERS)],
                           action=self._action)
        self.server = ModbusTcpServer(device, address=(self.spec.host, self.spec.port))
        await self.server.serve_forever(background=True)  # raises when the port cannot be opened
        self._ready.set()
        await self._stopping.wait()
        await self.server.shutdown()

    # -- requests (event loop) ----------------------------------------------------------------

    def _refuse(self, code: ExcCodes, why: str) -> ExcCodes:
        self.refused += 1
        self.runtime.counts["bad_commands"] += 1
        log.warning("modbus: refused with %s: %s", code.name, why)
        return code

    async def _action(self, function_code, start_address, address, count, registers, values):
        """Every request: checked against the map, writes applied to the handshake, reads answered from
        the station's image of the map."""
        span = f"registers {address}..{address + count - 1}" if count > 1 else f"register {address}"
        if function_code not in READ_FUNCTIONS | WRITE_FUNCTIONS:
            return self._refuse(ExcCodes.ILLEGAL_FUNCTION, f"function {function_code} on {span}: the map is "
                                "holding registers (read FC3/FC4, write FC6/FC16)")
        if address + count > MAP_SIZE:
            return self._refuse(ExcCodes.ILLEGAL_ADDRESS, f"{'write' if values else 'read'} of {span}: the map "
                                f"ends at register {MAP_SIZE - 1}")
        if values:
            if function_code not in WRITE_FUNCTIONS:
                return self._refuse(ExcCodes.ILLEGAL_FUNCTION, f"function {function_code} with values")
            refusal = self._write(address, list(values), span)
            if refusal is not None:
                return refusal
        registers[address:address + count] = self.regs[address:address + count]
        return None

    def _write(self, address: int, values: list[int], span: str) -> ExcCodes | None:
        addrs = range(address, address + len(values))
        if not set(addrs) <= WRITABLE:
            bad = sorted(set(addrs) - WRITABLE)
            return self._refuse(ExcCodes.ILLEGAL_ADDRESS, f"write of {span}: register {bad[0]} is the station's "
                                "(writable: 0-2, 16-31)")
        for a, v in zip(addrs, values):
            if a in (0, 1) and v not in (0, 1):
                return self._refuse(ExcCodes.ILLEGAL_VALUE, f"write of {v} to register {a}: 0 or 1 only")
            if a == 2 and v != 0:
                return self._refuse(ExcCodes.ILLEGAL_VALUE, f"write of {v} to register 2 (BufferOverrun): the PLC "
                                    "writes 0 to clear it")
        for a, v in zip(addrs, values):  # the part id first, so one FC16 can carry part id and Trigger
            if a >= PART_ID_IN:
                self.regs[a] = v
        for a, v in zip(addrs, values):
            if a == 0:
                self.regs[0] = v
                rising = bool(v) and not self.handshake.trigger_high
                part_id = registers_string(self.regs[PART_ID_IN:PART_ID_IN + PART_ID_REGS]) if rising else None
                if rising:  # the part id names one part: consumed (zeroed) by the trigger that uses it
                    self.regs[PART_ID_IN:PART_ID_IN + PART_ID_REGS] = [0] * PART_ID_REGS
                self._apply(self.handshake.trigger_edge(bool(v), part_id, via="register 0 (Trigger)"))
            elif a == 1:
                self.regs[1] = v
                self._apply(self.handshake.ack_edge(bool(v)))
            elif a == 2:
                self.regs[2] = 0
        return None

    def _apply(self, outputs: dict) -> None:
        """Handshake outputs into the map; ResultValid last (the map is answered whole per request, so a
        PLC reading it with one FC3 never sees ResultValid without its result)."""
        for name, value in outputs.items():
            if name == "PartId":
                self.regs[PART_ID_OUT:PART_ID_OUT + PART_ID_REGS] = string_registers(value)
            elif name in ("Score", "Threshold"):
                self.regs[REG[name]:REG[name] + 2] = float_registers(value)
            elif name == "Verdict":
                self.regs[REG["Verdict"]] = VERDICT.get(value, 3)
            elif name == "Error":
                if not value:
                    self.regs[REG["ErrorCode"]] = 0
                elif "ResultValid" in outputs:
                    self.regs[REG["ErrorCode"]] = 3
                else:
                    self.regs[REG["ErrorCode"]] = 1 if self.handshake.last_refusal == "overrun" else 2
            elif name == "ResultValid":
                if value:
                    self.regs[REG["ResultCounter"]] = (self.regs[REG["ResultCounter"]] + 1) % 65536
                self.regs[REG["ResultValid"]] = int(value)
            elif name in REG:
                self.regs[REG[name]] = min(int(value), 65535)

    # -- results ------------------------------------------------------------------------------

    def on_result(self, result: dict) -> None:
        self.in_loop(lambda: self._apply(self.handshake.result(result)))
