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

import math
import re
from collections.abc import Sequence

import numpy as np

from edge.explain.findings import Findings, RegionFinding, _num, _pair
from edge.explain.llm import LlamaModel, LlmError, Segment
from edge.pack import ConversationSpec

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


_SIZE = re.compile(r"\b(how (big|large|long|wide|small|thick)|size|sized|dimensions?|area|length|width|measure\w*|mm)\b",
                   re.I)
_WHERE = re.compile(r"\b(where|location|located|locate|position|coordinates?|which (side|corner|part))\b", re.I)
_IS_THERE = re.compile(r"\b(is|are|any)\b.*\b(anomal\w*|defect\w*|fault\w*|flaw\w*|problem\w*|wrong)\b", re.I)
_DISPOSITION = re.compile(
    r"\b(scrap\w*|rework\w*|re-work\w*|ship\w*|reject\w*|discard\w*|throw\w*|bin it|keep it|release\w*|sell|"
    r"deliver\w*|accept\w*|pass(ed|es)?|fail(ed|s)?|usable|repair\w*|good enough|quarantine\w*|"
    r"should (i|we)|(can|may|must) (i|we)|do (i|we) (need|have) to|"
    r"is (it|this|the part|this part) (ok|okay|fine|good|safe|acceptable|bad))\b", re.I)
_COUNT = re.compile(r"\bhow many\b|\bnumber of (regions|defects|anomalies|spots)\b|\bcount\b", re.I)
_TONE_Q = re.compile(r"\b(dark\w*|bright\w*|light(er)?|colou?r|shade|brightness|contrast)\b", re.I)
_KIND_WORDS = {"scratch": "elongated", "scratches": "elongated", "crack": "elongated", "cracks": "elongated",
               "line": "elongated", "streak": "elongated", "cut": "elongated", "score": "elongated",
               "spot": "compact", "dent": "compact", "hole": "compact", "stain": "compact", "blob": "compact",
               "dot": "compact", "pit": "compact", "bump": "compact", "speck": "compact", "smudge": "compact"}
_KIND_Q = re.compile(r"\b(what (kind|type|sort)|which (kind|type)|kind of|type of|what is (it|this|that)|"
                     r"what does it look like|(is|are) (it|this|that|they|region \d+) (an? )?(\w+))\b", re.I)
_PLACE_Q = re.compile(r"^\s*(is|are) (it|this|that|they|the \w+|region \d+) (on|in|at|near|towards?) (the )?", re.I)

# A question's reference to one region: "region 2", "R2", "#2", "the second one", "the smallest", "the one
# in the upper-left".
_REGION_NUMBER = re.compile(r"\b(?:region|regions|r|area|defect|anomaly|spot|number|no\.?)\s*#?\s*(\d+)\b|#(\d+)\b",
                            re.I)
_ORDINALS = {"first": 1, "1st": 1, "second": 2, "2nd": 2, "third": 3, "3rd": 3, "fourth": 4, "4th": 4,
             "fifth": 5, "5th": 5, "sixth": 6, "6th": 6}
_ORDINAL_REF = re.compile(r"\b(" + "|".join(_ORDINALS) + r")\b\s*(one|region|defect|anomaly|spot|area)?", re.I)
_PLACE_PHRASE = (r"((?:upper|top|lower|bottom)[\s-]*(?:left|right)|(?:left|right)[\s-]*(?:upper|top|lower|bottom)"
                 r"|upper|top|lower|bottom|left|right|centre|center|middle)")
_PLACE_REF = re.compile(r"\b(?:one|region|defect|anomaly|spot|mark|area)\s+(?:in|at|on|near)\s+the\s+"
                        + _PLACE_PHRASE + r"|\b(?:what|how) about the\s+" + _PLACE_PHRASE
                        + r"|\band the\s+" + _PLACE_PHRASE + r"|\bthe\s+" + _PLACE_PHRASE
                        + r"\s+(?:one|region|defect|anomaly|spot|mark|area)\b", re.I)
