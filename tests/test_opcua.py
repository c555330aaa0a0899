"""The OPC UA inspection handshake: a real asyncua server in the station, an asyncua client in its own
process as the PLC (tests/opcua_plc.py); results checked against the JSON result of the same part."""
import asyncio
import json
import logging
import subprocess
import sys

import pytest

pytest.importorskip("asyncua", reason="needs the plc extra (pip install -e .[plc])")
from asyncua import Client, ua

from conftest import ROOT
from edge.line.plc.opcua import StationUsers
from edge.line.plc.spec import OpcUaSpec
from mqtt_helpers import Subscriber, free_port, needs_mosquitto, wait_until
from station_helpers import start, write_config

pytestmark = needs_mosquitto

NS = "urn:anomaly-edge:l1:s1"


def station(tmp_path, default_pack_dir, enrolled_state, broker, **opcua):
    (tmp_path / "hmi.pw").write_text("hmi-secret\n")
    port = free_port()
    cfg = write_config(tmp_path, default_pack_dir, enrolled_state, broker.port,
                       {"kind": "synthetic", "seed": 0, "defect_rate": 0.3}, trigger={"mode": "mqtt"},
                       explain={"enabled": False},
                       plc={"opcua": {"enabled": True, "port": port, "trigger_queue": 4, "allow_anonymous": True,
                                      "users": [{"name": "plc", "password": "plc-secret", "role": "operator"},
                                                {"name": "hmi", "password_file": str(tmp_path / "hmi.pw")}],
                                      **opcua}})
    return start(cfg), f"opc.tcp://127.0.0.1:{port}/anomaly-edge/"


def plc(url: str, mode: str, n: int, user="plc", password="plc-secret", timeout=300) -> list[dict]:
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "opcua_plc.py"), url, user, password, mode, str(n)],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines()]


@pytest.mark.timeout(400)
def test_the_handshake_50_times_gives_each_part_its_json_result_and_a_burst_sets_buffer_overrun(
        broker, tmp_path, default_pack_dir, enrolled_state):
    sub = Subscriber(broker.port, "test/s1/#")
    rt, url = station(tmp_path, default_pack_dir, enrolled_state, broker)
    try:
        lines = plc(url, "handshake", 50)
        parts, summary = lines[:-1], lines[-1]
        assert len(parts) == 50 and summary["n"] == 50
        wait_until(lambda: len(sub.unique_by_topic().get("test/s1/result", [])) >= 50, 30, "the JSON results")
        json_results = {r["part_id"]: r for r in sub.unique_by_topic()["test/s1/result"]}
        for p in parts:
            r = json_results[p["sent"]]
            assert p["PartId"] == p["sent"]
            assert p["Verdict"] == r["verdict"] and p["Pass"] == (r["verdict"] == "normal")
            assert p["Score"] == r["score"] and p["Threshold"] == r["threshold"]
            assert p["RegionCount"] == len(r["regions"]) and p["Error"] == ""
        assert {p["Verdict"] for p in parts} == {"normal", "anomalous"}  # the synthetic line has both
        print(f"Trigger -> ResultValid over 50 handshakes: p50 {summary['p50_ms']:.1f} ms, "
              f"p99 {summary['p99_ms']:.1f} ms")

        burst = plc(url, "burst", 7)  # trigger_queue 4: three too many, none acknowledged
        calls, after = burst[:-1], burst[-1]
        assert [c["accepted"] for c in calls] == [True] * 4 + [False] * 3
        assert all("4 triggered parts are waiting" in c["reason"] for c in calls[4:])
        assert after["BufferOverrun"] is True and "B-0006 refused" in after["Error"]
        # The four accepted parts are all scored and recorded: nothing was dropped.
        wait_until(lambda: {"B-0000", "B-0001", "B-0002", "B-0003"} <=
                   {r["part_id"] for r in sub.unique_by_topic().get("test/s1/result", [])}, 30, "the burst's parts")
        assert not ({"B-0004", "B-0005", "B-0006"} & {r["part_id"] for r in sub.unique_by_topic()["test/s1/result"]})
    finally:
        rt.stop()
        sub.close()


def _user_client(url: str, user: str, password: str, timeout: float = 5) -> Client:
    client = Client(url, timeout=timeout)
    client.set_user(user)
    client.set_password(password)
    return client


async def _connect_outcome(client: Client) -> str:
    """'connected', or the name of the error that refused the session or the channel."""
    try:
        await client.connect()
    except Exception as e:  # a refused session (UaError) or channel (no such endpoint)
        return type(e).__name__
    await client.disconnect()
    return "connected"


