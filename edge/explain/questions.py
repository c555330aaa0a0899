"""Questions about a flagged part: owns accepting one (`clean_question`: trimmed, markup defused, not too
long), routing it (`intent`: a disposition, count, size, place, kind or tone question is answered by the
runtime, only 'verdict' and 'describe' reach the model) and reading which regions it names
(`region_reference`: "region 2", "the second one", "the smallest", "the one in the upper-left").

Pure text against the findings: it writes no answer (edge.explain.runtime_words) and runs no model.
"""
from __future__ import annotations

import re

from edge.explain.findings import Findings
from edge.explain.llama_model import LlmError

FIRST_QUESTION = "Is there an anomaly in the image?"
MAX_QUESTION_CHARS = 500


class QuestionError(LlmError):
    """A question the runtime will not put to the model (empty, too long)."""


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
KIND_WORDS = {"scratch": "elongated", "scratches": "elongated", "crack": "elongated", "cracks": "elongated",
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
SUPERLATIVE_REF = {"largest": ("area_px", max), "biggest": ("area_px", max), "smallest": ("area_px", min),
                    "tiniest": ("area_px", min), "longest": ("length_px", max), "shortest": ("length_px", min),
                    "widest": ("width_px", max), "narrowest": ("width_px", min), "thinnest": ("width_px", min),
                    "worst": ("severity", max), "most severe": ("severity", max)}
SUPERLATIVE_Q = re.compile(r"\b(" + "|".join(SUPERLATIVE_REF) + r")\b", re.I)


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
    if asked_kind(question) is not None or re.search(r"\b(what (kind|type|sort)|which (kind|type)|kind of|"
                                                      r"type of)\b", question, re.I):
        return "kind"
    if _TONE_Q.search(question) and re.match(r"\s*(is|are|how|what|which)\b", question, re.I):
        return "tone"
    return "describe"


def asked_kind(question: str) -> str | None:
    """The defect word of a yes/no kind question ('Is it a scratch?' -> 'scratch'), or None."""
    m = re.search(r"\b(?:is|are|was|could|does|looks?)\b[^?.!]*?\b(" + "|".join(KIND_WORDS) + r")\b", question, re.I)
    return m.group(1).lower() if m else None


def place_name(phrase: str) -> str:
    """A findings place for a phrase of a question ('top left' -> 'upper-left', 'middle' -> 'centre')."""
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
    for m in SUPERLATIVE_Q.finditer(question) if f.regions else ():
        key, pick = SUPERLATIVE_REF[m.group(1).lower()]
        target = pick(getattr(r, key) for r in f.regions)
        picked.append(next(r.index for r in f.regions if getattr(r, key) == target))
    if picked:
        return sorted(set(picked))
    m = _PLACE_REF.search(question)
    if m:
        place = place_name(next(g for g in m.groups() if g))
        exact = [r.index for r in f.regions if r.place == place]
        loose = [r.index for r in f.regions if set(place.split("-")) <= set(r.place.split("-"))]
        return exact or loose or [0]  # 0: no region there
    if _ALL_REF.search(question):
        return [r.index for r in f.regions]
    return None


def place_asked(question: str) -> str | None:
    """The place a yes/no place question asks about ('Is it in the upper-left?' -> 'upper-left'), or None."""
    if not _PLACE_Q.search(question):
        return None
    m = re.search(_PLACE_PHRASE, question[_PLACE_Q.search(question).end():], re.I)
    return place_name(m.group(1)) if m else None


def tone_asked(question: str) -> str | None:
    """'darker' or 'brighter' when a yes/no question asks about the tone, else None."""
    m = re.match(r"\s*(is|are)\b[^?]*?\b(dark\w*|bright\w*|light\w*)", question, re.I)
    if not m:
        return None
    return "darker" if m.group(2).lower().startswith("dark") else "brighter"
