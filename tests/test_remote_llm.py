"""Remote explanations (edge.explain.remote_llm) through the explanation worker against real servers on loopback:
llama-cpp-python's own server on the default pack's GGUF (killed mid-stream and brought back, a wrong
key), and a tiny http.server that answers garbage or records what it was sent."""
import http.server
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("llama_cpp", reason="needs the llm extra (llama-cpp-python)")
pytest.importorskip("uvicorn", reason="needs the server extra (uvicorn, fastapi, sse-starlette, ...)")

from conftest import llm_pack  # noqa: E402

from edge.scoring.decide import Result, find_regions, image_score  # noqa: E402
from edge.explain.dialogue import DialogueStore  # noqa: E402
from edge.explain.worker import ExplainWorker  # noqa: E402
from edge.explain.findings import Findings, describe  # noqa: E402
from edge.explain.prompts import chat_messages  # noqa: E402
from edge.explain.questions import FIRST_QUESTION  # noqa: E402
from edge.explain.runtime_words import opening  # noqa: E402
from edge.explain.remote_llm import RemoteFirst, RemoteLlm  # noqa: E402
from mqtt_helpers import free_port, wait_until  # noqa: E402

KEY = "test-key-7f3a"
FRAME = (240, 320)


def flagged_findings(seed: int) -> dict:
    """Findings of a frame with a dark disc, from a scorer-shaped result (edge.explain.findings.describe)."""
    rng = np.random.default_rng(seed)
    frame = np.full(FRAME, 150, np.uint8)
    centre = (int(rng.integers(60, 260)), int(rng.integers(50, 190)))
    cv2.circle(frame, centre, int(rng.integers(12, 30)), 60, -1)
    defect = frame < 100
    anomaly_map = (0.2 + 0.8 * cv2.resize(defect.astype(np.float32), (224, 224), interpolation=cv2.INTER_AREA))
    mask = anomaly_map >= 0.55
    regions = find_regions(anomaly_map, mask, FRAME)
    result = Result(score=image_score(anomaly_map, 0.01), threshold=0.55, anomalous=True, anomaly_map=anomaly_map,
                    mask=mask, regions=regions, frame_size=FRAME)
    return describe(frame, result, mm_per_pixel=0.1).to_dict()


class LlamaServer:
    """`python -m llama_cpp.server` on the GGUF, on a fixed loopback port; killed and started by PID."""

    def __init__(self, gguf: Path, workdir: Path, api_key: str = KEY):
        self.gguf, self.api_key, self.port = gguf, api_key, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(workdir / "llama-server.log", "ab")
        self.process = None

    def start(self) -> "LlamaServer":
        self.process = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(self.gguf), "--host", "127.0.0.1",
             "--port", str(self.port), "--n_threads", "1", "--n_ctx", "2048", "--api_key", self.api_key,
             "--interrupt_requests", "False"],
            stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"llama_cpp.server did not start on {self.port}; see {self.log.name}")
                time.sleep(0.1)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
        self.process = None


@pytest.fixture
def llama_server(smollm_gguf, tmp_path):
    server = LlamaServer(smollm_gguf, tmp_path).start()
    yield server
    server.kill()
    server.log.close()


class TinyServer(http.server.ThreadingHTTPServer):
    """Answers POST /v1/chat/completions with `reply(body) -> bytes` and keeps every request body."""

    def __init__(self, reply, port: int = 0):
        self.reply, self.bodies = reply, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                outer.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                payload = outer.reply(outer.bodies[-1])
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()


