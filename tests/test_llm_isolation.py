"""The LLM can crash, the line must not: a portable llama.cpp build, and llama.cpp in a supervised child
process (edge.explain.llm_process) whose crashes and hangs cost one answer.

Crashes are real signals in the real child: sent from the test, or raised by the child itself at a
chosen point through its drill hook (ANOMALY_EDGE_LLM_FAULT)."""
import dataclasses
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp", reason="needs the llm extra (llama-cpp-python)")

from conftest import ROOT, TINY_CHAT_TEMPLATE, llm_pack, run_cli  # noqa: E402
from llm_child import decode_in_child, quantize_in_child, system_info_in_child  # noqa: E402

from edge.explain.dialogue import DialogueStore, Session  # noqa: E402
from edge.explain.worker import ExplainWorker  # noqa: E402
from edge.explain.findings import Findings  # noqa: E402
from edge.explain.llama_model import LlmError  # noqa: E402
from edge.explain.llm_child import FAULT_ENV  # noqa: E402
from edge.explain.llm_process import LlmCrashed, LlmHung, LlmProcess  # noqa: E402
from edge.explain.questions import FIRST_QUESTION  # noqa: E402


@pytest.fixture(scope="module")
def tiny_chat_gguf(tmp_path_factory):
    pytest.importorskip("gguf", reason="needs the llm extra (gguf)")
    from export.llama_gguf import TINY_WORDS, tiny_random_llama, tiny_vocab

    vocab = dataclasses.replace(tiny_vocab(TINY_WORDS), chat_template=TINY_CHAT_TEMPLATE)
    return tiny_random_llama(tmp_path_factory.mktemp("gguf") / "tiny-chat.gguf", vocab=vocab, context=4096)[0]


def flagged(part_id: str = "p1") -> Session:
    findings = Findings.from_dict({
        "verdict": "anomalous", "score": 0.7, "threshold": 0.55, "severity": 1.27, "frame_size": [336, 448],
        "mm_per_pixel": 0.05,
        "regions": [{"index": 1, "place": "upper-right", "bbox": [300, 40, 120, 80], "area_px": 500,
                     "area_mm2": 1.25, "length_px": 147.0, "width_px": 4.0, "length_mm": 7.35, "width_mm": 0.2,
                     "shape": "elongated", "contrast": "darker", "contrast_delta": -20.0, "severity": 1.3}]})
    return Session(part_id, findings.to_dict(), "pending", time.time(), time.time())


def wait_for(predicate, timeout: float, what: str):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# --- the build ------------------------------------------------------------------------------------------

def test_installed_llama_cpp_is_the_portable_build():
    info = system_info_in_child()
    record = Path(sys.prefix) / "llama-cpp-build.txt"
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip(f"portable x86-64 flags checked on x86-64 only (this is {platform.machine()}); llama.cpp: {info}")
    # What a native build on an AMX/AVX-512 Xeon compiles in, and what SIGILLs on other boxes.
    for feature in ("AMX_INT8", "AVX512", "AVX_VNNI"):
        assert f"{feature} = 1" not in info, f"llama.cpp was built with {feature}: {info}"
    assert "AVX2 = 1" in info and "FMA = 1" in info, info
    if record.is_file():  # installed by scripts/build-llama-cpp.sh (make install)
        assert "flavour=portable" in record.read_text() and "-DGGML_NATIVE=OFF" in record.read_text()


def test_q4_1_and_q4_k_m_models_decode_in_a_child_process(smollm_gguf, tmp_path):
    q4_1 = decode_in_child(smollm_gguf)
    assert q4_1["finite"] and q4_1["generated"] >= 1 and q4_1["file_type"] == "3"  # LLAMA_FTYPE_MOSTLY_Q4_1
    q4_k_m = quantize_in_child(smollm_gguf, tmp_path / "smollm2-q4_k_m.gguf")
    k = decode_in_child(q4_k_m)
    assert k["finite"] and k["generated"] >= 1 and k["file_type"] == "15"  # LLAMA_FTYPE_MOSTLY_Q4_K_M


# --- the child process ---------------------------------------------------------------------------------

def test_the_child_answers_exactly_as_the_engine_in_this_process(smollm_gguf, tmp_path):
    from edge.explain.explainer import Explainer

    pack = llm_pack(tmp_path / "pack", smollm_gguf)
    session = flagged()
    local = Explainer(pack)
    try:
        expected = local.answer(session, FIRST_QUESTION)
    finally:
        local.close()
    streamed = []
    with LlmProcess(pack, nice=0) as llm:
        assert llm.pid != os.getpid() and llm.info["model"]
        got = llm.answer(session, FIRST_QUESTION, on_token=streamed.append)
    assert got.text == expected.text and got.source == expected.source
    assert "".join(streamed).strip() == got.text.strip()


