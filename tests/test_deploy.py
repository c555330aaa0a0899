"""Pack rollout with rollback (edge.station.deploy) on a real Mosquitto, real packs and a real HTTP server: refused
deployments leave the running pack untouched, a good one switches with every step on P/reply, rollback goes
back, and a deployed pack that breaks is left for the previous one at the next start."""
import hashlib
import http.server
import json
import shutil
import tarfile
import threading
import time
from pathlib import Path

import cv2
import pytest
import yaml

from bench.bench_deploy import encoder_only_copy as make_pack
from edge.line.synthetic import SyntheticLine
from mqtt_helpers import Subscriber, wait_until
from station_helpers import start, write_config

PREFIX = "test/s1"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _send(port: int, name: str, body: dict) -> None:
    import paho.mqtt.publish as publish

    publish.single(f"{PREFIX}/cmd/{name}", json.dumps(body), qos=1, hostname="127.0.0.1", port=port)


def _replies(sub: Subscriber, rid: str) -> list[dict]:
    return [r for r in sub.unique_by_topic().get(f"{PREFIX}/reply", []) if r.get("request_id") == rid]


def _command(broker, sub, name: str, body: dict, rid: str, timeout: float = 120) -> list[dict]:
    _send(broker.port, name, {**body, "request_id": rid})
    wait_until(lambda: any(r.get("done") or not r["ok"] for r in _replies(sub, rid)), timeout, f"{name} {rid}")
    return _replies(sub, rid)


def _station(tmp_path, default_pack_dir, enrolled_state, broker, **sections):
    line = SyntheticLine(seed=0, defect_rate=1.0)
    stain = next(p for p in line.parts(20) if p.defect == "stain")
    folder = tmp_path / "frames"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), stain.image)
    return write_config(tmp_path, default_pack_dir, enrolled_state, broker.port,
                        {"kind": "folder", "path": str(folder), "loop": True}, trigger={"mode": "mqtt"},
                        explain={"enabled": False}, **sections)


