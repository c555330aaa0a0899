"""The shipped unit passes `systemd-analyze verify`; the install script is valid shell."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "anomaly-edge@.service"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_unit_verifies(tmp_path):
    # Point ExecStart at this checkout's console script, which exists here (/opt/... does not).
    exe = Path(sys.executable).parent / "anomaly-edge"
    unit = tmp_path / "anomaly-edge@test.service"
    unit.write_text(UNIT.read_text().replace("/opt/anomaly-edge/venv/bin/anomaly-edge", str(exe)))
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr


def test_unit_is_a_watched_notify_service_with_a_sandbox():
    text = UNIT.read_text()
    for line in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "User=anomaly-edge", "NoNewPrivileges=yes",
                 "ProtectSystem=strict", "ExecReload=/bin/kill -HUP $MAINPID"):
        assert line in text, line


def test_install_script_is_valid_shell():
    assert subprocess.run(["sh", "-n", str(ROOT / "systemd" / "install.sh")]).returncode == 0
