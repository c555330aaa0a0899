"""edge.explain.findings: hand-made scorer results -> facts in words (no ONNX, no pack)."""
import json
import math

import cv2
import numpy as np
import pytest

from edge.scoring.decide import Result, find_regions, image_score
from edge.explain.findings import Findings, describe

MAP = (224, 224)          # pack input resolution (height, width)
FRAME = (336, 448)        # frame (height, width): 1.5x vertically, 2x horizontally
THRESHOLD = 0.55


def make_result(defect: np.ndarray, threshold: float = THRESHOLD) -> Result:
    """A result as the scorer would give it for a defect drawn at frame resolution (bool mask)."""
    down = cv2.resize(defect.astype(np.float32), (MAP[1], MAP[0]), interpolation=cv2.INTER_AREA)
    anomaly_map = (0.2 + 0.8 * down).astype(np.float32)
    mask = anomaly_map >= threshold
    score = image_score(anomaly_map, 0.01)
    anomalous = score >= threshold
    regions = find_regions(anomaly_map, mask, FRAME) if anomalous else []
    return Result(score=score, threshold=threshold, anomalous=anomalous, anomaly_map=anomaly_map, mask=mask,
                  regions=regions, frame_size=FRAME)


def line_defect(p0=(300, 40), p1=(420, 120), thickness=3):
    d = np.zeros(FRAME, np.uint8)
    cv2.line(d, p0, p1, 1, thickness)
    return d.astype(bool)


def disc_defect(centre=(224, 168), radius=40):
    d = np.zeros(FRAME, np.uint8)
    cv2.circle(d, centre, radius, 1, -1)
    return d.astype(bool)


def test_thin_diagonal_line_upper_right_is_elongated_with_true_length():
    defect = line_defect()
    result = make_result(defect)
    frame = np.full(FRAME, 128, np.uint8)
    f = describe(frame, result, mm_per_pixel=0.05)
    assert f.verdict == "anomalous" and len(f.regions) == 1
    r = f.regions[0]
    assert r.index == 1 and r.place == "upper-right"
    assert r.shape == "elongated" and r.shape_words == "scratch- or crack-like"
    true_length = math.hypot(120, 80) + 3
    assert r.length_px == pytest.approx(true_length, rel=0.15)
    assert r.width_px < r.length_px / 3
    assert r.length_mm == pytest.approx(r.length_px * 0.05, abs=1e-6)
    assert r.width_mm == pytest.approx(r.width_px * 0.05, abs=1e-6)
    assert r.area_mm2 == pytest.approx(r.area_px * 0.05 ** 2, abs=1e-6)
    assert r.contrast == "similar"
    assert r.severity == pytest.approx(round(result.regions[0].max_score / THRESHOLD, 2))
    sentence = f.sentences()[1]
    assert sentence.startswith("Region 1: upper-right, elongated (scratch- or crack-like), ")
    assert f"{r.length_mm:.1f} mm long" in sentence and "mm²" in sentence
    assert sentence.endswith(f"severity {r.severity:.1f}.")


def test_disc_in_centre_is_compact_with_scaled_area():
    result = make_result(disc_defect(radius=40))
    frame = np.full(FRAME, 128, np.uint8)
    f = describe(frame, result, mm_per_pixel=0.1)
    r = f.regions[0]
    assert r.place == "centre" and r.shape == "compact" and r.shape_words == "spot- or dent-like"
    assert r.area_mm2 == pytest.approx(math.pi * 40 ** 2 * 0.1 ** 2, rel=0.1)
    assert r.length_px == pytest.approx(80, rel=0.15) and r.width_px == pytest.approx(80, rel=0.15)
    assert r.length_px >= r.width_px
    assert "spot- or dent-like" in f.summary()


def test_without_scale_sizes_are_in_pixels():
    f = describe(np.full(FRAME, 128, np.uint8), make_result(disc_defect()))
    r = f.regions[0]
    assert r.area_mm2 is None and r.length_mm is None and r.width_mm is None
    assert " px long and " in f.summary() and "px²" in f.summary()


def test_places_on_the_3x3_grid():
    spots = {(30, 30): "upper-left", (224, 30): "upper", (418, 30): "upper-right", (30, 168): "left",
             (418, 168): "right", (30, 306): "lower-left", (224, 306): "lower", (418, 306): "lower-right"}
    for centre, place in spots.items():
        f = describe(np.full(FRAME, 128, np.uint8), make_result(disc_defect(centre, radius=20)))
        assert [r.place for r in f.regions] == [place]