@pytest.mark.parametrize("sig", [signal.SIGSEGV, signal.SIGILL, signal.SIGABRT, signal.SIGKILL])
def test_a_signal_in_the_child_mid_answer_is_named_and_a_new_child_answers(tiny_chat_gguf, tmp_path, sig):
    pack = llm_pack(tmp_path / "pack", tiny_chat_gguf, context_length=4096)
    llm = LlmProcess(pack, nice=0, max_tokens=400).start()
    try:
        with pytest.raises(LlmCrashed, match=rf"killed by {sig.name}") as crash:
            llm.answer(flagged(), FIRST_QUESTION, on_token=lambda _: os.kill(llm.pid, sig))
        assert crash.value.signal_name == sig.name and not llm.alive
        llm.start()
        assert llm.answer(flagged(), "How big is it?").text
    finally:
        llm.close()


def test_a_cancelled_answer_ends_promptly_and_the_child_lives_on(tiny_chat_gguf, tmp_path):
    from edge.explain.answers import Cancelled

    pack = llm_pack(tmp_path / "pack", tiny_chat_gguf, context_length=4096)
    cancel = threading.Event()
    with LlmProcess(pack, nice=0, max_tokens=2000, time_limit_s=60) as llm:
        pid = llm.pid
        with pytest.raises(Cancelled, match="cancelled"):
            llm.answer(flagged(), FIRST_QUESTION, on_token=lambda _: cancel.set(), cancel=cancel)
        assert llm.alive and llm.pid == pid
        assert llm.answer(flagged(), "How big is it?").text


def test_a_child_that_stops_answering_is_killed_after_its_time_limit(tiny_chat_gguf, tmp_path):
    pack = llm_pack(tmp_path / "pack", tiny_chat_gguf, context_length=4096)
    llm = LlmProcess(pack, nice=0, max_tokens=400, time_limit_s=1.0, hang_grace_s=1.0).start()
    try:
        t0 = time.monotonic()
        with pytest.raises(LlmHung, match="sent nothing for too long"):
            llm.answer(flagged(), FIRST_QUESTION, on_token=lambda _: os.kill(llm.pid, signal.SIGSTOP))
        assert time.monotonic() - t0 < 10 and not llm.alive
    finally:
        llm.close()