async def _client_checks(url: str) -> dict:
    out = {"wrong_password": await _connect_outcome(_user_client(url, "plc", "wrong"))}

    async def refused_write(client, path, variant):
        idx = await client.get_namespace_index(NS)
        try:
            await client.get_node(f"ns={idx};s={path}").write_value(variant)
            return "written"
        except ua.UaError as e:
            return type(e).__name__

    anonymous = Client(url, timeout=5)
    async with anonymous:
        idx = await anonymous.get_namespace_index(NS)
        out["anonymous_read"] = await anonymous.get_node(f"ns={idx};s=Station.ModelId").read_value()
        out["anonymous_write"] = await refused_write(anonymous, "Station.Inspection.Trigger",
                                                     ua.Variant(True, ua.VariantType.Boolean))
    hmi = _user_client(url, "hmi", "hmi-secret")
    async with hmi:
        idx = await hmi.get_namespace_index(NS)
        out["hmi_write"] = await refused_write(hmi, "Station.Inspection.Trigger", ua.Variant(True, ua.VariantType.Boolean))
        station = hmi.get_node(f"ns={idx};s=Station")
        try:
            await station.call_method(f"{idx}:Trigger", ua.Variant("HMI-1", ua.VariantType.String))
            out["hmi_call"] = "called"
        except ua.UaError as e:
            out["hmi_call"] = type(e).__name__
    operator = _user_client(url, "plc", "plc-secret")
    async with operator:
        out["string_to_trigger"] = await refused_write(operator, "Station.Inspection.Trigger",
                                                       ua.Variant("yes", ua.VariantType.String))
        out["int_to_partid"] = await refused_write(operator, "Station.Inspection.PartId",
                                                   ua.Variant(7, ua.VariantType.Int32))
        out["write_score"] = await refused_write(operator, "Station.Inspection.Score",
                                                 ua.Variant(0.0, ua.VariantType.Double))
        idx = await operator.get_namespace_index(NS)
        station = operator.get_node(f"ns={idx};s=Station")
        out["int_to_method"] = await station.call_method(f"{idx}:Trigger", ua.Variant(5, ua.VariantType.Int32))
    return out


async def _unnamed_handshake(url: str) -> str:
    """A trigger without a part id written, after results were presented: the station names the part
    (the presented result's id in PartId does not name the next one)."""
    async with _user_client(url, "plc", "plc-secret") as client:
        idx = await client.get_namespace_index(NS)
        node = {n: client.get_node(f"ns={idx};s=Station.Inspection.{n}")
                for n in ("Trigger", "TriggerAck", "ResultValid", "ResultAck", "PartId")}

        async def wait(name, value):
            for _ in range(1500):
                if await node[name].read_value() == value:
                    return
                await asyncio.sleep(0.02)
            raise TimeoutError(name)

        boolean = ua.VariantType.Boolean
        await node["Trigger"].write_value(ua.Variant(True, boolean))
        await wait("TriggerAck", True)
        await node["Trigger"].write_value(ua.Variant(False, boolean))
        await wait("ResultValid", True)
        part_id = await node["PartId"].read_value()
        await node["ResultAck"].write_value(ua.Variant(True, boolean))
        await wait("ResultValid", False)
        await node["ResultAck"].write_value(ua.Variant(False, boolean))
        return part_id


@pytest.mark.timeout(300)
def test_wrong_passwords_anonymous_and_read_only_writes_and_wrong_types_are_refused_and_scoring_goes_on(
        broker, tmp_path, default_pack_dir, enrolled_state, caplog):
    caplog.set_level(logging.WARNING, logger="edge.line.plc.opcua")
    rt, url = station(tmp_path, default_pack_dir, enrolled_state, broker)
    try:
        out = asyncio.run(_client_checks(url))
        assert out["wrong_password"] == "BadUserAccessDenied"
        assert out["anonymous_read"] == rt.pack.model_id
        assert out["anonymous_write"] == "BadUserAccessDenied"
        assert out["hmi_write"] == "BadUserAccessDenied"
        assert out["hmi_call"] == "BadUserAccessDenied"
        assert out["string_to_trigger"] == "BadTypeMismatch"
        assert out["int_to_partid"] == "BadTypeMismatch"
        assert out["write_score"] == "BadUserAccessDenied"
        assert out["int_to_method"] == [False, "Trigger(partId): partId must be one String"]
        text = "\n".join(r.getMessage() for r in caplog.records)
        assert "session for user 'plc' refused: unknown user or wrong password" in text
        assert "write refused for an anonymous session: read-only access" in text
        assert "write refused for user 'hmi'" in text and "call refused for user 'hmi'" in text
        assert "write of Station/Inspection/Trigger by plc refused: BadTypeMismatch (value of type String)" in text
        assert "write of Station/Inspection/Score by plc refused: BadUserAccessDenied" in text
        assert rt.counts["parts"] == 0  # none of that triggered a part
        parts = plc(url, "handshake", 3)[:-1]  # the station still inspects
        assert [p["PartId"] for p in parts] == ["UA-0000", "UA-0001", "UA-0002"]
        assert all(p["Verdict"] in ("normal", "anomalous") for p in parts)
        assert asyncio.run(_unnamed_handshake(url)).startswith("s1-opcua-")
    finally:
        rt.stop()


