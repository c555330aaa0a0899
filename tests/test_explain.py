"""edge.explain.worker end to end: real synthetic parts scored by the default pack, explained by its GGUF
(SmolLM2-135M) through the worker; bad input on a tiny random GGUF."""
import dataclasses
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("llama_cpp", reason="needs the llm extra (llama-cpp-python)")

from conftest import TINY_CHAT_TEMPLATE, llm_pack, run_cli  # noqa: E402

from edge.explain.dialogue import DialogueStore  # noqa: E402
from edge.explain.worker import ExplainWorker  # noqa: E402
from edge.explain.findings import Findings, describe  # noqa: E402
from edge.explain.llama_model import LlmError  # noqa: E402
from edge.pack import ConversationSpec  # noqa: E402
from edge.explain.claims import check_claims  # noqa: E402
from edge.explain.questions import FIRST_QUESTION, QuestionError  # noqa: E402
from edge.explain.runtime_words import place_words  # noqa: E402

MM_PER_PIXEL = 0.05
MESSAGE_KEYS = {"part_id", "question", "answer", "verdict", "model_id", "n_tokens", "latency_ms", "time"}


def wait_for(worker: ExplainWorker, done: int, timeout: float = 120.0) -> dict:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        s = worker.stats()
        if s["done"] + s["failed"] >= done and s["queue_depth"] == 0 and not s["busy"]:
            return s
        time.sleep(0.05)
    raise AssertionError(f"worker did not finish {done} parts in {timeout} s: {worker.stats()}")


@pytest.fixture(scope="module")
def line(default_pack, tmp_path_factory):
    """Synthetic parts scored by the default pack: defective ones it flagged, good ones it passed."""
    from edge.scoring.factory import build_scorer
    from edge.station.enrollment import build_state
    from edge.line.synthetic import SyntheticLine

    if default_pack.llm is None:
        pytest.skip("the default pack was exported without its LLM")
    synthetic = SyntheticLine(seed=0, defect_rate=0.5)
    state = build_state(default_pack, synthetic.good(8), seed=0, quiet=True)
    state_dir = state.save(tmp_path_factory.mktemp("station") / "state")
    scorer = build_scorer(default_pack, state)
    flagged, normal = [], []
    for part in synthetic.parts(40):
        result = scorer.score_one(part.image)
        findings = describe(part.image, result, mm_per_pixel=MM_PER_PIXEL)
        if part.defect and result.anomalous and findings.regions:
            flagged.append((part, findings))
        elif not part.defect and not result.anomalous:
            normal.append((part, findings))
        if len(flagged) >= 5 and len(normal) >= 2:
            break
    assert len(flagged) >= 5 and len(normal) >= 2, "the default pack should flag synthetic defects"
    return SimpleNamespace(pack=default_pack, flagged=flagged, normal=normal, state_dir=state_dir)


def test_flagged_part_gets_yes_naming_its_region_normal_part_gets_no(line, tmp_path):
    messages = []
    (part, f), (good, f_good) = line.flagged[0], line.normal[0]
    with DialogueStore(tmp_path / "d.sqlite") as store, ExplainWorker(line.pack, store, messages.append) as worker:
        assert worker.submit(part.part_id, f)
        assert worker.submit(good.part_id, f_good)  # the runtime submits flagged parts only; asked, it says no
        wait_for(worker, 2)
    by_part = {m["part_id"]: m for m in messages}
    assert set(by_part) == {part.part_id, good.part_id}
    yes = by_part[part.part_id]
    assert MESSAGE_KEYS <= set(yes) and yes["verdict"] == "anomalous" and yes["question"] == FIRST_QUESTION
    region = f.regions[0]
    assert yes["answer"].startswith("Yes, there is an anomaly " + place_words(region.place))
    x, y, w, h = region.bbox
    assert part.mask[y:y + h, x:x + w].any(), "the region named is where the defect really is"
    description = yes["answer"].split(".", 1)[1].strip()
    assert description and check_claims(description, f, f.regions[:1]) == []
    no = by_part[good.part_id]
    assert no["answer"].startswith("No, there is no anomaly") and no["verdict"] == "normal"


def test_follow_ups_answer_from_the_findings_and_the_session_survives_a_restart(line, tmp_path):
    part, f = line.flagged[1]
    region = f.regions[0]
    db = tmp_path / "d.sqlite"
    with DialogueStore(db) as store, ExplainWorker(line.pack, store, lambda m: None) as worker:
        worker.submit(part.part_id, f)
        streamed = []
        size = worker.ask(part.part_id, "How big is it?", on_token=streamed.append)
        assert "".join(streamed) == size
        assert f"{region.size_words()}" in size and " mm long and " in size and "mm²" in size
        where = worker.ask(part.part_id, "Where exactly?")
        assert place_words(region.place) in where and region.box_words() in where
    # a restart: new store connection, new worker and llama context
    with DialogueStore(db) as store, ExplainWorker(line.pack, store, lambda m: None) as worker:
        session = store.session(part.part_id)
        assert [q for q, _ in session.exchanges()] == [FIRST_QUESTION, "How big is it?", "Where exactly?"]
        more = worker.ask(part.part_id, "Can you describe it more precisely?")
        assert more and check_claims(more, f) == []
        again = worker.ask(part.part_id, "How large is the defect?")
        assert region.size_words() in again
        assert len(store.session(part.part_id).exchanges()) == 5


