"""What the LLM is told, and what the runtime says itself.

Small models cannot be trusted with a verdict or a number (docs/explanations.md), so an answer is
put together here from three kinds of text:

- the opening, written by the runtime from the scorer's verdict: "Yes, there is an anomaly in the
  upper-right of the image." or "No, there is no anomaly ...";
- facts a technician needs exactly (size, where) answered from the findings, never by the model;
- description by the model, grounded in the findings, each sentence checked against them
  (`check_claims`); a sentence that names another place, another tone, a number the findings do not
  hold or denies the verdict is dropped, and the findings' own words stand in.

Two prompt builders feed the engine: `ChatPrompt` (any chat GGUF, in its own chat template, the
findings in the system message) and `AnomalyGptPrompt` (AnomalyGPT's input: image and prompt-learner
embeddings between Vicuna's `### Human:` / `### Assistant:` text).
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from .findings import Findings, RegionFinding, _num, _pair
from .llm import LlamaModel, LlmError, Segment
from .pack import ConversationSpec

FIRST_QUESTION = "Is there an anomaly in the image?"
MAX_QUESTION_CHARS = 500

SYSTEM_PROMPT = ("You are the inspection assistant on a factory line. A camera inspected one part and the "
                 "measurements below are certain. Describe the defect to a technician in plain words, using "
                 "only these facts. Do not invent places, sizes or defect types. Answer in one short sentence.")

Turn = tuple[str, str]  # (question, answer)


class QuestionError(LlmError):
    """A question the runtime will not put to the model (empty, too long)."""


# --- questions -------------------------------------------------------------------------------------------

def clean_question(question) -> str:
    """The question, trimmed and with chat-control markup defused; QuestionError if empty or too long."""
    if not isinstance(question, str):
        raise QuestionError(f"a question must be text, got {type(question).__name__}")
    q = " ".join(question.split())
    if not q:
        raise QuestionError("the question is empty")
    if len(q) > MAX_QUESTION_CHARS:
        raise QuestionError(f"the question is {len(q)} characters long; at most {MAX_QUESTION_CHARS} are accepted")
    # A question must not close the user turn or open a new one (chat tokens, Vicuna's ###).
    return q.replace("<|", "<").replace("|>", ">").replace("</s>", "").replace("<s>", "").replace("###", "#")


_SIZE = re.compile(r"\b(how (big|large|long|wide|small)|size|sized|dimensions?|area|length|width|measure\w*|mm)\b",
                   re.I)
_WHERE = re.compile(r"\b(where|location|located|locate|position|which (side|corner|part|region))\b", re.I)
_IS_THERE = re.compile(r"\b(is|are|any)\b.*\b(anomal\w*|defect\w*|fault\w*|flaw\w*|problem\w*|wrong)\b", re.I)


def intent(question: str) -> str:
    """'size', 'where', 'verdict' or 'describe' (anything else: the model answers)."""
    if _SIZE.search(question):
        return "size"
    if _WHERE.search(question):
        return "where"
    if _IS_THERE.search(question):
        return "verdict"
    return "describe"


# --- what the runtime says itself ---------------------------------------------------------------------

_PLACE_PHRASES = {"upper-left": "in the upper-left corner", "upper": "at the top",
                  "upper-right": "in the upper-right corner", "left": "on the left side",
                  "centre": "in the centre", "right": "on the right side",
                  "lower-left": "in the lower-left corner", "lower": "at the bottom",
                  "lower-right": "in the lower-right corner"}


def place_words(place: str) -> str:
    """'in the upper-right corner of the image' for a findings place (a cell of a 3x3 grid)."""
    return _PLACE_PHRASES.get(place, f"in the {place} part") + " of the image"


def opening(f: Findings) -> str:
    """The yes/no sentence, from the verdict alone."""
    s, t = _pair_words(f)
    if f.verdict != "anomalous":
        return f"No, there is no anomaly in the image: the score {s} is below the threshold {t}."
    if not f.regions:
        return (f"Yes, there is an anomaly: the score {s} is above the threshold {t}, "
                "but no region is large enough to locate.")
    more = "" if len(f.regions) == 1 else f" (the largest of {len(f.regions)} anomalous regions)"
    return f"Yes, there is an anomaly {place_words(f.regions[0].place)}{more}."


def region_description(r: RegionFinding, f: Findings) -> str:
    """One sentence from the findings: what it looks like, how big, how bright."""
    return f"It is {r.shape_words}, {r.size_words()}, {r.tone_words(f.contrast_basis)}."


def fact_answer(f: Findings, kind: str) -> str | None:
    """Answers that come from the findings, never from the model: size and where. None: not such a
    question."""
    if kind not in ("size", "where"):
        return None
    if f.verdict != "anomalous":
        return "There is no anomaly on this part, so there is nothing to " + \
            ("measure." if kind == "size" else "locate.")
    if not f.regions:
        return "The anomaly is spread out: no region is large enough to " + \
            ("measure." if kind == "size" else "locate.")
    out = []
    for r in f.regions:
        name = "The anomaly" if len(f.regions) == 1 else f"Region {r.index}"
        if kind == "size":
            out.append(f"{name} is {r.size_words()}.")
        else:
            out.append(f"{name} is {place_words(r.place)}, at {r.box_words()}.")
    if kind == "size" and f.mm_per_pixel is None:
        out.append("Sizes are in pixels: the station has no mm-per-pixel scale.")
    return " ".join(out)


def fallback_description(f: Findings) -> str:
    """What stands in when the model's words do not hold up."""
    if f.verdict != "anomalous" or not f.regions:
        return ""
    return " ".join([region_description(f.regions[0], f)]
                    + [f"Region {r.index}, {place_words(r.place)}, is {r.shape_words} and {r.size_words()}."
                       for r in f.regions[1:]])