_ALL_REF = re.compile(r"\b(they|them|their|all|each|every|both|others|regions|defects|anomalies|spots)\b", re.I)
_SUPERLATIVE_REF = {"largest": ("area_px", max), "biggest": ("area_px", max), "smallest": ("area_px", min),
                    "tiniest": ("area_px", min), "longest": ("length_px", max), "shortest": ("length_px", min),
                    "widest": ("width_px", max), "narrowest": ("width_px", min), "thinnest": ("width_px", min),
                    "worst": ("severity", max), "most severe": ("severity", max)}
_SUPERLATIVE_Q = re.compile(r"\b(" + "|".join(_SUPERLATIVE_REF) + r")\b", re.I)


def intent(question: str) -> str:
    """What kind of question it is: 'disposition' (scrap, rework, ship, should I...), 'count', 'size',
    'where', 'kind' (is it a scratch?), 'tone' (is it darker?), 'verdict', or 'describe' (the model
    answers). All but 'verdict' and 'describe' are answered from the findings alone."""
    if _DISPOSITION.search(question):
        return "disposition"
    if _COUNT.search(question):
        return "count"
    if _SIZE.search(question):
        return "size"
    if _WHERE.search(question) or _PLACE_Q.search(question):
        return "where"
    if _IS_THERE.search(question):
        return "verdict"
    if _asked_kind(question) is not None or re.search(r"\b(what (kind|type|sort)|which (kind|type)|kind of|"
                                                      r"type of)\b", question, re.I):
        return "kind"
    if _TONE_Q.search(question) and re.match(r"\s*(is|are|how|what|which)\b", question, re.I):
        return "tone"
    return "describe"


def _asked_kind(question: str) -> str | None:
    """The defect word of a yes/no kind question ('Is it a scratch?' -> 'scratch'), or None."""
    m = re.search(r"\b(?:is|are|was|could|does|looks?)\b[^?.!]*?\b(" + "|".join(_KIND_WORDS) + r")\b", question, re.I)
    return m.group(1).lower() if m else None


def _place_name(phrase: str) -> str:
    words = re.findall(r"[a-z]+", phrase.lower())
    norm = [{"top": "upper", "bottom": "lower", "center": "centre", "middle": "centre"}.get(w, w) for w in words]
    vertical = [w for w in norm if w in ("upper", "lower")]
    horizontal = [w for w in norm if w in ("left", "right")]
    if vertical and horizontal:
        return f"{vertical[0]}-{horizontal[0]}"
    return (vertical or horizontal or norm)[0]


def region_reference(question: str, f: Findings) -> list[int] | None:
    """The region numbers a question names ('region 2', 'the second one', 'the smallest', 'the one in the
    upper-left', 'all of them'); None when it names none. Numbers may be out of range (the caller says so)."""
    named = [int(a or b) for a, b in _REGION_NUMBER.findall(question)]
    if named:
        return sorted(set(named))
    m = _ORDINAL_REF.search(question)
    if m and (m.group(2) or re.search(r"\bthe\s+" + m.group(1), question, re.I)):
        return [_ORDINALS[m.group(1).lower()]]
    picked = []
    for m in _SUPERLATIVE_Q.finditer(question) if f.regions else ():
        key, pick = _SUPERLATIVE_REF[m.group(1).lower()]
        target = pick(getattr(r, key) for r in f.regions)
        picked.append(next(r.index for r in f.regions if getattr(r, key) == target))
    if picked:
        return sorted(set(picked))
    m = _PLACE_REF.search(question)
    if m:
        place = _place_name(next(g for g in m.groups() if g))
        exact = [r.index for r in f.regions if r.place == place]
        loose = [r.index for r in f.regions if set(place.split("-")) <= set(r.place.split("-"))]
        return exact or loose or [0]  # 0: no region there
    if _ALL_REF.search(question):
        return [r.index for r in f.regions]
    return None


# --- what the runtime says itself ---------------------------------------------------------------------