def test_anonymous_sessions_are_refused_by_default():
    assert OpcUaSpec().allow_anonymous is False
    users = StationUsers(OpcUaSpec(users=[{"name": "plc", "password": "x", "role": "operator"}]))
    assert users.get_user(None) is None
    assert users.get_user(None, "plc", "y") is None
    assert users.get_user(None, "plc", "x").name == "plc"


def _certificate(folder, name: str, uri: str, server: bool):
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from asyncua.crypto import cert_gen

    key = cert_gen.generate_private_key()
    cert = cert_gen.generate_self_signed_app_certificate(
        key, name, {}, [x509.UniformResourceIdentifier(uri), x509.DNSName("localhost")],
        [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH])
    (folder / f"{name}.der").write_bytes(cert.public_bytes(Encoding.DER))
    (folder / f"{name}.pem").write_bytes(cert_gen.dump_private_key_as_pem(key))
    return folder / f"{name}.der", folder / f"{name}.pem"


async def _encrypted_checks(url: str, client_cert, client_key) -> dict:
    out = {"plain": await _connect_outcome(_user_client(url, "plc", "plc-secret"))}  # no NoSecurity endpoint
    client = _user_client(url, "plc", "plc-secret", timeout=10)
    client.application_uri = "urn:anomaly-edge:test:plc"
    await client.set_security_string(f"Basic256Sha256,SignAndEncrypt,{client_cert},{client_key}")
    async with client:
        idx = await client.get_namespace_index(NS)
        station = client.get_node(f"ns={idx};s=Station")
        out["trigger"] = await station.call_method(f"{idx}:Trigger", ua.Variant("ENC-1", ua.VariantType.String))
        valid = client.get_node(f"ns={idx};s=Station.Inspection.ResultValid")
        for _ in range(1500):
            if await valid.read_value():
                break
            await asyncio.sleep(0.02)
        out["part"] = await client.get_node(f"ns={idx};s=Station.Inspection.PartId").read_value()
    return out


@pytest.mark.timeout(300)
def test_an_encrypted_endpoint_serves_the_handshake_and_refuses_plain_channels(
        broker, tmp_path, default_pack_dir, enrolled_state):
    server_cert, server_key = _certificate(tmp_path, "station", "urn:anomaly-edge:l1:s1:opcua", server=True)
    client_cert, client_key = _certificate(tmp_path, "plc", "urn:anomaly-edge:test:plc", server=False)
    rt, url = station(tmp_path, default_pack_dir, enrolled_state, broker, security="encrypted",
                      certificate=str(server_cert), private_key=str(server_key))
    try:
        out = asyncio.run(_encrypted_checks(url, client_cert, client_key))
        assert out["plain"] != "connected"
        assert out["trigger"] == [True, "part ENC-1 queued"]
        assert out["part"] == "ENC-1"
    finally:
        rt.stop()


def test_encrypted_security_needs_the_certificate():
    with pytest.raises(ValueError, match="security encrypted needs certificate and private_key"):
        OpcUaSpec(security="encrypted", users=[{"name": "plc", "password": "x"}])


def test_station_status_text_names_the_state_the_source_and_learning_or_refining():
    from edge.line.plc.opcua import status_text

    h = {"state": "online", "source": {"state": "streaming"}, "learning": None, "refining": None}
    assert status_text(h) == "online; source streaming"
    assert status_text({**h, "refining": {"collected": 7, "of": 50}}) == "online; source streaming; refining 7/50"
    assert status_text({**h, "state": "failed", "learning": {"collected": 3, "of": 20}}) == \
        "failed; source streaming; learning 3/20"
