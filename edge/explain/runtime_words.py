"""What the runtime says itself, from the findings alone: the yes/no opening of every first answer, the
answers to the questions the model never gets (disposition, count, size, where, kind, tone: `fact_answer`),
the findings' own description that stands in when the model's words do not hold up, and the facts the
model is given (`facts_for_model`).

Small models cannot be trusted with a verdict or a number (docs/explanations.md): nothing here runs a
model or checks its text (edge.explain.claims does).
"""
from __future__ import annotations

from collections.abc import Sequence

from edge.explain.findings import Findings, RegionFinding, distinct_pair
from edge.explain.questions import KIND_WORDS, asked_kind, place_asked, tone_asked

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
            out.append(_yes_no(place_asked(question), r.place) +
                       f"{name} is {place_words(r.place)}, at {r.box_words()}.")
        elif kind == "tone":
            out.append(_yes_no(tone_asked(question), r.contrast) + f"{name} is {r.tone_words(f.contrast_basis)}.")
        else:
            out.append(_kind_answer(r, f, asked_kind(question)))
    if kind == "size" and f.mm_per_pixel is None:
        out.append("Sizes are in pixels: the station has no mm-per-pixel scale.")
    if kind == "kind":
        out.append("The station measures shape, size and brightness; it does not tell the cause.")
    return " ".join(out)


def _yes_no(asked: str | None, actual: str) -> str:
    if asked is None:
        return ""
    return "Yes. " if asked == actual or (asked in actual.split("-") and "-" in actual) else "No. "


def _kind_answer(r: RegionFinding, f: Findings, asked: str | None) -> str:
    name = region_name(r, f)
    facts = f"{name} is {r.shape} ({r.shape_words}), {r.size_words()}, {r.tone_words(f.contrast_basis)}."
    if asked is None:
        return facts
    if KIND_WORDS[asked] == r.shape:
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
    return distinct_pair(f.score, f.threshold)