_PLACE_PHRASES = {"upper-left": "in the upper-left corner", "upper": "at the top",
                  "upper-right": "in the upper-right corner", "left": "on the left side",
                  "centre": "in the centre", "right": "on the right side",
                  "lower-left": "in the lower-left corner", "lower": "at the bottom",
                  "lower-right": "in the lower-right corner"}
RUNTIME_ONLY = ("disposition", "count", "size", "where", "kind", "tone")  # intents the model never answers


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


def region_name(r: RegionFinding, f: Findings) -> str:
    """'The anomaly' when the part has one region, else 'Region 2'."""
    return "The anomaly" if len(f.regions) == 1 else f"Region {r.index}"


def verdict_words(f: Findings) -> str:
    """The station's verdict with its score and threshold, in one sentence."""
    s, t = _pair_words(f)
    if f.verdict != "anomalous":
        return f"The station's verdict is normal: the score {s} is below the threshold {t}, so the part was not flagged."
    n = len(f.regions)
    located = f"{n} anomalous region{'s' if n != 1 else ''}" if n else "no region large enough to locate"
    return (f"The station's verdict is anomalous: the score {s} is at or above the threshold {t}, "
            f"so the part was flagged, with {located}.")


def missing_regions(f: Findings, refs: Sequence[int]) -> str | None:
    """The answer when a question names a region the findings do not have; None when all exist."""
    have = {r.index for r in f.regions}
    bad = [i for i in refs if i not in have]
    if not bad:
        return None
    if f.verdict != "anomalous":
        return "There is no anomaly on this part, so it has no regions."
    n = len(f.regions)
    missing = "no anomalous region there" if bad == [0] else f"no region {bad[0]}"
    if not n:
        return f"There is {missing}: no region of the anomaly is large enough to locate."
    listing = "; ".join(f"region {r.index} {place_words(r.place)}" for r in f.regions)
    return f"There is {missing}: this part has {n} anomalous region{'s' if n != 1 else ''} ({listing})."


def fact_answer(f: Findings, kind: str, focus: Sequence[RegionFinding] | None = None,
                question: str = "") -> str | None:
    """Answers that come from the findings, never from the model (the intents in RUNTIME_ONLY), about
    the regions in `focus` (default: all). None: not such a question."""
    if kind not in RUNTIME_ONLY:
        return None
    regions = list(f.regions if focus is None else focus)
    if kind == "disposition":
        out = [verdict_words(f), "Whether to scrap, rework or ship a part is decided by your line's procedure "
                                 "and the people responsible for it, not by this assistant."]
        if f.verdict == "anomalous":
            out += [r.sentence(f.contrast_basis) for r in f.regions]
        return " ".join(out)
    if f.verdict != "anomalous":
        return {"count": "There is no anomaly on this part: the count of anomalous regions is zero.",
                "size": "There is no anomaly on this part, so there is nothing to measure.",
                "where": "There is no anomaly on this part, so there is nothing to locate.",
                "kind": "There is no anomaly on this part, so there is no defect to name.",
                "tone": "There is no anomaly on this part, so there is no region to compare."}[kind]
    if not f.regions:
        return "The anomaly is spread out: no region is large enough to " + \
            {"count": "count", "size": "measure", "where": "locate", "kind": "describe", "tone": "compare"}[kind] + "."
    if kind == "count":
        n = len(f.regions)
        listing = "; ".join(f"region {r.index} {place_words(r.place)}" for r in f.regions)
        return (f"There is 1 anomalous region, {place_words(f.regions[0].place)}." if n == 1
                else f"There are {n} anomalous regions: {listing}.")
    out = []
    for r in regions:
        name = region_name(r, f)
        if kind == "size":
            out.append(f"{name} is {r.size_words()}.")
        elif kind == "where":
            out.append(_yes_no(_place_asked(question), r.place) +
                       f"{name} is {place_words(r.place)}, at {r.box_words()}.")
        elif kind == "tone":
            out.append(_yes_no(_tone_asked(question), r.contrast) + f"{name} is {r.tone_words(f.contrast_basis)}.")
        else:
            out.append(_kind_answer(r, f, _asked_kind(question)))
    if kind == "size" and f.mm_per_pixel is None:
        out.append("Sizes are in pixels: the station has no mm-per-pixel scale.")
    if kind == "kind":
        out.append("The station measures shape, size and brightness; it does not tell the cause.")
    return " ".join(out)


