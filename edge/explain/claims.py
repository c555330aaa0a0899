"""The check of what the model said: each sentence of a description must hold up against the findings
(`check_claims`): a place, tone, shape, superlative, count or number that is not true of one region
(or of the part) drops the sentence, and so do advice, guessed causes and a denied verdict;
`checked_description` keeps the sentences that pass.

It judges text only: it neither runs the model nor writes the runtime's own words (edge.explain.runtime_words).
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence

from edge.explain.findings import Findings, RegionFinding, distinct_pair, spoken_number
from edge.explain.questions import SUPERLATIVE_Q, SUPERLATIVE_REF

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
    out = {float(spoken_number(value))}
    if float(value).is_integer():
        out.add(float(value))
    return out


def _global_numbers(f: Findings) -> set[float]:
    s, t = distinct_pair(f.score, f.threshold)
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
    for m in SUPERLATIVE_Q.finditer(text):
        key, pick = SUPERLATIVE_REF[m.group(1).lower()]
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
