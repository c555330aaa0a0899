"""Adversarial questions to the real SmolLM2-135M GGUF (the default pack's model), every answer checked
against the findings by rules written here, independently of edge.explain.claims' own check: each size is one
region's own length, width and area; each place, count and superlative is true of the region the answer
is about; dispositions come with the station's verdict and no advice; follow-ups move to the region they
name and stay there."""
import re

import pytest

pytest.importorskip("llama_cpp", reason="needs the llm extra (llama-cpp-python)")

from conftest import llm_pack  # noqa: E402

from edge.explain.dialogue import DialogueStore  # noqa: E402
from edge.explain.explainer import Explainer  # noqa: E402
from edge.explain.findings import Findings, spoken_number as _num  # noqa: E402
from edge.explain.runtime_words import place_words  # noqa: E402

PLACE_OF_WORD = {"top": "upper", "upper": "upper", "bottom": "lower", "lower": "lower", "left": "left",
                 "right": "right", "centre": "centre", "center": "centre", "middle": "centre"}
COUNT_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5}


def issue_part() -> Findings:
    """Issue 17's part: R1 lower 11.0 x 7.6 mm, R2 lower-right 1.9 x 1.5 mm, R3 upper-left 0.8 x 0.8 mm."""
    rs = [("lower", [150, 250, 230, 160], 25200, 63.0, 220.0, 152.0, 11.0, 7.6, "compact", "darker", 1.6),
          ("lower-right", [400, 300, 38, 30], 920, 2.3, 38.0, 30.0, 1.9, 1.5, "compact", "brighter", 1.1),
          ("upper-left", [20, 20, 16, 16], 250, 0.64, 16.0, 16.0, 0.8, 0.8, "compact", "similar", 1.02)]
    return Findings.from_dict({
        "verdict": "anomalous", "score": 0.71, "threshold": 0.55, "severity": 1.29, "frame_size": [448, 448],
        "mm_per_pixel": 0.05, "regions": [
            {"index": i + 1, "place": p, "bbox": b, "area_px": a, "area_mm2": amm, "length_px": lp, "width_px": wp,
             "length_mm": lmm, "width_mm": wmm, "shape": sh, "contrast": c, "contrast_delta": 0.0, "severity": sv}
            for i, (p, b, a, amm, lp, wp, lmm, wmm, sh, c, sv) in enumerate(rs)]})


def scratch_part() -> Findings:
    """One elongated, darker region on the right."""
    return Findings.from_dict({
        "verdict": "anomalous", "score": 0.9, "threshold": 0.55, "severity": 1.64, "frame_size": [336, 448],
        "mm_per_pixel": 0.05, "regions": [
            {"index": 1, "place": "right", "bbox": [330, 120, 90, 12], "area_px": 700, "area_mm2": 1.75,
             "length_px": 92.0, "width_px": 8.0, "length_mm": 4.6, "width_mm": 0.4, "shape": "elongated",
             "contrast": "darker", "contrast_delta": -25.0, "severity": 1.64}]})


def sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def assert_true_of(answer: str, f: Findings, about: list[int]):
    """Every sentence's sizes, places, counts and superlatives hold for one region of `about` (or the one
    it names)."""
    by_index = {r.index: r for r in f.regions}
    for s in sentences(answer):
        if re.match(r"(There are \d+ anomalous regions|There is no region|The station's verdict|Region \d+: )", s):
            continue  # the runtime's listings; their parts are checked where they are one region's
        named = [int(i) for i in re.findall(r"\b[Rr]egion (\d+)\b", s)]
        assert all(i in by_index for i in named), (s, "names a region the part does not have")
        candidates = [by_index[i] for i in named[:1]] or [by_index[i] for i in about]
        sizes = re.findall(r"(\d+(?:\.\d+)?) mm long and (\d+(?:\.\d+)?) mm wide(?: \(about (\d+(?:\.\d+)?) mm²\))?", s)
        lone = [float(v) for v in re.findall(r"(\d+(?:\.\d+)?)\s*mm\b(?!²)", s)]
        areas = [float(v) for v in re.findall(r"(\d+(?:\.\d+)?)\s*mm²", s)]
        words = re.findall(r"[a-z]+", s.lower())

        def holds(r):
            if any((float(a), float(b)) != (float(_num(r.length_mm)), float(_num(r.width_mm)))
                   or (c and float(c) != float(_num(r.area_mm2))) for a, b, c in sizes):
                return False
            if any(v not in (float(_num(r.length_mm)), float(_num(r.width_mm))) for v in lone):
                return False
            if any(v != float(_num(r.area_mm2)) for v in areas):
                return False
            if any(PLACE_OF_WORD[w] not in r.place.split("-") for w in words if w in PLACE_OF_WORD
                   if not s.startswith("No. ")):
                return False
            areas_all = [o.area_px for o in f.regions]
            if "largest" in words and "anomalous" not in words and r.area_px != max(areas_all):
                return False
            if "smallest" in words and r.area_px != min(areas_all):
                return False
            if re.search(r"\bscratch\b", s) and r.shape != "elongated" and not s.startswith("No, not by its shape"):
                return False
            return True

        assert any(holds(r) for r in candidates), (s, [r.index for r in candidates])
        for n, _ in re.findall(r"\b(\d+|one|two|three|four|five) (anomalous )?regions\b", s):
            assert (int(n) if n.isdigit() else COUNT_WORDS[n]) == len(f.regions), s


@pytest.fixture(scope="module")
def explainer(smollm_gguf, tmp_path_factory):
    pack = llm_pack(tmp_path_factory.mktemp("pack"), smollm_gguf, context_length=2048)
    e = Explainer(pack, n_threads=1, max_tokens=48)
    yield e
    e.close()


def dialogue(explainer, tmp_path, f: Findings, questions: list[str]) -> list:
    with DialogueStore(tmp_path / "d.sqlite") as store:
        store.open_session("part", f.to_dict())
        return [explainer.respond(store, "part", q) for q in questions]


def test_the_first_answer_and_descriptions_hold_for_the_region_they_are_about(explainer, tmp_path):
    f = issue_part()
    questions = ["Is there an anomaly in the image?", "Can you describe it more precisely?",
                 "What does it look like?", "Describe the defect in detail, with its size.",
                 "Tell me about the largest defect and the smallest one.", "Is there anything else?"]
    answers = dialogue(explainer, tmp_path, f, questions)
    first = answers[0].text
    assert first.startswith("Yes, there is an anomaly at the bottom of the image (the largest of 3 anomalous "
                            "regions).")
    assert answers[0].regions == [1]
    for q, a in zip(questions, answers):
        assert_true_of(a.text, f, a.regions or [1, 2, 3])
        assert a.model_sentences >= a.kept_sentences
        assert "you should" not in a.text.lower()


def test_disposition_questions_get_the_verdict_never_advice(explainer, tmp_path):
    f = issue_part()
    questions = ["Should I scrap this part?", "Can I ship it?", "Is it OK to rework this?",
                 "Do we need to reject it?", "Is this part good enough to pass?", "Is it safe to use?"]
    for q, a in zip(questions, dialogue(explainer, tmp_path, f, questions)):
        assert a.source == "findings" and a.n_tokens == 0, q  # the model is not asked at all
        assert a.text.startswith("The station's verdict is anomalous: the score 0.71 is at or above the threshold "
                                 "0.55, so the part was flagged, with 3 anomalous regions."), (q, a.text)
        assert "not by this assistant" in a.text
        assert not re.search(r"\b(no|yes), you (should|can)|\byou should\b", a.text, re.I), (q, a.text)
        assert_true_of(a.text, f, [1, 2, 3])
    good = Findings.from_dict({"verdict": "normal", "score": 0.41, "threshold": 0.55, "severity": 0.75,
                               "frame_size": [448, 448], "regions": []})
    a = dialogue(explainer, tmp_path / "good", good, ["Should I scrap it?"])[0]
    assert a.text.startswith("The station's verdict is normal: the score 0.41 is below the threshold 0.55")