def _yes_no(asked: str | None, actual: str) -> str:
    if asked is None:
        return ""
    return "Yes. " if asked == actual or (asked in actual.split("-") and "-" in actual) else "No. "


def _place_asked(question: str) -> str | None:
    if not _PLACE_Q.search(question):
        return None
    m = re.search(_PLACE_PHRASE, question[_PLACE_Q.search(question).end():], re.I)
    return _place_name(m.group(1)) if m else None


def _tone_asked(question: str) -> str | None:
    m = re.match(r"\s*(is|are)\b[^?]*?\b(dark\w*|bright\w*|light\w*)", question, re.I)
    if not m:
        return None
    return "darker" if m.group(2).lower().startswith("dark") else "brighter"


def _kind_answer(r: RegionFinding, f: Findings, asked: str | None) -> str:
    name = region_name(r, f)
    facts = f"{name} is {r.shape} ({r.shape_words}), {r.size_words()}, {r.tone_words(f.contrast_basis)}."
    if asked is None:
        return facts
    if _KIND_WORDS[asked] == r.shape:
        return f"Its shape fits a {asked}: {facts[0].lower() + facts[1:]}"
    other = "elongated" if r.shape == "compact" else "compact"
    return (f"No, not by its shape: a {asked} would be {other}, and {name[0].lower() + name[1:]} "
            f"is {r.shape} ({r.shape_words}), {r.size_words()}, {r.tone_words(f.contrast_basis)}.")


def fallback_description(f: Findings, focus: Sequence[RegionFinding] | None = None) -> str:
    """What stands in when the model's words do not hold up: the findings' own sentence per region."""
    regions = list(f.regions if focus is None else focus)
    if f.verdict != "anomalous" or not regions:
        return ""
    if len(regions) == 1 and (len(f.regions) == 1 or regions[0] is f.regions[0]):
        return region_description(regions[0], f)
    return " ".join(f"Region {r.index}, {place_words(r.place)}, is {r.shape_words}, {r.size_words()}, "
                    f"{r.tone_words(f.contrast_basis)}." for r in regions)


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
_DENIAL = re.compile(r"^\W*no\b[,.!]|\b(no|not any|without)\s+(visible\s+)?(anomal|defect|damage)"
                     r"|\bnot (an? )?(anomal\w*|defect\w*|visible|dent|spot|hole|scratch|crack|stain)\b"
                     r"|\b(looks|is|appears) (normal|fine|ok|good)\b", re.I)
_AFFIRM = re.compile(r"\b(there is|there are|has|shows|with) (an? |some )?(visible )?(anomal|defect|scratch|crack|"
                     r"dent|hole|stain|spot)", re.I)
_ADVICE = re.compile(r"\b(scrap\w*|rework\w*|ship\w*|reject\w*|discard\w*|throw\w*|repair\w*|replace\w*|"
                     r"you should|you must|you can|should be|must be|needs? to be|recommend\w*|safe|acceptable)\b",
                     re.I)
_CAUSE = re.compile(r"\b(caused|formed|made|created|produced|left) by\b|\b(due to|result of|because of|"
                    r"probably|likely|maybe|perhaps|might be|could be)\b", re.I)
_COMPARATIVE = re.compile(r"\b(larger|bigger|smaller|longer|shorter|wider|narrower|thinner|thicker|deeper|"
                          r"more severe|less severe|same size|similar size|twice|half)\b", re.I)