@pytest.mark.timeout(600)
def test_refused_deployments_leave_the_pack_and_a_good_one_switches_and_rolls_back(
        broker, tmp_path, default_pack_dir, enrolled_state):
    packs = tmp_path / "packs"
    good = make_pack(default_pack_dir, packs / "b", "default-b")
    tampered = make_pack(default_pack_dir, packs / "tampered", "default-t")
    encoder = next(tampered.glob("*.onnx"))
    data = bytearray(encoder.read_bytes())
    data[len(data) // 2] ^= 0xFF
    encoder.write_bytes(bytes(data))

    def bigger(m):
        m["input"]["height"] *= 2
        m["input"]["width"] *= 2
        c, h, w = m["encoder"]["feature_shape"]
        m["encoder"]["feature_shape"] = [c, h * 2, w * 2]
    other_size = make_pack(default_pack_dir, packs / "big", "default-big", bigger)
    strict_state = tmp_path / "strict-state"
    shutil.copytree(enrolled_state, strict_state)
    doc = yaml.safe_load((strict_state / "state.yaml").read_text())
    doc["calibration"]["threshold"] = 1e-6  # every good reference scores above it
    (strict_state / "state.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))

    cfg = _station(tmp_path, default_pack_dir, enrolled_state, broker)
    left_over = tmp_path / "var" / "deploy" / "staging" / "deploy-killed"  # a deployment a kill cut short
    left_over.mkdir(parents=True)
    (left_over / "half.tar.gz").write_bytes(b"\x1f\x8b")
    sub = Subscriber(broker.port, f"{PREFIX}/#")
    rt = start(cfg)
    try:
        wait_until(lambda: rt.health()["broker"]["connected"], 10, "connect")
        time.sleep(0.3)
        original = rt.pack.model_id
        original_sha = rt.pack.manifest_sha256
        _send(broker.port, "trigger", {"part_id": "stain-1"})
        wait_until(lambda: len(sub.unique_by_topic().get(f"{PREFIX}/result", [])) >= 1, 60, "the flagged part")
        assert sub.unique_by_topic()[f"{PREFIX}/result"][0]["verdict"] == "anomalous"

        refused = {
            "wrong-hash": ({"pack": str(good), "sha256": "0" * 64}, "verify", "sha256 of"),
            "tampered": ({"pack": f"file://{tampered}", "sha256": _sha(tampered / "pack.yaml")}, "load",
                         "sha256 of"),
            "other-size": ({"pack": str(other_size), "sha256": _sha(other_size / "pack.yaml")}, "compatible",
                           "input"),
            "strict-state": ({"pack": str(good), "sha256": _sha(good / "pack.yaml"), "state": str(strict_state),
                              "state_sha256": _sha(strict_state / "state.yaml")}, "trial", "good references score"),
            "missing": ({"pack": str(packs / "nowhere"), "sha256": "a" * 64}, "fetch", "no such folder"),
        }
        for rid, (body, step, words) in refused.items():
            final = _command(broker, sub, "deploy", body, rid)[-1]
            assert not final["ok"] and final["step"] == step and words in final["error"], (rid, final)
            assert rt.pack.model_id == original and rt.pack.manifest_sha256 == original_sha, rid
        assert "files.encoder" in _replies(sub, "tampered")[-1]["error"]  # names the changed file
        h, w = rt.pack.input.height, rt.pack.input.width
        assert f"{2 * h}x{2 * w}" in _replies(sub, "other-size")[-1]["error"]
        assert rt.health()["deploy"]["last"]["ok"] is False
        assert not list((Path(rt.config.storage.dir) / "deploy" / "staging").iterdir())  # staging cleaned
        assert not (Path(rt.config.storage.dir) / "deploy" / "packs").exists() or not list(
            (Path(rt.config.storage.dir) / "deploy" / "packs").iterdir())  # nothing refused was kept

        steps = _command(broker, sub, "deploy", {"pack": str(good), "sha256": _sha(good / "pack.yaml")}, "d1")
        assert [s["step"] for s in steps] == ["queued", "fetch", "verified", "loaded", "trial", "switched"], steps
        final = steps[-1]
        assert final["ok"] and final["model_id"] == "default-b" and final["references_failing"] == []
        assert final["references"] == 16 and final["max_reference_score"] < final["threshold"]
        assert final["flagged_scored"] == 1 and final["flagged_still_flagged"] == 1
        h = rt.health()
        assert h["model_id"] == "default-b" and h["pack_sha256"] == _sha(good / "pack.yaml")
        assert h["deploy"]["previous"]["model_id"] == original
        assert h["deploy"]["previous"]["pack_sha256"] == original_sha
        assert Path(h["deploy"]["pack"]).parent == Path(rt.config.storage.dir) / "deploy" / "packs"
        _send(broker.port, "trigger", {"part_id": "stain-2"})
        wait_until(lambda: len(sub.unique_by_topic().get(f"{PREFIX}/result", [])) >= 2, 60, "a part on the new pack")
        assert sub.unique_by_topic()[f"{PREFIX}/result"][1]["model_id"] == "default-b"
        wait_until(lambda: any(json.loads(m.payload).get("model_id") == "default-b" for m in list(sub.messages)
                               if m.topic == f"{PREFIX}/status"), 10, "the status naming the new pack")

        reloaded = rt.reload()  # the config file still names the first pack: the deployed one stays
        assert rt.pack.model_id == "default-b" and "pack" not in reloaded["needs_restart"], reloaded

        steps = _command(broker, sub, "rollback", {}, "r1")
        assert steps[-1]["ok"] and steps[-1]["model_id"] == original, steps
        assert rt.pack.model_id == original and rt.health()["deploy"]["previous"]["model_id"] == "default-b"
        record = json.loads((Path(rt.config.storage.dir) / "deploy" / "active.json").read_text())
        assert record["active"]["model_id"] == original and record["previous"]["model_id"] == "default-b"
    finally:
        rt.stop()
        sub.close()


class _PackServer:
    """Serves files from a folder on loopback; a path under /cut/ sends half the file and hangs up."""

    def __init__(self, root: Path):
        root_dir = root

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                cut = self.path.startswith("/cut/")
                path = root_dir / self.path.rsplit("/", 1)[-1]
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2] if cut else data)
                self.wfile.flush()
                self.close_connection = True

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.timeout(600)
def test_download_over_the_api_and_a_broken_deployed_pack_falls_back_at_start(
        broker, tmp_path, default_pack_dir, enrolled_state):
    from edge.line.api_client import ApiClient, ApiError

    pack = make_pack(default_pack_dir, tmp_path / "packs" / "default-c", "default-c")
    served = tmp_path / "served"
    served.mkdir()
    archive = served / "default-c.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(pack, arcname="default-c")
    server = _PackServer(served)
    cfg = _station(tmp_path, default_pack_dir, enrolled_state, broker)
    rt = start(cfg)
    try:
        original = rt.pack.model_id
        api = ApiClient(Path(rt.config.storage.dir) / "api.sock", timeout=300)
        with pytest.raises(ApiError, match=r"stopped after|IncompleteRead") as cut:
            api.post("/deploy", {"pack": f"{server.url}/cut/default-c.tar.gz", "sha256": _sha(archive)})
        assert cut.value.status == 400 and rt.pack.model_id == original
        with pytest.raises(ApiError, match="sha256 of http"):
            api.post("/deploy", {"pack": f"{server.url}/default-c.tar.gz", "sha256": _sha(pack / "pack.yaml")})
        with pytest.raises(ApiError, match="state and state_sha256 go together"):
            api.post("/deploy", {"pack": str(pack), "sha256": _sha(pack / "pack.yaml"), "state": str(enrolled_state)})
        assert rt.pack.model_id == original

        # An enrollment or reload that replaces the state while the pack is trial-scored: nothing switches.
        from edge.line.commands import DeployCommand
        from edge.station.deploy import DeployError, run_deploy
        from edge.line.station_manager import load_models

        def reload_during_trial(step, **fields):
            if step == "trial":
                rt.reload()
        with pytest.raises(DeployError, match="state changed during the deployment") as raced:
            run_deploy(rt.manager, DeployCommand(pack=str(pack), sha256=_sha(pack / "pack.yaml")), load_models,
                       reload_during_trial)
        assert raced.value.step == "queue" and rt.pack.model_id == original
        assert not (Path(rt.config.storage.dir) / "deploy" / "active.json").exists()

        out = api.post("/deploy", {"pack": f"{server.url}/default-c.tar.gz", "sha256": _sha(archive),
                                   "request_id": "http-1"})
        assert out["step"] == "switched" and out["done"]
        assert out["model_id"] == "default-c" and api.get("/health")["model_id"] == "default-c"
        deployed = Path(out["pack_dir"])
    finally:
        rt.stop()
        server.close()

    # The deployed pack breaks on disk: the next start runs the previous one and says why.
    encoder = next(deployed.glob("*.onnx"))
    data = bytearray(encoder.read_bytes())
    data[100] ^= 0xFF
    encoder.write_bytes(bytes(data))
    rt = start(cfg)
    try:
        h = rt.health()
        assert h["model_id"] == original, h["deploy"]
        assert h["deploy"]["failed"]["model_id"] == "default-c" and "sha256 of" in h["deploy"]["failed"]["error"]
        assert "failed at start" in h["deploy"]["note"]
        with pytest.raises(ApiError, match="nothing to roll back to"):
            ApiClient(Path(rt.config.storage.dir) / "api.sock").post("/rollback", {})
    finally:
        rt.stop()