def test_full_queue_marks_parts_pending_and_the_worker_completes_them_later(line, tmp_path):
    messages = []
    parts = line.flagged[:4]
    with DialogueStore(tmp_path / "d.sqlite") as store:
        worker = ExplainWorker(line.pack, store, messages.append, queue_size=1)
        accepted = [worker.submit(p.part_id, f) for p, f in parts]  # not started: nothing drains the queue
        assert accepted == [True, False, False, False]
        s = worker.stats()
        assert s["pending"] == 4 and s["queue_depth"] == 1 and s["overflowed"] == 3
        assert [store.session(p.part_id).status for p, _ in parts] == ["pending"] * 4
        with worker:
            s = wait_for(worker, 4)
        assert s["done"] == 4 and s["pending"] == 0 and s["failed"] == 0 and s["last_latency_ms"] > 0
    assert sorted(m["part_id"] for m in messages) == sorted(p.part_id for p, _ in parts)  # each exactly once
    assert all(m["answer"].startswith("Yes, there is an anomaly") for m in messages)


def test_parts_left_pending_by_a_stopped_worker_are_explained_after_a_restart(line, tmp_path):
    part, f = line.flagged[2]
    db = tmp_path / "d.sqlite"
    with DialogueStore(db) as store:
        ExplainWorker(line.pack, store, lambda m: None, queue_size=1).submit(part.part_id, f)  # never started
    messages = []
    with DialogueStore(db) as store, ExplainWorker(line.pack, store, messages.append) as worker:
        wait_for(worker, 1)
    assert [m["part_id"] for m in messages] == [part.part_id]


def test_cli_ask_answers_then_resumes_the_session_in_a_new_process(line, tmp_path):
    import cv2

    part, f = line.flagged[0]
    image = tmp_path / "part.png"
    cv2.imwrite(str(image), part.image)
    args = ("ask", "--pack", line.pack.root, "--state", line.state_dir, "--image", image,
            "--mm-per-pixel", MM_PER_PIXEL, "--db", tmp_path / "d.sqlite")
    first = run_cli(*args, "--question", "How big is it?")
    assert f"> {FIRST_QUESTION}\nYes, there is an anomaly {place_words(f.regions[0].place)}" in first.stdout
    assert f"> How big is it?\nThe anomaly is {f.regions[0].size_words()}." in first.stdout
    second = run_cli(*args, "--question", "Where exactly?")
    assert second.stdout.count(f"> {FIRST_QUESTION}") == 1 and "> How big is it?" in second.stdout
    assert f.regions[0].box_words() in second.stdout
    interactive = run_cli(*args, input="How large is it?\n\n")
    # the stored "How big is it?" answer is replayed, then the new one (the first answer may carry the
    # size too, when the model's own sentence did not pass the check and the findings' one stands in)
    replayed, new = interactive.stdout.split("> How large is it?", 1)
    assert f.regions[0].size_words() in replayed.split("> How big is it?", 1)[1]
    assert new.strip().startswith(f"The anomaly is {f.regions[0].size_words()}.")
    bad = run_cli("ask", "--pack", line.pack.root, "--state", line.state_dir, "--image", image,
                  "--mm-per-pixel", "-1", check=False)
    assert bad.returncode == 2 and "expected a positive number, got '-1'" in bad.stderr


# --- bad input, on a tiny random GGUF ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_chat_gguf(tmp_path_factory):
    pytest.importorskip("gguf", reason="needs the llm extra (gguf)")
    from export.llama_gguf import TINY_WORDS, tiny_random_llama, tiny_vocab

    vocab = dataclasses.replace(tiny_vocab(TINY_WORDS), chat_template=TINY_CHAT_TEMPLATE)
    return tiny_random_llama(tmp_path_factory.mktemp("gguf") / "tiny-chat.gguf", vocab=vocab, context=4096)[0]


def flagged_findings(n_regions: int = 1) -> dict:
    regions = [{"index": i + 1, "place": "upper-right", "bbox": [300, 40, 120, 80], "area_px": 500,
                "area_mm2": 1.25, "length_px": 147.0, "width_px": 4.0, "length_mm": 7.35, "width_mm": 0.2,
                "shape": "elongated", "contrast": "darker", "contrast_delta": -20.0, "severity": 1.3}
               for i in range(n_regions)]
    return Findings.from_dict({"verdict": "anomalous", "score": 0.7, "threshold": 0.55, "severity": 1.27,
                               "regions": regions, "frame_size": [336, 448], "mm_per_pixel": 0.05}).to_dict()


def test_a_gguf_that_fails_to_load_is_named_when_the_worker_starts(tmp_path, tiny_chat_gguf):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(tiny_chat_gguf.read_bytes()[:50_000])
    with DialogueStore(tmp_path / "d.sqlite") as store:
        worker = ExplainWorker(llm_pack(tmp_path / "pack", broken), store, lambda m: None)
        with pytest.raises(LlmError, match=r"llm\.gguf: llama\.cpp could not load this GGUF"):
            worker.start()


