"""Answers about a flagged part, as every answerer gives them: owns `Answer`, `Cancelled`, `Answerer`, `grounded_answer`
(the runtime's opening and facts from the findings, the model's description through `SentenceGate`, the
sentence-by-sentence check as the text streams) and `respond` (an answer recorded in the part's session).

    answer = grounded_answer(session, "How big is it?", on_token=print, describe=run_the_model)

It runs no model itself: `describe` is the local engine's (edge.explain.explainer) or the remote
server's (edge.explain.remote_llm); it never imports either, nor the worker that queues parts.
"""
from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from edge.errors import EdgeError
from edge.explain.claims import checked_description, sentences
from edge.explain.dialogue import DialogueStore, Session
from edge.explain.findings import Findings
from edge.explain.questions import clean_question, intent, region_reference
from edge.explain.runtime_words import (fact_answer, fallback_description, missing_regions, opening, place_words,
                                        region_description)

DESCRIPTION_START = " It looks like a"  # the model continues the runtime's opening from here
FOLLOW_UP_SENTENCES = 2


@dataclass
class Answer:
    text: str
    source: str                   # "findings" (runtime only) or "findings+model"
    n_tokens: int = 0             # tokens the model generated
    compute_ms: float = 0.0
    ttft_ms: float | None = None  # first model token
    stop_reason: str | None = None
    rejected: list[str] = field(default_factory=list)  # model sentences dropped by the check, and why
    regions: list[int] = field(default_factory=list)   # the regions the answer is about (1-based)
    model_sentences: int = 0      # sentences of the model's that were checked ...
    kept_sentences: int = 0       # ... and how many of them held up and were shown


class Cancelled(EdgeError):
    """An explanation was interrupted (the worker is stopping); the part stays pending."""


class Answerer(Protocol):
    """What answers about a part: edge.explain.explainer.Explainer (in this process),
    edge.explain.llm_process.LlmProcess (its child), edge.explain.remote_llm.RemoteLlm / RemoteFirst."""

    def answer(self, session: Session, question: str, on_token: Callable[[str], None] | None = None,
               cancel: threading.Event | None = None) -> Answer: ...


def respond(answerer: Answerer, store: DialogueStore, part_id: str, question: str,
            on_token: Callable[[str], None] | None = None, cancel: threading.Event | None = None) -> Answer:
    """Answer `question` in the part's stored session with `answerer` and record the exchange; a pending
    session becomes done."""
    session = store.session(part_id)
    answer = answerer.answer(session, question, on_token, cancel)
    store.add_turn(part_id, "user", clean_question(question))
    store.add_turn(part_id, "assistant", answer.text, {"source": answer.source, "n_tokens": answer.n_tokens,
                                                       "compute_ms": answer.compute_ms,
                                                       "rejected": answer.rejected, "regions": answer.regions})
    if session.status != "done":
        store.set_status(part_id, "done")
    return answer


def answer_focus(question: str, f: Findings, session: Session, kind: str) -> tuple[list, str | None]:
    """The regions an answer is about, and the answer itself when the question names a region the part
    does not have. A question that names a region (number, ordinal, superlative, place, "all of them")
    moves the dialogue there; one that does not stays on the region of the last answer ("it"); the
    first explanation is about the largest region; size and place questions without any of that get
    every region."""
    if f.verdict != "anomalous" or not f.regions:
        return [], None
    refs = region_reference(question, f)
    if refs is not None:
        missing = missing_regions(f, refs)
        return [r for r in f.regions if r.index in refs], missing
    if kind == "verdict":
        return f.regions[:1], None
    for turn in reversed(session.turns):
        if turn.role == "assistant" and turn.meta.get("regions"):
            wanted = set(turn.meta["regions"])
            return [r for r in f.regions if r.index in wanted], None
    if kind in ("kind", "tone") or (kind == "where" and intent_is_yes_no(question)):
        return f.regions[:1], None  # "is it ...?" before any answer: the largest, as the first answer says
    return list(f.regions), None


def intent_is_yes_no(question: str) -> bool:
    return bool(re.match(r"\s*(is|are|does|do|was|could)\b", question, re.I))