def test_a_download_over_the_size_limit_or_with_the_wrong_hash_is_refused(tmp_path):
    from edge.station.deploy import DeployError, fetch

    served = tmp_path / "served"
    (served / "p").mkdir(parents=True)
    (served / "p" / "pack.yaml").write_text("model_id: x\n")
    archive = served / "p.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(served / "p", arcname="p")
    server = _PackServer(served)
    try:
        url = f"{server.url}/p.tar.gz"
        with pytest.raises(DeployError, match="over the 10-byte limit") as e:
            fetch(url, _sha(archive), tmp_path / "s1", "pack.yaml", "pack", max_bytes=10)
        assert e.value.step == "download"
        with pytest.raises(DeployError, match=f"sha256 of {url} is {_sha(archive)}") as e:
            fetch(url, "b" * 64, tmp_path / "s2", "pack.yaml", "pack")
        assert e.value.step == "verify"
        with pytest.raises(DeployError, match="must name a .tar.gz"):
            fetch(f"{server.url}/p", _sha(archive), tmp_path / "s3", "pack.yaml", "pack")
        folder = fetch(url, _sha(archive), tmp_path / "s4", "pack.yaml", "pack")
        assert (folder / "pack.yaml").read_text() == "model_id: x\n" and folder.name == "p"
    finally:
        server.close()