def test_bad_questions_and_context_overflow_get_clear_errors_and_the_worker_goes_on(tmp_path, tiny_chat_gguf):
    pack = llm_pack(tmp_path / "pack", tiny_chat_gguf, context_length=1024)
    messages = []
    with DialogueStore(tmp_path / "d.sqlite") as store, ExplainWorker(pack, store, messages.append) as worker:
        worker.submit("huge", flagged_findings(n_regions=40))  # its findings alone overflow 1024 tokens
        worker.submit("ok", flagged_findings())
        wait_for(worker, 2)
        huge = store.session("huge")
        assert huge.status == "failed"
        assert "ContextOverflow" in huge.error and "1024-token context of llm.gguf" in huge.error
        assert store.session("ok").status == "done"
        assert [(m["part_id"], m["status"]) for m in messages] == [("huge", "failed"), ("ok", "done")]
        assert "ContextOverflow" in messages[0]["error"] and messages[0]["answer"] is None
        with pytest.raises(QuestionError, match=r"the question is empty"):
            worker.ask("ok", "   ")
        with pytest.raises(QuestionError, match=r"10000 characters long; at most 500"):
            worker.ask("ok", "x" * 10_000)
        # the random model's words never pass the check: the findings answer instead
        answer = worker.ask("ok", "Can you describe it more precisely?")
        assert "scratch- or crack-like" in answer and "7.3 mm long" in answer
        assert worker.stats()["failed"] == 1


def test_anomalygpt_pack_explains_from_submitted_embeddings(tmp_path):
    pytest.importorskip("gguf", reason="needs the llm extra (gguf)")
    from export.llama_gguf import tiny_random_llama

    gguf, tensors, config, _ = tiny_random_llama(tmp_path / "tiny.gguf")
    pack = llm_pack(tmp_path / "pack", gguf, kind="anomalygpt", n_embd=config["hidden_size"],
                    n_prompt_embeddings=18, conversation=ConversationSpec(), context_length=512)
    rng = np.random.default_rng(0)
    image = rng.standard_normal((1, 64)).astype(np.float32)
    prompts = rng.standard_normal((18, 64)).astype(np.float32)
    messages = []
    with DialogueStore(tmp_path / "d.sqlite") as store, ExplainWorker(pack, store, messages.append) as worker:
        with pytest.raises(LlmError, match=r"needs the image and prompt embeddings"):
            worker.submit("p", flagged_findings())
        worker.submit("p", flagged_findings(), embeddings=(image, prompts))
        worker.submit("bad", flagged_findings(), embeddings=(image, prompts[:5]))
        wait_for(worker, 2)
        assert store.session("bad").status == "failed"
        assert "prompt embeddings have shape (5, 64); the pack says (18, 64)" in store.session("bad").error
    assert [(m["part_id"], m["status"]) for m in messages] == [("p", "done"), ("bad", "failed")]
    assert messages[0]["answer"].startswith("Yes, there is an anomaly in the upper-right corner of the image.")


def test_an_explanation_written_but_not_handed_over_before_a_sigkill_is_handed_over_at_the_next_start(
        tmp_path, tiny_chat_gguf):
    """The worker writes the answer into the dialogue store, then hands the message to the line. A process
    killed between the two must not lose the message: the next worker hands it over, once."""
    import signal
    import subprocess
    import sys

    from conftest import ROOT

    db = tmp_path / "d.sqlite"
    child = f"""
import os, signal, sys, time
sys.path.insert(0, {str(ROOT / 'tests')!r})
from conftest import llm_pack
from test_explain import flagged_findings
from edge.explain.dialogue import DialogueStore
from edge.explain.worker import ExplainWorker
pack = llm_pack(__import__('pathlib').Path({str(tmp_path / 'pack')!r}), {str(tiny_chat_gguf)!r})
store = DialogueStore({str(db)!r})
worker = ExplainWorker(pack, store, lambda message: os.kill(os.getpid(), signal.SIGKILL)).start()
worker.submit("p-1", flagged_findings())
time.sleep(120)
"""
    proc = subprocess.run([sys.executable, "-c", child], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    with DialogueStore(db) as store:
        assert store.get("p-1").status == "done" and store.unreported() == ["p-1"]
        written = next(t.text for t in reversed(store.session("p-1").turns) if t.role == "assistant")
    pack = llm_pack(tmp_path / "pack", tiny_chat_gguf)
    for restart in range(2):
        messages = []
        with DialogueStore(db) as store, ExplainWorker(pack, store, messages.append):
            deadline = time.monotonic() + 60
            while restart == 0 and not messages and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)
        if restart == 0:  # handed over once, with the answer that was written before the kill
            assert [(m["part_id"], m["status"], m["answer"]) for m in messages] == [("p-1", "done", written)]
        else:  # and not again
            assert messages == []
    with DialogueStore(db) as store:
        assert store.unreported() == []
