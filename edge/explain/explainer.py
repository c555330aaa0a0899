"""The local answerer: `Explainer` answers one question in a part's session with the pack's GGUF on
llama.cpp in this process (it owns the llama context and the prompt builder; it runs inside the LLM child
process, edge.explain.llm_child, so a native crash costs one answer).

    explainer = Explainer(pack, n_threads=1, max_tokens=48)
    answer = explainer.answer(session, "Is there an anomaly?", on_token=print)

What the answer says and how the model's text is checked is edge.explain.answers'; the queue, the
child process and its supervision are edge.explain.worker's and edge.explain.llm_process'.
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

import numpy as np

from edge.explain.answers import Answer, SentenceGate, grounded_answer, respond
from edge.explain.dialogue import DialogueStore, Session
from edge.explain.findings import Findings
from edge.explain.llama_engine import ContextOverflow, LlamaEngine
from edge.explain.llama_model import LlamaModel, LlmError
from edge.explain.prompts import AnomalyGptPrompt, ChatPrompt
from edge.pack import Pack

log = logging.getLogger(__name__)


def lower_thread_priority(nice: int) -> None:
    """Raise this thread's nice value (Linux: per thread, inherited by llama.cpp's compute threads it
    starts), so that on a busy CPU the frame loop wins the cores and the LLM takes what is left."""
    if nice <= 0:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (AttributeError, OSError) as e:  # not Linux, or not permitted: run at normal priority
        log.info("explain worker keeps its priority (%s)", e)


class Explainer:
    """Answers questions about a part from its session. Owns one llama context: use from one thread."""

    def __init__(self, pack: Pack, n_threads: int = 1, max_tokens: int = 48, time_limit_s: float = 20.0,
                 repeat_penalty: float = 1.1):
        spec = pack.llm
        if spec is None:
            raise LlmError(f"pack {pack.model_id} ({pack.root}) has no llm section: it cannot explain parts")
        self.pack = pack
        self.max_tokens = int(max_tokens)
        self.time_limit_s = float(time_limit_s)
        self.repeat_penalty = repeat_penalty
        self.model = LlamaModel(pack.file(spec.file))
        try:
            self.engine = LlamaEngine(self.model, n_ctx=spec.context_length, n_threads=n_threads)
            if spec.kind == "chat":
                self.prompt = ChatPrompt(self.model)
            else:
                if self.model.n_embd != spec.n_embd:
                    raise LlmError(f"{self.model.path}: n_embd {self.model.n_embd}, but the pack's llm.n_embd is "
                                   f"{spec.n_embd}")
                self.prompt = AnomalyGptPrompt(self.model, spec.conversation, spec.n_prompt_embeddings)
        except BaseException:
            self.close()
            raise

    @property
    def kind(self) -> str:
        return self.pack.llm.kind

    def answer(self, session: Session, question: str, on_token: Callable[[str], None] | None = None,
               cancel: threading.Event | None = None) -> Answer:
        """The answer to `question` in the session (not stored: the caller records the turn)."""
        def describe(q: str, model_start: str, gate: SentenceGate):
            g = self.engine.generate(self._segments(session, q, model_start), max_tokens=self.max_tokens,
                                     time_limit_s=self.time_limit_s, cancel=cancel, on_token=gate.feed,
                                     stop=self.prompt.stop, repeat_penalty=self.repeat_penalty)
            return len(g.tokens), None if np.isnan(g.ttft_s) else g.ttft_s * 1000, g.stop_reason

        return grounded_answer(session, question, on_token, describe)

    def respond(self, store: DialogueStore, part_id: str, question: str,
                on_token: Callable[[str], None] | None = None, cancel: threading.Event | None = None) -> Answer:
        """Answer in the part's stored session and record the exchange (a pending session becomes done)."""
        return respond(self, store, part_id, question, on_token, cancel)

    def _segments(self, session: Session, question: str, answer_start: str):
        f = Findings.from_dict(session.findings)
        turns = session.exchanges()
        while True:
            if self.kind == "chat":
                segs = [self.prompt.tokens(f, turns, question, answer_start)]
            else:
                if session.embeddings is None:
                    raise LlmError(f"part {session.part_id}: no image and prompt embeddings were submitted, "
                                   "and this AnomalyGPT pack needs them")
                segs = self.prompt.segments(*session.embeddings, turns, question, answer_start)
            n = sum(len(s) for s in segs)
            if n + self.max_tokens <= self.engine.n_ctx or not turns:
                break
            turns = turns[1:]  # the oldest exchange goes first; the findings always stay
        if n + self.max_tokens > self.engine.n_ctx:
            raise ContextOverflow(f"part {session.part_id}: the prompt takes {n} tokens and the answer up to "
                                  f"{self.max_tokens}, more than the {self.engine.n_ctx}-token context of "
                                  f"{self.model.path.name}")
        return segs

    def close(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()
        self.model.close()
