"""TLS and username/password from the station config, against a Mosquitto that requires both."""
import json
import subprocess
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge.line.config import load_config
from edge.line.runtime import Runtime
from mqtt_helpers import MOSQUITTO, Broker, needs_mosquitto, wait_until
from station_helpers import write_config

pytestmark = needs_mosquitto


def make_certs(d: Path) -> None:
    def ssl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
        "-keyout", str(d / "ca.key"), "-out", str(d / "ca.crt"))
    ssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", str(d / "server.key"),
        "-out", str(d / "server.csr"))
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    ssl("x509", "-req", "-in", str(d / "server.csr"), "-CA", str(d / "ca.crt"), "-CAkey", str(d / "ca.key"),
        "-CAcreateserial", "-days", "2", "-extfile", str(d / "san.ext"), "-out", str(d / "server.crt"))


@pytest.fixture
def secure_broker(tmp_path):
    make_certs(tmp_path)
    passwd = tmp_path / "passwd"
    passwd.write_text("")
    subprocess.run([str(Path(MOSQUITTO).parent.parent / "bin" / "mosquitto_passwd"), "-b", str(passwd),
                    "station", "s3cret pass"], check=True, capture_output=True)
    passwd.chmod(0o600)
    b = Broker(tmp_path, f"allow_anonymous false\npassword_file {passwd}\ncafile {tmp_path}/ca.crt\n"
                         f"certfile {tmp_path}/server.crt\nkeyfile {tmp_path}/server.key\n")
    b.start()
    yield b
    b.stop()
    b.log.close()


def tls_subscriber(broker: Broker, ca: Path, got: list) -> mqtt.Client:
    ready = threading.Event()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="secure-subscriber")
    c.username_pw_set("station", "s3cret pass")
    c.tls_set(ca_certs=str(ca))
    c.on_connect = lambda cl, u, f, rc, p: cl.subscribe("test/s1/result", qos=1)
    c.on_subscribe = lambda *a: ready.set()
    c.on_message = lambda cl, u, m: got.append(json.loads(m.payload))
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    assert ready.wait(10), "subscriber could not subscribe over TLS"
    return c


@pytest.mark.timeout(120)
def test_results_arrive_over_tls_with_a_password_file(secure_broker, tmp_path, default_pack_dir, enrolled_state):
    (tmp_path / "mqtt-password").write_text("s3cret pass\n")
    cfg = write_config(tmp_path, default_pack_dir, enrolled_state, secure_broker.port,
                       {"kind": "synthetic", "count": 5},
                       mqtt={"username": "station", "password_file": str(tmp_path / "mqtt-password"),
                             "tls": {"ca": str(tmp_path / "ca.crt")}})
    got = []
    sub = tls_subscriber(secure_broker, tmp_path / "ca.crt", got)
    rt = Runtime(load_config(cfg), cfg).start()
    try:
        wait_until(lambda: len(got) >= 5, 60, "5 results over TLS")
        assert [r["source"]["index"] for r in got[:5]] == list(range(5))
    finally:
        rt.stop()
        sub.disconnect()
        sub.loop_stop()


@pytest.mark.timeout(120)
def test_a_wrong_password_keeps_results_in_the_outbox(secure_broker, tmp_path, default_pack_dir, enrolled_state):
    cfg = write_config(tmp_path, default_pack_dir, enrolled_state, secure_broker.port,
                       {"kind": "synthetic", "count": 5},
                       mqtt={"username": "station", "password": "wrong", "tls": {"ca": str(tmp_path / "ca.crt")}})
    rt = Runtime(load_config(cfg), cfg).start()
    try:
        wait_until(lambda: rt.counts["parts"] == 5, 60, "5 parts scored")
        time.sleep(1.0)
        h = rt.health()
        assert h["broker"]["connected"] is False and h["broker"]["outbox_size"] == 5
        assert h["broker"]["last_error"] == "Not authorized"
    finally:
        rt.stop(timeout=3)


