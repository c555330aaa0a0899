"""A PLC stand-in over OPC UA, run in its own process (tests/test_opcua.py, bench/bench_plc.py):

    python tests/opcua_plc.py URL USER PASSWORD handshake N     one JSON line per part, then a summary line
    python tests/opcua_plc.py URL USER PASSWORD burst K         K Trigger() calls without acknowledging

It speaks only OPC UA (asyncua's client): it reads and writes the nodes a PLC program would.
"""
import asyncio
import json
import sys
import time

from asyncua import Client, ua

NS = "urn:anomaly-edge:l1:s1"


async def wait_for(node, value, timeout=30.0, poll=0.002):
    deadline = time.monotonic() + timeout
    while (await node.read_value()) != value:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{node.nodeid.to_string()} did not become {value} in {timeout} s")
        await asyncio.sleep(poll)


async def main(url, user, password, mode, n):
    client = Client(url, timeout=10)
    if user != "-":
        client.set_user(user)
        client.set_password(password)
    async with client:
        idx = await client.get_namespace_index(NS)
        node = {name: client.get_node(f"ns={idx};s=Station.Inspection.{name}") for name in (
            "Trigger", "TriggerAck", "Busy", "ResultValid", "ResultAck", "Pass", "Verdict", "Score", "Threshold",
            "PartId", "RegionCount", "BufferOverrun", "Error")}
        station = client.get_node(f"ns={idx};s=Station")
        if mode == "handshake":
            latencies = []
            started = time.perf_counter()
            for i in range(n):
                part_id = f"UA-{i:04d}"
                t0 = time.perf_counter()
                await client.write_values([node["PartId"], node["Trigger"]],
                                          [ua.DataValue(ua.Variant(part_id, ua.VariantType.String)),
                                           ua.DataValue(ua.Variant(True, ua.VariantType.Boolean))])
                await wait_for(node["TriggerAck"], True)
                await node["Trigger"].write_value(ua.Variant(False, ua.VariantType.Boolean))
                await wait_for(node["ResultValid"], True)
                latencies.append((time.perf_counter() - t0) * 1000)
                names = ("PartId", "Verdict", "Pass", "Score", "Threshold", "RegionCount", "Error")
                values = dict(zip(names, await client.read_values([node[k] for k in names])))
                await node["ResultAck"].write_value(ua.Variant(True, ua.VariantType.Boolean))
                await wait_for(node["ResultValid"], False)
                await node["ResultAck"].write_value(ua.Variant(False, ua.VariantType.Boolean))
                await wait_for(node["TriggerAck"], False)
                print(json.dumps({"sent": part_id, **values, "latency_ms": latencies[-1]}), flush=True)
            wall_s = time.perf_counter() - started
            latencies.sort()
            print(json.dumps({"summary": True, "n": n, "wall_s": wall_s, "p50_ms": latencies[len(latencies) // 2],
                              "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]}), flush=True)
        elif mode == "burst":
            method = await station.get_child(f"{idx}:Trigger")
            for i in range(n):
                accepted, reason = await station.call_method(method, ua.Variant(f"B-{i:04d}", ua.VariantType.String))
                print(json.dumps({"part": f"B-{i:04d}", "accepted": accepted, "reason": reason}), flush=True)
            print(json.dumps({"summary": True, "BufferOverrun": await node["BufferOverrun"].read_value(),
                              "Error": await node["Error"].read_value()}), flush=True)


if __name__ == "__main__":
    url, user, password, mode, n = sys.argv[1:6]
    asyncio.run(main(url, user, password, mode, int(n)))
