import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def default_pack_dir(tmp_path_factory) -> Path:
    """The default pack, exported once per test session (weights cached under ~/.cache/anomaly-edge)."""
    from export.default_pack import export_default

    return export_default(tmp_path_factory.mktemp("packs") / "default")


@pytest.fixture(scope="session")
def default_pack(default_pack_dir):
    from edge.pack import load_pack

    return load_pack(default_pack_dir)


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory) -> Path:
    from edge.synthetic import write_mvtec_dataset

    return write_mvtec_dataset(tmp_path_factory.mktemp("data") / "synthetic", n_train=12, n_test_good=8,
                               n_test_per_defect=4, seed=3)


def run_cli(*args, check=True, timeout=300):
    """Run the installed console script as a user would; returns the CompletedProcess."""
    exe = Path(sys.executable).parent / "anomaly-edge"
    cmd = [str(exe) if exe.exists() else sys.executable, *([] if exe.exists() else ["-m", "edge.cli"]), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc
