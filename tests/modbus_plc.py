"""A PLC stand-in over Modbus TCP, run in its own process (tests/test_modbus.py, bench/bench_plc.py):

    python tests/modbus_plc.py PORT handshake N     one JSON line per part, then a summary line

It speaks only Modbus (pymodbus's client) and the register map of docs/plc.md.
"""
import json
import struct
import sys
import time

from pymodbus.client import ModbusTcpClient


def read(client, address, count):
    r = client.read_holding_registers(address, count=count)
    if r.isError():
        raise RuntimeError(f"read {address}+{count}: {r}")
    return r.registers


def wait_for(client, address, value, timeout=30.0):
    deadline = time.monotonic() + timeout
    while read(client, address, 1)[0] != value:
        if time.monotonic() > deadline:
            raise TimeoutError(f"register {address} did not become {value} in {timeout} s")
        time.sleep(0.002)


def part_id_registers(text):
    return list(struct.unpack(">16H", text.encode().ljust(32, b"\0")))


def main(port, mode, n):
    client = ModbusTcpClient("127.0.0.1", port=port, timeout=5)
    assert client.connect(), f"no Modbus server on port {port}"
    latencies = []
    started = time.perf_counter()
    for i in range(n):
        part_id = f"MB-{i:04d}"
        t0 = time.perf_counter()
        client.write_registers(16, part_id_registers(part_id))
        client.write_register(0, 1)                       # Trigger
        wait_for(client, 3, 1)                            # TriggerAck
        client.write_register(0, 0)
        wait_for(client, 5, 1)                            # ResultValid
        latencies.append((time.perf_counter() - t0) * 1000)
        regs = read(client, 0, 48)                        # the whole map in one read
        result = {"sent": part_id, "Pass": regs[6], "Verdict": regs[7],
                  "Score": struct.unpack(">f", struct.pack(">HH", *regs[8:10]))[0],
                  "Threshold": struct.unpack(">f", struct.pack(">HH", *regs[10:12]))[0],
                  "RegionCount": regs[12], "ResultCounter": regs[13], "ErrorCode": regs[14],
                  "PartId": struct.pack(">16H", *regs[32:48]).rstrip(b"\0").decode()}
        client.write_register(1, 1)                       # ResultAck
        wait_for(client, 5, 0)
        client.write_register(1, 0)
        wait_for(client, 3, 0)
        print(json.dumps({**result, "latency_ms": latencies[-1]}), flush=True)
    client.close()
    wall_s = time.perf_counter() - started
    latencies.sort()
    print(json.dumps({"summary": True, "n": n, "wall_s": wall_s, "p50_ms": latencies[len(latencies) // 2],
                      "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]}), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
