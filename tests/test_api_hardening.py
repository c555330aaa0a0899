"""The local API under hostile or careless clients: the TCP listener's token, Content-Length refused before
reading, read timeouts, clients that hang up, and api.group under the shipped unit's UMask (real runtime,
real sockets, real processes)."""
import http.client
import json
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from edge.line.config import ConfigError, load_config
from mqtt_helpers import free_port, wait_until
from station_helpers import start, write_config

TOKEN = "3f1c0e6a9b7d4e2f8a5c1b0d9e7f6a4b"


def _station(tmp_path, default_pack_dir, enrolled_state, **api):
    (tmp_path / "api-token").write_text(TOKEN + "\n")
    cfg = write_config(tmp_path, default_pack_dir, enrolled_state, 1,
                       {"kind": "synthetic", "seed": 0, "count": None, "fps": 5},
                       mqtt={"enabled": False}, explain={"enabled": False},
                       api={"token_file": str(tmp_path / "api-token"), **api})
    return cfg, start(cfg)


def _raw(port: int, data: bytes, wait_s: float = 5.0) -> tuple[bytes, float]:
    """Send `data` and read until the server closes; (what came back, seconds it took)."""
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as s:
        s.sendall(data)
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
        except (socket.timeout, ConnectionResetError):
            pass
    return got, time.monotonic() - t0


def _get(port: int, path: str, token: str | None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


@pytest.mark.timeout(300)  # the first test also exports the pack
def test_the_tcp_listener_needs_the_token_and_refuses_bad_lengths_before_reading(tmp_path, default_pack_dir,
                                                                                enrolled_state):
    from edge.line.api_client import ApiClient

    port = free_port()
    cfg, rt = _station(tmp_path, default_pack_dir, enrolled_state, tcp_port=port, read_timeout_s=1)
    try:
        assert _get(port, "/health", None)[0] == 401
        assert _get(port, "/health", "not-the-token")[0] == 401
        status, health = _get(port, "/health", TOKEN)
        assert status == 200 and health["station"] == "s1"
        assert ApiClient(tmp_path / "var" / "api.sock").get("/health")["station"] == "s1"  # the socket: no token

        auth = f"Authorization: Bearer {TOKEN}\r\n".encode()
        for length, status in ((b"-1", b"400"), (b"12abc", b"400"), (b"1000000000", b"413")):
            # No body is sent: an answer that came only after reading it would wait for the timeout.
            got, took = _raw(port, b"POST /reload HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: " + length
                             + b"\r\n\r\n")
            assert got.startswith(b"HTTP/1.0 " + status) or got.startswith(b"HTTP/1.1 " + status), (length, got)
            assert took < 0.9, (length, took)  # answered before read_timeout_s, the body left unread
        got, _ = _raw(port, b"POST /reload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n")
        assert b" 401 " in got.split(b"\r\n")[0]  # the token is checked before the body
        for stalled in (b"", b"GET /hea", b"POST /reload HTTP/1.1\r\nHost: x\r\n" + auth
                        + b"Content-Length: 20\r\n\r\n{\"a\""):
            got, took = _raw(port, stalled)
            assert got == b"" and 0.8 < took < 4, (stalled, got, took)  # dropped after read_timeout_s
        assert _get(port, "/health", TOKEN)[0] == 200 and rt._threads[1].is_alive()
    finally:
        rt.stop()
    raw = cfg.read_text().replace(f"token_file: {tmp_path / 'api-token'}", "token_file: null")
    cfg.write_text(raw)
    with pytest.raises(ConfigError, match="api: tcp_port needs token_file"):
        load_config(cfg)


@pytest.mark.timeout(120)
def test_a_client_that_hangs_up_costs_one_log_line_not_a_traceback(tmp_path, default_pack_dir, enrolled_state,
                                                                    caplog, capfd):
    port = free_port()
    _, rt = _station(tmp_path, default_pack_dir, enrolled_state, tcp_port=port)
    n = 6
    try:
        with caplog.at_level(logging.INFO, logger="edge.line.api"):
            for i in range(n):
                s = socket.create_connection(("127.0.0.1", port))
                # Half a request, then a reset (SO_LINGER 0): the server's next read or write fails.
                s.sendall(f"GET /parts?limit=1000 HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n".encode()
                          if i % 2 else b"GET /heal")
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                s.close()
            wait_until(lambda: sum("went away" in r.getMessage() for r in caplog.records) >= 1, 10,
                       "the hang-ups logged")
            time.sleep(0.5)
            assert _get(port, "/health", TOKEN)[0] == 200
    finally:
        rt.stop()
    gone = [r for r in caplog.records if r.name == "edge.line.api" and "went away" in r.getMessage()]
    assert 1 <= len(gone) <= n and all(r.levelno == logging.INFO and not r.exc_info for r in gone)
    assert not [r for r in caplog.records if r.name == "edge.line.api" and r.levelno >= logging.ERROR]
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception occurred during processing" not in err, err


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another user and group")
@pytest.mark.timeout(120)
def test_api_group_reaches_the_socket_under_the_units_umask(tmp_path, default_pack_dir, enrolled_state):
    """UMask=0027 (systemd/anomaly-edge@.service): the socket's folder is made 0750 and root's; with
    api.group the folder and the socket get the group, and a member of it (not the owner) connects."""
    base = Path(tempfile.mkdtemp(dir="/tmp", prefix="edge-api-"))
    base.chmod(0o755)
    sock = base / "run" / "api.sock"
    old = os.umask(0o027)
    try:
        _, rt = _station(tmp_path, default_pack_dir, enrolled_state, socket=str(sock), group="daemon")
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise
    finally:
        os.umask(old)
    try:
        assert sock.stat().st_gid == 1 and sock.parent.stat().st_gid == 1
        assert sock.stat().st_mode & 0o777 == 0o660 and sock.parent.stat().st_mode & 0o010
        assert not sock.parent.stat().st_mode & 0o007  # others still cannot reach it
        client = ("import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
                  "s.sendall(b'GET /health HTTP/1.0\\r\\n\\r\\n'); print(s.recv(15).decode())")
        member = subprocess.run(["/usr/bin/python3", "-c", client, str(sock)], user="nobody", group="daemon",
                                extra_groups=[], capture_output=True, text=True, timeout=30)
        assert member.returncode == 0 and " 200 " in member.stdout, member.stderr
        outsider = subprocess.run(["/usr/bin/python3", "-c", client, str(sock)], user="nobody", group="nogroup",
                                  extra_groups=[], capture_output=True, text=True, timeout=30)
        assert outsider.returncode != 0 and "PermissionError" in outsider.stderr
        for db in (tmp_path / "var").glob("*.sqlite*"):
            assert not db.stat().st_mode & 0o007, (db, oct(db.stat().st_mode))  # not world-readable
    finally:
        rt.stop()
        shutil.rmtree(base, ignore_errors=True)