_ONLY = re.compile(r"\b(the only|only one|single|sole|one and only)\b", re.I)
_COUNTED = re.compile(r"\b(\d+|one|two|three|four|five|six|seven|eight|nine|ten)\s+(?:anomalous\s+|separate\s+|"
                      r"distinct\s+|different\s+)?(regions?|areas?|defects?|anomalies|anomaly|spots?|places?)\b", re.I)
_NUMBER_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
                 "nine": 9, "ten": 10}
_NAMED_REGION = re.compile(r"\b(?:region|r)\s*#?\s*(\d+)\b", re.I)
_MEASURE = re.compile(r"(?<![\w.])(\d+(?:[.,]\d+)?)\s*(mm²|mm2|mm\^2|square mm|sq\.? ?mm|px²|px2|square pixels|"
                      r"mm|millimet\w*|px|pixels?|%|percent|cm|µm|um|microns?|inch\w*)?"
                      r"(?:\s+(long|in length|length|wide|in width|width|across|thick|deep))?", re.I)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _shown(value: float) -> set[float]:
    """The values a number may be written as: the findings' own display, and the exact value when whole."""
    out = {float(_num(value))}
    if float(value).is_integer():
        out.add(float(value))
    return out


def _global_numbers(f: Findings) -> set[float]:
    s, t = _pair(f.score, f.threshold)
    out = {float(s), float(t), float(len(f.regions))}
    for v in (f.score, f.threshold, f.severity):
        if math.isfinite(v):
            out |= _shown(v)
    return out


def _region_numbers(r: RegionFinding) -> dict[str, set[float]]:
    """What each kind of number may be, for this region only."""
    def of(*values):
        return set().union(*(_shown(v) for v in values if v is not None and math.isfinite(v)))

    x, y, w, h = r.bbox
    return {"mm_long": of(r.length_mm), "mm_wide": of(r.width_mm), "mm": of(r.length_mm, r.width_mm),
            "mm2": of(r.area_mm2), "px": of(r.length_px, r.width_px, x, y, w, h, x + w, y + h),
            "px2": of(r.area_px),
            "any": of(r.length_mm, r.width_mm, r.area_mm2, r.length_px, r.width_px, r.area_px, r.severity,
                      x, y, w, h, x + w, y + h)}


def _number_problems(text: str, f: Findings, r: RegionFinding | None) -> list[str]:
    """Each number in `text` must be exactly one of the region's (of the right kind: length, width, area,
    pixels) or one of the part's (score, threshold, severity, region count)."""
    known = _region_numbers(r) if r is not None else {k: set() for k in
                                                      ("mm_long", "mm_wide", "mm", "mm2", "px", "px2", "any")}
    glob = _global_numbers(f)
    problems = []
    for m in _MEASURE.finditer(text):
        raw, unit, dim = m.group(1), (m.group(2) or "").lower(), (m.group(3) or "").lower()
        value = float(raw.replace(",", "."))
        if unit in ("mm²", "mm2", "mm^2", "square mm") or unit.startswith("sq"):
            allowed = known["mm2"]
        elif unit.startswith(("mm", "millimet")):
            allowed = known["mm_long"] if dim in ("long", "in length", "length") else \
                known["mm_wide"] if dim in ("wide", "in width", "width", "across", "thick") else known["mm"]
            if f.mm_per_pixel is None:
                problems.append(f"{m.group().strip()!r}: the station has no mm-per-pixel scale")
                continue
        elif unit in ("px²", "px2", "square pixels"):
            allowed = known["px2"]
        elif unit.startswith(("px", "pixel")):
            allowed = known["px"]
        elif unit:
            problems.append(f"{m.group().strip()!r}: the findings give no {unit}")
            continue
        else:
            allowed = known["any"] | glob
        if not any(abs(value - k) < 1e-9 for k in allowed):
            what = f"{raw} {unit} {dim}".split()
            problems.append(f"number {' '.join(what)} is not in the findings"
                            + (f" of region {r.index}" if r is not None and len(f.regions) > 1 else ""))
    return problems


