"""What the LLM is told: the grounded chat (`chat_messages`: the findings in the system message, the
dialogue so far, the question) and two prompt builders for the local engine: `ChatPrompt` (any chat GGUF,
in its own chat template) and `AnomalyGptPrompt` (AnomalyGPT's input: image and prompt-learner embeddings
between Vicuna's `### Human:` / `### Assistant:` text).

It builds prompts only: the runtime's own words are edge.explain.runtime_words', the check of the
model's text edge.explain.claims', and it never runs the model (edge.explain.llama_engine does).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edge.explain.findings import Findings
from edge.explain.llama_engine import Segment
from edge.explain.llama_model import LlamaModel, LlmError
from edge.explain.runtime_words import facts_for_model
from edge.pack import ConversationSpec

SYSTEM_PROMPT = ("You are the inspection assistant on a factory line. A camera inspected one part and the "
                 "measurements below are certain. Describe the defect to a technician in plain words, using "
                 "only these facts. Do not invent places, sizes or defect types. Answer in one short sentence.")

Turn = tuple[str, str]  # (question, answer)


def chat_messages(f: Findings, turns: Sequence[Turn], question: str, system: str = SYSTEM_PROMPT) -> list[dict]:
    """The grounded chat: the findings in the system message, the dialogue so far, the question (the
    local template renders these; a remote server gets them as they are)."""
    msgs = [{"role": "system", "content": f"{system}\n\nFindings:\n{facts_for_model(f)}"}]
    for q, a in turns:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return msgs + [{"role": "user", "content": question}]


class ChatPrompt:
    """A grounded prompt in the GGUF's own chat template: the findings in the system message, the
    dialogue so far, the question, and the start of the answer (written by the runtime)."""

    def __init__(self, model: LlamaModel, system: str = SYSTEM_PROMPT):
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = model.chat_template
        if not template:
            raise LlmError(f"{model.path}: no tokenizer.chat_template in the GGUF metadata "
                           "(a chat pack needs an instruction-tuned model with a chat template)")
        self.model = model
        self.system = system
        self._format = Jinja2ChatFormatter(template=template, eos_token=model.token_text(model.eos),
                                           bos_token=model.token_text(model.bos), add_generation_prompt=True)

    def messages(self, f: Findings, turns: Sequence[Turn], question: str) -> list[dict]:
        return chat_messages(f, turns, question, self.system)

    def tokens(self, f: Findings, turns: Sequence[Turn], question: str, answer_start: str = "") -> list[int]:
        text = self._format(messages=self.messages(f, turns, question)).prompt + answer_start
        return self.model.tokenize(text, add_bos=self.model.add_bos, special=True)

    @property
    def stop(self) -> list[str]:
        return ["\n\n", "<|", "</s>"]


class AnomalyGptPrompt:
    """AnomalyGPT's input: bos, `### Human: <Img>`, the image embedding, `</Img> `, the prompt learner's
    embeddings, the question and `\\n### Assistant:`; earlier turns follow as Vicuna v0 text."""

    def __init__(self, model: LlamaModel, conversation: ConversationSpec, n_prompt_embeddings: int):
        self.model = model
        self.conv = conversation
        self.n_prompt_embeddings = n_prompt_embeddings

    def check_embeddings(self, image: np.ndarray, prompts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n_embd = self.model.n_embd
        image = np.asarray(image, np.float32)
        prompts = np.asarray(prompts, np.float32)
        image = image.reshape(-1, n_embd) if image.ndim == 1 else image
        if image.ndim != 2 or image.shape[1] != n_embd:
            raise LlmError(f"image embedding has shape {image.shape}; {self.model.path.name} needs rows of {n_embd}")
        if prompts.shape != (self.n_prompt_embeddings, n_embd):
            raise LlmError(f"prompt embeddings have shape {prompts.shape}; the pack says "
                           f"({self.n_prompt_embeddings}, {n_embd})")
        return image, prompts

    def segments(self, image: np.ndarray, prompts: np.ndarray, turns: Sequence[Turn], question: str,
                 answer_start: str = "") -> list[Segment]:
        c, tok = self.conv, self.model.tokenize
        image, prompts = self.check_embeddings(image, prompts)
        asked = [q for q, _ in turns] + [question]
        answers = [a for _, a in turns]
        segs: list[Segment] = [[self.model.bos], tok(c.system + c.human + c.image_open), image,
                               tok(c.image_close), prompts]
        text = asked[0] + c.assistant
        for a, q in zip(answers, asked[1:]):
            text += f" {a}\n{c.human}{q}{c.assistant}"
        segs.append(tok(text + (" " + answer_start if answer_start else "")))
        return segs

    @property
    def stop(self) -> list[str]:
        return list(self.conv.stop)