def test_dark_and_bright_blobs_against_surroundings_and_reference():
    defect = disc_defect(radius=30)
    result = make_result(defect)
    dark = np.full(FRAME, 200, np.uint8)
    dark[defect] = 60
    bright = np.full(FRAME, 50, np.uint8)
    bright[defect] = 220
    good_bright = np.full((168, 224), 200, np.uint8)   # references need not be at the frame's size
    good_dark = np.full((500, 600, 3), 50, np.uint8)   # nor grey
    f = describe(dark, result)
    assert f.regions[0].contrast == "darker" and f.contrast_basis == "surroundings"
    assert "darker than its surroundings" in f.summary()
    f = describe(dark, result, reference=good_bright)
    assert f.regions[0].contrast == "darker" and f.contrast_basis == "reference"
    assert "darker than the reference" in f.summary()
    assert describe(bright, result).regions[0].contrast == "brighter"
    assert describe(cv2.cvtColor(bright, cv2.COLOR_GRAY2BGR), result, reference=good_dark).regions[0].contrast \
        == "brighter"


def test_reference_compares_same_pixels_not_surroundings():
    # The whole part is darker than the good one: no local contrast, but darker than the reference.
    result = make_result(disc_defect(radius=30))
    frame = np.full(FRAME, 60, np.uint8)
    assert describe(frame, result).regions[0].contrast == "similar"
    f = describe(frame, result, reference=np.full(FRAME, 200, np.uint8))
    assert f.regions[0].contrast == "darker" and f.regions[0].contrast_delta == pytest.approx(-140)


def test_regions_largest_first_and_json_ready():
    defect = disc_defect((100, 100), 15) | disc_defect((330, 230), 40)
    f = describe(np.full(FRAME, 128, np.uint8), make_result(defect), mm_per_pixel=0.2)
    assert [r.index for r in f.regions] == [1, 2]
    assert f.regions[0].area_px > f.regions[1].area_px
    assert [r.place for r in f.regions] == ["lower-right", "upper-left"]
    d = json.loads(json.dumps(f.to_dict()))
    assert d["verdict"] == "anomalous" and len(d["regions"]) == 2
    assert d["regions"][0]["bbox"] == list(f.regions[0].bbox)
    assert d["summary"].startswith("Anomalous: score ") and "2 regions." in d["summary"]
    assert d["summary"].count("Region ") == 2


def test_normal_result_no_regions_and_no_anomaly_sentence():
    anomaly_map = np.full(MAP, 0.41, np.float32)
    result = Result(score=0.41, threshold=0.55, anomalous=False, anomaly_map=anomaly_map,
                    mask=np.zeros(MAP, bool), regions=[], frame_size=FRAME)
    f = describe(np.full(FRAME, 128, np.uint8), result, mm_per_pixel=0.1)
    assert isinstance(f, Findings)
    assert f.verdict == "normal" and f.regions == [] and f.severity == pytest.approx(0.75)
    assert f.summary() == "No anomaly: score 0.41 is below the threshold 0.55."
    assert json.loads(json.dumps(f.to_dict()))["regions"] == []


def test_close_score_and_threshold_print_distinct():
    result = Result(score=21.49, threshold=21.5, anomalous=False, anomaly_map=np.zeros(MAP, np.float32),
                    mask=np.zeros(MAP, bool), frame_size=FRAME)
    assert describe(np.zeros(FRAME, np.uint8), result).summary() == \
        "No anomaly: score 21.49 is below the threshold 21.5."


@pytest.mark.parametrize("bad", [0, -0.1, float("nan"), float("inf")])
def test_bad_mm_per_pixel_is_refused_naming_the_value(bad):
    result = make_result(disc_defect())
    with pytest.raises(ValueError, match=r"mm_per_pixel.*" + repr(bad).replace(".", r"\.")):
        describe(np.full(FRAME, 128, np.uint8), result, mm_per_pixel=bad)


def test_frame_of_another_size_is_refused_naming_both_sizes():
    result = make_result(disc_defect())
    with pytest.raises(ValueError, match=r"frame is 224x224.*scored on a 336x448 frame"):
        describe(np.full((224, 224), 128, np.uint8), result)


def test_findings_survive_a_round_trip_through_json():
    defect = disc_defect((100, 100), 15) | line_defect()
    f = describe(np.full(FRAME, 128, np.uint8), make_result(defect), mm_per_pixel=0.2)
    back = Findings.from_dict(json.loads(json.dumps(f.to_dict())))
    assert back == f and back.summary() == f.summary()
    assert back.regions[0].box_words().startswith(f"x {f.regions[0].bbox[0]} to ")