def facts_for_model(f: Findings) -> str:
    """The findings as short statements for the system message."""
    s, t = _pair_words(f)
    if f.verdict != "anomalous":
        return f"Verdict: normal (score {s}, threshold {t}). There is no defect."
    lines = [f"Verdict: anomalous (score {s}, threshold {t}). Anomalous regions: {len(f.regions)}."]
    for r in f.regions:
        lines.append(f"Region {r.index} is {place_words(r.place)}. Shape: {r.shape}, {r.shape_words}. "
                     f"Size: {r.size_words()}. Brightness: {r.tone_words(f.contrast_basis)}.")
    return "\n".join(lines)


def _pair_words(f: Findings) -> tuple[str, str]:
    return _pair(f.score, f.threshold)


# --- checking what the model said ----------------------------------------------------------------------

_PLACE_WORDS = {"upper": "upper", "top": "upper", "lower": "lower", "bottom": "lower", "left": "left",
                "right": "right", "centre": "centre", "center": "centre", "middle": "centre", "central": "centre"}
_TONE_WORDS = {"darker": "darker", "dark": "darker", "brighter": "brighter", "bright": "brighter",
               "lighter": "brighter", "light": "brighter"}
_ELONGATED_WORDS = ("scratch", "crack", "line", "elongated", "streak")
_COMPACT_WORDS = ("spot", "dent", "hole", "blob", "stain", "compact", "dot")
_DENIAL = re.compile(r"\b(no|not any|without)\s+(visible\s+)?(anomal|defect|damage)"
                     r"|\bnot (an? )?(anomal\w*|defect\w*|visible|dent|spot|hole|scratch|crack|stain)\b"
                     r"|\b(looks|is|appears) (normal|fine|ok|good)\b", re.I)
_AFFIRM = re.compile(r"\b(there is|there are|has|shows|with) (an? |some )?(visible )?(anomal|defect|scratch|crack|"
                     r"dent|hole|stain|spot)", re.I)
_NUMBER = re.compile(r"(?<![\w.])\d+(?:[.,]\d+)?")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _known_numbers(f: Findings) -> list[float]:
    nums = [f.score, f.threshold, f.severity, float(len(f.regions)), 3.0]  # 3: the grid the places come from
    for r in f.regions:
        nums += [r.index, r.area_px, r.length_px, r.width_px, r.severity, *r.bbox,
                 r.bbox[0] + r.bbox[2], r.bbox[1] + r.bbox[3]]
        nums += [v for v in (r.area_mm2, r.length_mm, r.width_mm) if v is not None]
    return [float(v) for v in nums if v is not None and np.isfinite(v)]


def _number_known(value: float, known: list[float]) -> bool:
    return any(abs(value - k) <= max(0.06 * abs(k), 0.051) or _num(k) == _num(value) for k in known)


def check_claims(text: str, f: Findings, regions: Sequence[RegionFinding] | None = None) -> list[str]:
    """What in `text` the findings do not support (empty: nothing wrong found). Places, tones and shapes
    are checked against `regions` (default: all of them; the first answer is about the largest only)."""
    regions = f.regions if regions is None else regions
    problems = []
    words = re.findall(r"[a-z]+", text.lower())
    anomalous = f.verdict == "anomalous"
    if anomalous and _DENIAL.search(text):
        problems.append("denies the anomaly")
    if not anomalous and _AFFIRM.search(text):
        problems.append("claims a defect on a normal part")
    places = {p for r in regions for p in r.place.split("-")}
    for w in words:
        if w in _PLACE_WORDS and _PLACE_WORDS[w] not in places:
            problems.append(f"place '{w}' is not where the findings are")
    tones = {r.contrast for r in regions}
    for w in words:
        if w in _TONE_WORDS and _TONE_WORDS[w] not in tones:
            problems.append(f"'{w}' but the region is {'/'.join(sorted(tones)) or 'absent'}")
    shapes = {r.shape for r in regions}
    if shapes and "elongated" not in shapes and any(w.startswith(_ELONGATED_WORDS) for w in words):
        problems.append("calls a compact region scratch-like")
    if shapes and "compact" not in shapes and any(w.startswith(_COMPACT_WORDS) for w in words):
        problems.append("calls an elongated region spot-like")
    known = _known_numbers(f)
    for m in _NUMBER.finditer(text):
        value = float(m.group().replace(",", "."))
        if not _number_known(value, known):
            problems.append(f"number {m.group()} is not in the findings")
    return problems


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def checked_description(text: str, f: Findings, max_sentences: int = 1,
                        regions: Sequence[RegionFinding] | None = None) -> tuple[str, list[str]]:
    """The model's first sentences that hold up against the findings, and what was wrong with the rest."""
    kept, problems = [], []
    for s in sentences(text):
        if len(kept) >= max_sentences:
            break
        if not s.endswith((".", "!", "?")) or len(s.split()) < 3:
            problems.append(f"unfinished or too short: {s!r}")
            continue
        wrong = check_claims(s, f, regions)
        if wrong:
            problems.append(f"{s!r}: " + "; ".join(wrong))
        else:
            kept.append(s)
    return " ".join(kept), problems


# --- prompts ---------------------------------------------------------------------------------------------

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