def test_a_gguf_that_does_not_load_is_a_plain_error_not_a_crash(tiny_chat_gguf, tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(tiny_chat_gguf.read_bytes()[:50_000])
    with pytest.raises(LlmError, match=r"llama\.cpp could not load this GGUF") as e:
        LlmProcess(llm_pack(tmp_path / "pack", broken)).start()
    assert not isinstance(e.value, LlmCrashed)


# --- the worker ----------------------------------------------------------------------------------------

def test_worker_retries_a_crashed_explanation_once_then_fails_it_and_says_why(tiny_chat_gguf, tmp_path,
                                                                             monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "SIGSEGV@token")  # every child dies at its first answer
    pack = llm_pack(tmp_path / "pack", tiny_chat_gguf, context_length=4096)
    messages = []
    with DialogueStore(tmp_path / "d.sqlite") as store:
        worker = ExplainWorker(pack, store, messages.append, max_crashes=10).start()
        worker.BACKOFF_S = (0.1,)
        try:
            worker.submit("p1", flagged().findings)
            wait_for(lambda: store.session("p1").status == "failed", 60, "p1 to be failed")
            s = worker.stats()
            assert s["crashes"] == 2 and s["restarts"] >= 1 and s["state"] in ("running", "restarting")
            assert "SIGSEGV" in store.session("p1").error and "2 times" in store.session("p1").error
            assert [m["status"] for m in messages] == ["failed"] and "SIGSEGV" in messages[0]["error"]
            assert messages[0]["answer"] is None
        finally:
            worker.stop()


def test_worker_replaces_a_hung_child_and_the_part_is_explained_on_retry(tiny_chat_gguf, tmp_path):
    pack = llm_pack(tmp_path / "pack", tiny_chat_gguf, context_length=4096)
    messages = []
    with DialogueStore(tmp_path / "d.sqlite") as store:
        worker = ExplainWorker(pack, store, messages.append, time_limit_s=2.0, max_tokens=2000,
                               hang_grace_s=1.0).start()
        worker.BACKOFF_S = (0.1,)
        try:
            first_pid = worker.worker_pid
            worker.submit("p1", flagged().findings)
            wait_for(lambda: worker.stats()["busy_part"] == "p1", 30, "p1 to be in progress")
            os.kill(first_pid, signal.SIGSTOP)
            wait_for(lambda: store.session("p1").status == "done", 60, "p1 explained after the restart")
            s = worker.stats()
            assert s["crashes"] == 1 and s["restarts"] == 1 and worker.worker_pid not in (None, first_pid)
            assert "sent nothing for too long" in s["last_crash"]
            assert [m["status"] for m in messages] == ["done"]
        finally:
            worker.stop()


def test_a_backlog_and_a_gguf_that_crashes_every_child_turn_explanations_off_not_the_caller(
        tiny_chat_gguf, tmp_path, monkeypatch):
    pack = llm_pack(tmp_path / "pack", tiny_chat_gguf, context_length=4096)
    db = tmp_path / "d.sqlite"
    with DialogueStore(db) as store:
        for i in range(6):  # left pending by an earlier run
            store.open_session(f"p{i}", flagged().findings)
    monkeypatch.setenv(FAULT_ENV, "SIGILL@token")
    for run in range(2):  # the service restarted with the same backlog: progress, no crash loop
        with DialogueStore(db) as store:
            worker = ExplainWorker(pack, store, lambda m: None, max_crashes=3).start()
            worker.BACKOFF_S = (0.1,)
            try:
                wait_for(lambda: worker.stats()["state"] == "off", 60, "explanations to turn off")
                s = worker.stats()
                assert "failed 3 times in a row" in s["error"] and "SIGILL" in s["error"]
                with pytest.raises(Exception, match="explanations are off"):
                    worker.ask("p0", "How big is it?")
            finally:
                worker.stop()
            counts = store.counts()
            assert counts["done"] == 0 and counts["failed"] + counts["pending"] == 6
    assert counts["failed"] >= 2  # each part at most 2 attempts across both runs


def test_stop_during_a_stuck_answer_kills_the_child_and_leaves_the_part_pending(tiny_chat_gguf, tmp_path,
                                                                             monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "hang@token")
    pack = llm_pack(tmp_path / "pack", tiny_chat_gguf, context_length=4096)
    with DialogueStore(tmp_path / "d.sqlite") as store:
        worker = ExplainWorker(pack, store, lambda m: None, time_limit_s=60).start()
        pid = worker.worker_pid
        worker.submit("long", flagged().findings)
        wait_for(lambda: worker.stats()["busy_part"] == "long", 30, "the part to be in progress")
        time.sleep(0.3)
        t0 = time.monotonic()
        worker.stop(timeout=30)
        assert time.monotonic() - t0 < 10
        assert store.session("long").status == "pending" and store.counts()["failed"] == 0
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


# --- the shell command -----------------------------------------------------------------------------------

def test_cli_ask_with_a_crashing_engine_prints_one_line_naming_the_signal(default_pack_dir, enrolled_state,
                                                                         tmp_path, monkeypatch):
    from edge.pack import load_pack

    if load_pack(default_pack_dir, verify_hashes=False).llm is None:
        pytest.skip("the default pack was exported without its LLM")
    from edge.line.synthetic import SyntheticLine
    import cv2

    part = next(p for p in SyntheticLine(seed=0, defect_rate=1.0).parts(5) if p.defect)
    image = tmp_path / "part.png"
    cv2.imwrite(str(image), part.image)
    monkeypatch.setenv(FAULT_ENV, "SIGILL@token")
    proc = run_cli("ask", "--pack", default_pack_dir, "--state", enrolled_state, "--image", image,
                   "--db", tmp_path / "d.sqlite", "--question", "How big is it?", check=False)
    assert proc.returncode == 3, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "SIGILL" in errors[0] and "illegal instruction" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


class SlowAnswerer:
    """An answerer whose first explanation of `slow_part` runs until cancelled (or 60 s): the long
    backlog explanation a technician's question must not wait behind. Everything else answers at once.
    It stands in for the LLM process, which is not what this test is about (the worker's order is)."""

    kind, name, pid, alive = "chat", "slow", 4242, True

    def __init__(self, slow_part: str):
        self.slow_part, self.calls, self.cancelled = slow_part, [], 0

    def start(self):
        self.alive = True

    def kill(self):
        self.alive = False

    def close(self, timeout: float = 2.0):
        self.alive = False

    def answer(self, session, question, on_token=None, cancel=None):
        from edge.explain.answers import Answer, Cancelled

        self.calls.append((session.part_id, question))
        if session.part_id == self.slow_part and session.status == "pending":
            t0 = time.monotonic()
            while time.monotonic() - t0 < 60:
                if cancel is not None and cancel.is_set():
                    self.cancelled += 1
                    raise Cancelled(f"part {session.part_id}: explanation cancelled")
                time.sleep(0.01)
        return Answer(f"answer to {question!r} about {session.part_id}", "findings")


def test_a_technicians_question_goes_ahead_of_a_long_backlog_explanation(tmp_path):
    class _Pack:  # what the worker reads of a pack when it is handed its answerer
        model_id, llm, root = "test", None, tmp_path

    slow = SlowAnswerer("backlog-1")
    with DialogueStore(tmp_path / "d.sqlite") as store:
        worker = ExplainWorker(_Pack(), store, lambda m: None, llm=slow).start()
        try:
            worker.submit("asked-1", flagged("asked-1").findings)
            wait_for(lambda: store.session("asked-1").status == "done", 10, "asked-1 explained")
            worker.submit("backlog-1", flagged("backlog-1").findings)
            wait_for(lambda: worker.stats()["busy_part"] == "backlog-1", 10, "the backlog part in progress")
            slow.slow_part = None  # the answer in progress keeps running; its next try finishes at once
            t0 = time.monotonic()
            text = worker.ask("asked-1", "What does it look like?", timeout=20)
            waited = time.monotonic() - t0
            assert "asked-1" in text and waited < 5, waited  # not the 60 s the backlog answer would take
            assert slow.cancelled == 1 and worker.stats()["preempted"] == 1
            wait_for(lambda: store.session("backlog-1").status == "done", 10, "backlog-1 explained after the question")
        finally:
            worker.stop()