def _region_problems(text: str, words: list[str], f: Findings, r: RegionFinding | None) -> list[str]:
    """What in `text` does not hold for region `r` (None: the part has no located region)."""
    problems = []
    places = set(r.place.split("-")) if r is not None else set()
    for w in words:
        if w in _PLACE_WORDS and _PLACE_WORDS[w] not in places:
            problems.append(f"place '{w}' is not where the findings are")
    for w in words:
        if w in _TONE_WORDS and (r is None or _TONE_WORDS[w] != r.contrast):
            problems.append(f"'{w}' but the region is {r.contrast if r is not None else 'absent'}")
    if r is not None and r.shape != "elongated" and any(w.startswith(_ELONGATED_WORDS) for w in words):
        problems.append("calls a compact region scratch-like")
    if r is not None and r.shape != "compact" and any(w.startswith(_COMPACT_WORDS) for w in words):
        problems.append("calls an elongated region spot-like")
    for m in _SUPERLATIVE_Q.finditer(text):
        key, pick = _SUPERLATIVE_REF[m.group(1).lower()]
        if r is None or getattr(r, key) != pick(getattr(o, key) for o in f.regions):
            problems.append(f"'{m.group(1)}' is not true of region {r.index if r else '?'}")
    if _COMPARATIVE.search(text):
        problems.append(f"compares ('{_COMPARATIVE.search(text).group(1)}'): only the findings' numbers may do that")
    if _ONLY.search(text) and len(f.regions) != 1:
        problems.append(f"says '{_ONLY.search(text).group(1)}' but there are {len(f.regions)} regions")
    for m in _COUNTED.finditer(text):
        said = m.group(1).lower()
        n = int(said) if said.isdigit() else _NUMBER_WORDS[said]
        plural = m.group(2).lower().endswith(("s", "anomalies"))
        if (plural or n != 1) and n != len(f.regions):
            problems.append(f"counts {m.group().strip()!r} but there are {len(f.regions)} regions")
    return problems + _number_problems(text, f, r)


def check_claims(text: str, f: Findings, regions: Sequence[RegionFinding] | None = None) -> list[str]:
    """What in `text` the findings do not support (empty: nothing wrong found).

    A sentence is about one region: the one it names ("region 2"), else one of `regions` (default: all
    of them; the first answer is about the largest only). Every place, tone, shape, superlative, count
    and number in it must hold for that same region (or for the part: score, threshold, region count),
    numbers exactly as the findings give them; a sentence that fits no single region is refused, so
    the sizes of one region are never glued to another. Advice (scrap, ship, you should) is always
    refused: the station's verdict is the runtime's to say."""
    regions = list(f.regions if regions is None else regions)
    problems = []
    anomalous = f.verdict == "anomalous"
    if anomalous and _DENIAL.search(text):
        problems.append("denies the anomaly")
    if not anomalous and _AFFIRM.search(text):
        problems.append("claims a defect on a normal part")
    if _ADVICE.search(text):
        problems.append(f"gives advice ('{_ADVICE.search(text).group(1)}'): dispositions are not the model's")
    if _CAUSE.search(text):
        problems.append(f"guesses ('{_CAUSE.search(text).group()}'): the station measures, it does not tell causes")
    named = sorted({int(i) for i in _NAMED_REGION.findall(text)})
    have = {r.index for r in f.regions}
    focus = {r.index for r in regions}
    for i in named:
        if i not in have:
            problems.append(f"names region {i}, which the findings do not have")
        elif i not in focus:
            problems.append(f"names region {i}; the answer is about region {', '.join(map(str, sorted(focus)))}")
    if len(named) > 1:
        problems.append("names several regions in one sentence")
    rest = _NAMED_REGION.sub(" ", text)
    words = re.findall(r"[a-z]+", rest.lower())
    candidates = [r for r in f.regions if r.index in named] if named else regions
    if not anomalous:
        return problems + _number_problems(rest, f, None)
    per_region = [_region_problems(rest, words, f, r) for r in candidates] or [_region_problems(rest, words, f, None)]
    return problems + min(per_region, key=len)


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