def _state_doc(state: Path):
    import yaml

    from edge.station.state import STATE_FILE

    return state / STATE_FILE, yaml.safe_load((state / STATE_FILE).read_text())


@pytest.mark.timeout(240)
def test_run_check_verifies_the_pack_state_and_tls_files_as_run_does(tmp_path, default_pack_dir, enrolled_state):
    import shutil

    import yaml

    from conftest import run_cli

    cfg = write_config(tmp_path, default_pack_dir, enrolled_state, 1883, {"kind": "synthetic", "count": 1})
    ok = run_cli("run", "--config", cfg, "--check")
    assert "valid" in ok.stdout and "16 references" in ok.stdout, ok.stdout

    state_file, doc = _state_doc(tmp_path / "state")
    original = state_file.read_text()
    for change, expected in ((lambda d: d["bank"].update(sha256="0" * 64), "does not match the sha256"),
                             (lambda d: d["pack"].update(encoder_sha256="f" * 64), "enroll again for this pack"),
                             (lambda d: d.update(schema_version=99), "schema_version 99 not supported")):
        bad = yaml.safe_load(original)
        change(bad)
        state_file.write_text(yaml.safe_dump(bad))
        p = run_cli("run", "--config", cfg, "--check", check=False)
        assert p.returncode == 2 and expected in p.stderr and "Traceback" not in p.stderr, p.stderr
    state_file.write_text(original)

    (tmp_path / "not-a-cert.pem").write_text("this is not a certificate\n")
    raw = yaml.safe_load(cfg.read_text())
    raw["mqtt"]["tls"] = {"ca": str(tmp_path / "not-a-cert.pem")}
    cfg.write_text(yaml.safe_dump(raw))
    for args in (("--check",), ("--exit-at-end",)):  # the check and the service say the same
        p = run_cli("run", "--config", cfg, *args, check=False)
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
        assert f"mqtt.tls.ca {tmp_path / 'not-a-cert.pem'}: not a usable CA certificate file" in p.stderr, p.stderr
    shutil.rmtree(tmp_path / "var", ignore_errors=True)


@pytest.mark.timeout(180)
def test_tls_failures_are_logged_and_named_in_the_health(secure_broker, tmp_path, default_pack_dir, enrolled_state,
                                                         caplog):
    import logging

    other = tmp_path / "other"
    other.mkdir()
    make_certs(other)  # a CA the broker's certificate does not come from
    (tmp_path / "plain").mkdir()
    plain = Broker(tmp_path / "plain")
    plain.start()
    cases = [("unknown CA", {"tls": {"ca": str(other / "ca.crt")}}, secure_broker.port,
              "certificate is refused"),
             ("host name", {"host": "localhost", "tls": {"ca": str(tmp_path / "ca.crt")}}, secure_broker.port,
              "Hostname mismatch"),
             ("plain port", {"tls": {"ca": str(tmp_path / "ca.crt")}}, plain.port, "TLS handshake failed")]
    try:
        for name, mqtt_keys, port, expected in cases:
            run_dir = tmp_path / name.replace(" ", "-")
            run_dir.mkdir()
            cfg = write_config(run_dir, default_pack_dir, enrolled_state, port, {"kind": "synthetic", "count": 2},
                               mqtt={"username": "station", "password": "s3cret pass", **mqtt_keys},
                               explain={"enabled": False})
            with caplog.at_level(logging.WARNING, logger="edge.line.publish"):
                rt = Runtime(load_config(cfg), cfg).start()
                try:
                    wait_until(lambda: rt.health()["broker"]["last_error"], 20, f"{name}: a last_error")
                    error = rt.health()["broker"]["last_error"]
                    assert expected in error and not rt.health()["broker"]["connected"], (name, error)
                finally:
                    rt.stop(timeout=2)
            assert any(expected in r.getMessage() for r in caplog.records), name
            caplog.clear()
    finally:
        plain.stop()
        plain.log.close()
