"""The inspection handshake over Modbus TCP: a pymodbus server in the station, a pymodbus client in its
own process as the PLC (tests/modbus_plc.py); results checked against the JSON result of the same part;
out-of-map and out-of-range requests refused with a logged reason while the station keeps scoring."""
import json
import logging
import struct
import subprocess
import sys

import pytest

pytest.importorskip("pymodbus", reason="needs the plc extra (pip install -e .[plc])")
from pymodbus.client import ModbusTcpClient

from conftest import ROOT
from mqtt_helpers import Subscriber, free_port, needs_mosquitto, wait_until
from station_helpers import start, write_config

pytestmark = needs_mosquitto


def plc(port: int, n: int) -> list[dict]:
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "modbus_plc.py"), str(port), "handshake", str(n)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines()]


@pytest.mark.timeout(400)
def test_the_handshake_50_times_and_bad_requests_refused(broker, tmp_path, default_pack_dir, enrolled_state, caplog):
    caplog.set_level(logging.WARNING, logger="edge.line.plc")
    sub = Subscriber(broker.port, "test/s1/#")
    port = free_port()
    cfg = write_config(tmp_path, default_pack_dir, enrolled_state, broker.port,
                       {"kind": "synthetic", "seed": 0, "defect_rate": 0.3}, trigger={"mode": "mqtt"},
                       explain={"enabled": False}, plc={"modbus": {"enabled": True, "port": port, "trigger_queue": 2}})
    rt = start(cfg)
    try:
        lines = plc(port, 50)
        parts, summary = lines[:-1], lines[-1]
        assert len(parts) == 50
        wait_until(lambda: len(sub.unique_by_topic().get("test/s1/result", [])) >= 50, 30, "the JSON results")
        json_results = {r["part_id"]: r for r in sub.unique_by_topic()["test/s1/result"]}
        for i, p in enumerate(parts):
            r = json_results[p["sent"]]
            assert p["PartId"] == p["sent"] and p["ResultCounter"] == i + 1 and p["ErrorCode"] == 0
            assert p["Verdict"] == {"normal": 1, "anomalous": 2}[r["verdict"]]
            assert p["Pass"] == (r["verdict"] == "normal")
            assert p["Score"] == pytest.approx(r["score"], rel=1e-6)  # float32 on the wire
            assert p["Threshold"] == pytest.approx(r["threshold"], rel=1e-6)
            assert p["RegionCount"] == len(r["regions"])
        assert {p["Verdict"] for p in parts} == {1, 2}
        print(f"Modbus Trigger -> ResultValid over 50 handshakes: p50 {summary['p50_ms']:.1f} ms, "
              f"p99 {summary['p99_ms']:.1f} ms")

        client = ModbusTcpClient("127.0.0.1", port=port, timeout=5)
        assert client.connect()
        # The last trigger consumed its part id (registers 16-31 zeroed): a trigger now is station-named.
        assert client.read_holding_registers(16, count=16).registers == [0] * 16
        client.write_register(0, 1)
        wait_until(lambda: client.read_holding_registers(3, count=1).registers == [1], 10, "TriggerAck")
        client.write_register(0, 0)
        wait_until(lambda: client.read_holding_registers(5, count=1).registers == [1], 30, "ResultValid")
        named = struct.pack(">16H", *client.read_holding_registers(32, count=16).registers).rstrip(b"\0").decode()
        assert named.startswith("s1-modbus-")
        client.write_register(1, 1)
        wait_until(lambda: client.read_holding_registers(5, count=1).registers == [0], 10, "ResultValid cleared")
        client.write_register(1, 0)
        parts_before = rt.counts["parts"]
        assert client.read_holding_registers(40, count=20).exception_code == 2      # past the map
        assert client.write_register(5, 1).exception_code == 2                      # ResultValid is the station's
        assert client.write_register(0, 7).exception_code == 3                      # Trigger is 0 or 1
        assert client.write_register(2, 1).exception_code == 3                      # BufferOverrun: 0 clears
        assert client.write_register(1000, 1).exception_code == 2                   # not in the map
        assert client.write_coil(0, True).exception_code == 1                       # coils: not the map
        text = "\n".join(r.getMessage() for r in caplog.records)
        for reason in ("ILLEGAL_ADDRESS: read of registers 40..59: the map ends at register 47",
                       "ILLEGAL_ADDRESS: write of register 5: register 5 is the station's",
                       "ILLEGAL_VALUE: write of 7 to register 0: 0 or 1 only",
                       "ILLEGAL_VALUE: write of 1 to register 2 (BufferOverrun): the PLC writes 0 to clear it",
                       "ILLEGAL_ADDRESS: write of register 1000: the map ends at register 47",
                       "ILLEGAL_FUNCTION: function 5 on register 0"):
            assert reason in text, (reason, text)
        # A trigger burst past trigger_queue (2): refused, BufferOverrun and ErrorCode 1 say so.
        for i in range(3):
            client.write_registers(16, list(struct.unpack(">16H", f"BURST-{i}".encode().ljust(32, b"\0"))))
            client.write_register(0, 1)
            client.write_register(0, 0)
        regs = client.read_holding_registers(0, count=48).registers
        assert regs[2] == 1 and regs[14] == 1
        wait_until(lambda: {"BURST-0", "BURST-1"} <= {r["part_id"] for r in sub.unique_by_topic()["test/s1/result"]},
                   30, "the two accepted parts")
        assert "BURST-2" not in {r["part_id"] for r in sub.unique_by_topic()["test/s1/result"]}
        assert not client.write_register(2, 0).isError()  # the PLC clears the alarm
        assert client.read_holding_registers(2, count=1).registers == [0]
        assert rt.counts["parts"] >= parts_before + 2  # scoring went on
        client.close()
    finally:
        rt.stop()
        sub.close()