def sse(*pieces: str) -> bytes:
    chunks = [{"choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]} for p in pieces]
    return b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


def key_file(tmp_path: Path, key: str = KEY) -> Path:
    path = tmp_path / "llm.key"
    path.write_text(key + "\n")
    return path


def remote_worker(tmp_path, gguf, url, key=None, local=False, retries=1, time_limit_s=20.0):
    pack = llm_pack(tmp_path / "pack", gguf)
    store = DialogueStore(tmp_path / "dialogue.sqlite")
    messages = []
    local_llm = None
    if local:
        from edge.explain.llm_process import LlmProcess

        local_llm = LlmProcess(pack, max_tokens=32, time_limit_s=20)
    answerer = RemoteFirst(RemoteLlm(url, "smollm2", key, time_limit_s=time_limit_s, retries=retries,
                                     retry_backoff_s=0.2, max_tokens=32), local_llm)
    worker = ExplainWorker(pack, store, messages.append, queue_size=8, max_tokens=32, llm=answerer)
    return worker.start(), store, messages


def statuses(store: DialogueStore, ids) -> list[str]:
    return [store.get(i).status for i in ids]


@pytest.mark.timeout(180)
def test_remote_answers_keep_the_runtimes_yes_and_checked_sentences(llama_server, smollm_gguf, tmp_path):
    worker, store, messages = remote_worker(tmp_path, smollm_gguf, llama_server.url, key_file(tmp_path))
    try:
        findings = {f"P-{i}": flagged_findings(i) for i in range(3)}
        for part_id, f in findings.items():
            assert worker.submit(part_id, f)
        wait_until(lambda: len(messages) == 3, 120, "three remote explanations")
        for m in messages:
            assert m["status"] == "done" and m["llm"] == f"smollm2 @ {llama_server.url}"
            assert m["answer"].startswith(opening(Findings.from_dict(findings[m["part_id"]])))
            assert m["source"] in ("findings", "findings+model")
        assert statuses(store, findings) == ["done"] * 3
        remote = worker.stats()["remote"]
        assert remote["up"] and remote["answers"] == 3 and remote["failures"] == 0
    finally:
        worker.stop()
        store.close()


@pytest.mark.timeout(240)
def test_server_killed_mid_stream_leaves_parts_pending_until_it_is_back(llama_server, smollm_gguf, tmp_path):
    worker, store, messages = remote_worker(tmp_path, smollm_gguf, llama_server.url, key_file(tmp_path))
    ids = [f"P-{i}" for i in range(6)]
    try:
        for i, part_id in enumerate(ids[:3]):
            worker.submit(part_id, flagged_findings(i))
        wait_until(lambda: worker.stats()["remote"]["answers"] >= 1 and worker.stats()["busy"], 120,
                   "the worker to be streaming its second answer")
        llama_server.kill()
        for i, part_id in enumerate(ids[3:], start=3):  # the frame side never waits for the server
            t0 = time.monotonic()
            worker.submit(part_id, flagged_findings(i))
            assert time.monotonic() - t0 < 0.2
        wait_until(lambda: worker.stats()["remote"]["failures"] >= 1, 30, "the worker to see the server gone")
        time.sleep(3)
        waiting = [i for i in ids if store.get(i).status == "pending"]
        assert len(waiting) >= 4 and "failed" not in statuses(store, ids)
        assert not any(m["part_id"] in waiting for m in messages)
        llama_server.start()
        wait_until(lambda: statuses(store, ids) == ["done"] * 6, 120, "every part explained after the restart")
        assert sorted(m["part_id"] for m in messages) == ids and all(m["status"] == "done" for m in messages)
        assert worker.stats()["remote"]["up"]
    finally:
        worker.stop()
        store.close()


@pytest.mark.timeout(180)
def test_a_wrong_key_is_named_and_parts_wait_for_the_right_one(llama_server, smollm_gguf, tmp_path):
    key = key_file(tmp_path, "not-the-key")
    worker, store, messages = remote_worker(tmp_path, smollm_gguf, llama_server.url, key)
    try:
        worker.submit("P-1", flagged_findings(1))
        wait_until(lambda: worker.stats()["remote"]["failures"] >= 1, 30, "the refused request")
        remote = worker.stats()["remote"]
        assert "401" in remote["last_error"] and str(key) in remote["last_error"]
        assert store.get("P-1").status == "pending" and messages == []
        key.write_text(KEY)  # read at every request: fixing the file is enough
        # the session is marked done, then its explanation message is handed on: wait for both
        wait_until(lambda: store.get("P-1").status == "done" and messages, 60, "the part explained with the right key")
        assert messages[-1]["status"] == "done"
    finally:
        worker.stop()
        store.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("garbage, error", [
    (lambda body: b"<html>502 Bad Gateway</html>\n", "not a server-sent event"),
    (lambda body: b"data: {\"choices\": 7}\n\n", "not a chat-completions chunk"),
    (lambda body: sse("It looks like a dark", " spot")[:-16], "broke off"),  # no [DONE]
])
def test_a_server_answering_garbage_leaves_the_part_pending(smollm_gguf, tmp_path, garbage, error):
    server = TinyServer(garbage)
    worker, store, messages = remote_worker(tmp_path, smollm_gguf, server.url, retries=1)
    try:
        worker.submit("P-1", flagged_findings(1))
        wait_until(lambda: worker.stats()["remote"]["failures"] >= 1, 20, "the garbage to be refused")
        assert error in worker.stats()["remote"]["last_error"]
        assert len(server.bodies) == 2  # one retry
        assert store.get("P-1").status == "pending" and messages == []
    finally:
        worker.stop()
        store.close()
        server.shutdown()


@pytest.mark.timeout(60)
def test_the_server_gets_the_local_grounded_prompt_and_its_sentences_are_checked(smollm_gguf, tmp_path):
    f = flagged_findings(2)
    # One true sentence, one that names a place the findings do not have: only the first may stay.
    wrong_place = "top-left" if "top-left" not in json.dumps(f) else "bottom-right"
    server = TinyServer(lambda body: sse(" small dark spot.", f" There is a second crack at the {wrong_place}."))
    worker, store, messages = remote_worker(tmp_path, smollm_gguf, server.url)
    try:
        worker.submit("P-2", f)
        wait_until(lambda: len(messages) == 1, 20, "the explanation")
        body = server.bodies[0]
        start = opening(Findings.from_dict(f))
        assert body["messages"] == chat_messages(Findings.from_dict(f), [], FIRST_QUESTION) + [
            {"role": "assistant", "content": start + " It looks like a"}]
        assert body["stream"] is True
        answer = messages[0]["answer"]
        assert answer.startswith(start) and wrong_place not in answer
        assert messages[0]["source"] in ("findings", "findings+model")
    finally:
        worker.stop()
        store.close()
        server.shutdown()


@pytest.mark.timeout(120)
def test_remote_down_falls_back_to_the_local_child(smollm_gguf, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    worker, store, messages = remote_worker(tmp_path, smollm_gguf, url, local=True)
    try:
        worker.submit("P-1", flagged_findings(1))
        worker.submit("P-2", flagged_findings(2))
        wait_until(lambda: len(messages) == 2, 90, "two explanations from the local child")
        assert all(m["status"] == "done" for m in messages)
        stats = worker.stats()
        assert stats["remote"]["local_answers"] == 2 and stats["remote"]["failures"] >= 1
        assert "ConnectionRefusedError" in stats["remote"]["last_error"]
    finally:
        worker.stop()
        store.close()


def test_config_backend_remote(tmp_path):
    import yaml

    from edge.line.config import StationConfig, _resolve_paths

    raw = {"station": {"line": "l1", "name": "s1"}, "pack": "p", "state": "s", "source": {"kind": "synthetic"},
           "explain": {"backend": "remote", "remote": {"url": "http://llm.plant:8000", "api_key_file": "llm.key",
                                                       "retries": 3}}}
    config = StationConfig.model_validate(_resolve_paths(yaml.safe_load(yaml.safe_dump(raw)), tmp_path))
    assert config.explain.remote.api_key_file == tmp_path / "llm.key" and config.explain.remote.retries == 3
    with pytest.raises(ValueError, match="no explain.remote section"):
        StationConfig.model_validate({**raw, "explain": {"backend": "remote"}})
    with pytest.raises(ValueError, match="url"):
        StationConfig.model_validate({**raw, "explain": {"backend": "remote", "remote": {"url": "llm.plant:8000"}}})


@pytest.mark.timeout(300)  # the first test of a session also exports the pack
def test_a_station_with_backend_remote_publishes_explanations_from_the_server(broker, tmp_path, default_pack_dir,
                                                                            enrolled_state):
    """The runtime end to end: a real station (default pack, synthetic parts, real broker) whose
    explanations come from a server that is down at first; the flagged parts wait and are published
    once it answers, with the runtime's yes/no and the server named."""
    from mqtt_helpers import Subscriber, retained
    from station_helpers import start, write_config

    port = free_port()
    key = key_file(tmp_path)
    sub = Subscriber(broker.port, "test/s1/#")
    rt = start(write_config(tmp_path, default_pack_dir, enrolled_state, broker.port,
                            {"kind": "synthetic", "seed": 0, "defect_rate": 0.5, "count": 16},
                            explain={"backend": "remote", "remote": {"url": f"http://127.0.0.1:{port}",
                                                                     "model": "plant-llm", "api_key_file": str(key),
                                                                     "retries": 0}}))
    server = None
    try:
        wait_until(lambda: len(sub.unique_by_topic().get("test/s1/result", [])) >= 16, 90, "16 results")
        flagged = {r["part_id"] for r in sub.unique_by_topic()["test/s1/result"] if r["verdict"] == "anomalous"}
        assert flagged
        wait_until(lambda: (retained(broker.port, "test/s1/status").get("explain") or {}).get("remote", {})
                   .get("failures", 0) >= 1, 30, "the status to show the server down")
        assert sub.unique_by_topic().get("test/s1/explanation", []) == []
        assert rt.explainer.stats()["pending"] == len(flagged) and rt.explainer.worker_pid is None

        server = TinyServer(lambda body: sse(" dark spot."), port)  # the server comes up
        wait_until(lambda: len(sub.unique_by_topic().get("test/s1/explanation", [])) >= len(flagged), 90,
                   "an explanation for every flagged part")
        messages = sub.unique_by_topic()["test/s1/explanation"]
        assert {m["part_id"] for m in messages} == flagged
        for m in messages:
            assert m["status"] == "done" and m["answer"].startswith("Yes") and m["llm"] == f"plant-llm @ http://127.0.0.1:{port}"
        assert all(b["messages"][-1]["content"].startswith("Yes") for b in server.bodies)
    finally:
        rt.stop()
        sub.close()
        if server is not None:
            server.shutdown()