def grounded_answer(session: Session, question: str, on_token: Callable[[str], None] | None, describe) -> Answer:
    """The runtime's answer: facts and the yes/no from the findings, and where the question wants a
    description, the model's text through the sentence check (findings' own words if none holds up).
    `describe(question, model_start, gate)` runs the model, feeding its text to `gate.feed`, and returns
    (n_tokens, ttft_ms, stop_reason); the local engine and the remote server (edge.explain.remote_llm) share this."""
    t0 = time.monotonic()
    q = clean_question(question)
    f = Findings.from_dict(session.findings)
    emit = on_token or (lambda _: None)
    kind = intent(q)
    focus, missing = answer_focus(q, f, session, kind)
    regions = [r.index for r in focus]
    facts = missing or fact_answer(f, kind, focus, q)
    if facts is not None:
        emit(facts)
        return Answer(facts, "findings", compute_ms=_ms(t0), regions=regions)
    if f.verdict != "anomalous" or not f.regions:
        text = opening(f)
        emit(text)
        return Answer(text, "findings", compute_ms=_ms(t0), regions=regions)
    if kind == "verdict":
        start, n_sentences = opening(f), 1
        fallback = region_description(f.regions[0], f)
    else:
        start, n_sentences = "", FOLLOW_UP_SENTENCES
        fallback = fallback_description(f, focus)
        if len(focus) == 1 and len(f.regions) > 1:  # the runtime says which region the answer is about
            start = f"Region {focus[0].index} is {place_words(focus[0].place)}."
            fallback = region_description(focus[0], f)
    if start:
        emit(start)
    model_start = (start + DESCRIPTION_START) if kind == "verdict" else start
    gate = SentenceGate(f, focus, n_sentences, emit, lead=" " if start else "",
                         prefix=DESCRIPTION_START.strip() if kind == "verdict" else "", shown=start)
    n_tokens, ttft_ms, stop_reason = describe(q, model_start, gate)
    described = gate.close()
    if stop_reason == "cancelled":
        raise Cancelled(f"part {session.part_id}: explanation cancelled")
    source = "findings+model" if described else "findings"
    if not described:
        gate.emit_text(fallback)
        described = fallback
    text = " ".join(s for s in (start, described) if s)
    return Answer(text, source, n_tokens=n_tokens, compute_ms=_ms(t0), ttft_ms=ttft_ms, stop_reason=stop_reason,
                  rejected=gate.problems, regions=regions, model_sentences=gate.judged,
                  kept_sentences=len(gate.kept))


class SentenceGate:
    """Passes the model's text on sentence by sentence, only sentences that hold up against the findings."""

    def __init__(self, f: Findings, regions, max_sentences: int, emit, lead: str, prefix: str, shown: str = ""):
        self.f, self.regions, self.max, self.emit = f, regions, max_sentences, emit
        self.shown = {_same_words(s) for s in sentences(shown)}
        self.lead, self.buffer = lead, prefix
        self.kept: list[str] = []
        self.problems: list[str] = []
        self.judged = 0

    def feed(self, piece: str) -> None:
        self.buffer += piece
        done = sentences(self.buffer)
        if len(done) > 1:  # all but the last are complete
            for s in done[:-1]:
                self._judge(s)
            self.buffer = done[-1]

    def _judge(self, sentence: str) -> None:
        if len(self.kept) >= self.max:
            return
        self.judged += 1
        if _same_words(sentence) in self.shown:
            self.problems.append(f"{sentence!r}: repeats what the answer says already")
            return
        kept, problems = checked_description(sentence, self.f, 1, self.regions)
        self.problems += problems
        if kept:
            self.emit_text(kept)
            self.kept.append(kept)

    def emit_text(self, text: str) -> None:
        self.shown.add(_same_words(text))
        self.emit(self.lead + text)
        self.lead = " "

    def fresh_message(self) -> None:
        """The model began a message of its own instead of continuing the runtime's opening (a server
        that does not continue a final assistant message): its text is judged without the prefix."""
        if not self.kept and not self.problems:
            self.buffer = ""

    def close(self) -> str:
        if self.buffer.strip():
            self._judge(self.buffer.strip())
        self.buffer = ""
        return " ".join(self.kept)


def _same_words(sentence: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", sentence.lower()))


def _ms(t0: float) -> float:
    return round((time.monotonic() - t0) * 1000, 1)