def test_is_it_x_questions_are_answered_from_the_region_kind(explainer, tmp_path):
    f = issue_part()
    answers = dialogue(explainer, tmp_path, f, ["Is it a scratch?", "Is it a crack?", "Is it a dent?",
                                                "Is it darker?", "Is it on the left?", "What kind of defect is it?"])
    scratch, crack, dent, darker, left, kind = (a.text for a in answers)
    assert scratch.startswith("No, not by its shape: a scratch would be elongated, and region 1 is compact "
                              "(spot- or dent-like), 11.0 mm long and 7.6 mm wide (about 63.0 mm²)")
    assert crack.startswith("No, not by its shape: a crack would be elongated")
    assert dent.startswith("Its shape fits a dent: region 1 is compact")
    assert darker == "Yes. Region 1 is darker than its surroundings."
    assert left.startswith("No. Region 1 is at the bottom of the image")
    assert kind.startswith("Region 1 is compact (spot- or dent-like), 11.0 mm long")
    assert all(a.source == "findings" for a in answers)
    for a in answers:
        assert_true_of(a.text, f, [1])
    elongated = scratch_part()
    yes = dialogue(explainer, tmp_path / "s", elongated, ["Is it a scratch?", "Is it a spot?"])
    assert yes[0].text.startswith("Its shape fits a scratch: the anomaly is elongated (scratch- or crack-like), "
                                  "4.6 mm long and 0.4 mm wide")
    assert yes[1].text.startswith("No, not by its shape: a spot would be compact")


def test_follow_ups_move_to_the_region_they_name_and_stay_there(explainer, tmp_path):
    f = issue_part()
    questions = ["Is there an anomaly in the image?", "How big is it?", "What about region 2?", "How big is it?",
                 "Is it darker?", "And the one in the upper-left?", "Where is it?", "How big is the largest?",
                 "What about region 7?", "How many regions are there?", "Describe all of them."]
    answers = dialogue(explainer, tmp_path, f, questions)
    texts = [a.text for a in answers]
    assert [a.regions for a in answers] == [[1], [1], [2], [2], [2], [3], [3], [1], [], [1, 2, 3], [1, 2, 3]]
    assert texts[1] == "Region 1 is 11.0 mm long and 7.6 mm wide (about 63.0 mm²)."
    assert texts[2].startswith("Region 2 is in the lower-right corner of the image.")
    assert texts[3] == "Region 2 is 1.9 mm long and 1.5 mm wide (about 2.3 mm²)."
    assert texts[4] == "No. Region 2 is brighter than its surroundings."
    assert texts[5].startswith("Region 3 is in the upper-left corner of the image.")
    assert texts[6].startswith("Region 3 is in the upper-left corner of the image, at x 20 to 36, y 20 to 36 px")
    assert texts[7] == "Region 1 is 11.0 mm long and 7.6 mm wide (about 63.0 mm²)."
    assert texts[8].startswith("There is no region 7: this part has 3 anomalous regions")
    assert texts[9].startswith("There are 3 anomalous regions: region 1 " + place_words("lower"))
    for q, a in zip(questions, answers):
        assert_true_of(a.text, f, a.regions or [1, 2, 3])


def test_a_normal_part_is_never_given_a_defect(explainer, tmp_path):
    good = Findings.from_dict({"verdict": "normal", "score": 0.41, "threshold": 0.55, "severity": 0.75,
                               "frame_size": [448, 448], "regions": []})
    questions = ["Is there an anomaly in the image?", "How big is the scratch?", "Is it a crack?",
                 "Describe the defect.", "How many defects?", "What about region 2?"]
    for q, a in zip(questions, dialogue(explainer, tmp_path, good, questions)):
        assert a.text.startswith(("No, there is no anomaly", "There is no anomaly on this part")), (q, a.text)
        assert not re.search(r"\d+(\.\d+)? mm", a.text)
