"""Foreground masking of parts on a plain background: which references count as such, that the background
cannot raise a part's score once masked, that a defect on the part's outline (a missing chunk) is still
caught, and that the choice is saved, kept on re-enrollment and refused when misspelt."""
import cv2
import numpy as np
import pytest

from edge.errors import StateError
from edge.inference.preprocess import to_input_pixels
from edge.line.synthetic import SyntheticLine, write_good_parts
from edge.scoring.factory import build_scorer
from edge.scoring.foreground import plain_background, raw_foreground
from edge.station.enrollment import build_state, enroll
from edge.station.state import load_state


@pytest.fixture(scope="module")
def line():
    return SyntheticLine(seed=5, defect_rate=0.5)


def texture(seed: int, size: int = 256) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = cv2.GaussianBlur(rng.normal(0, 1, (size, size)).astype(np.float32), (0, 0), 3)
    return np.clip(128 + 60 * noise / noise.std(), 0, 255).astype(np.uint8)


def repainted_background(part: np.ndarray, seed: int) -> np.ndarray:
    """The part as it is, on a conveyor of another weave: coarse streaks of the same brightness and spread."""
    fg, _ = raw_foreground(part.astype(np.float32))
    rng = np.random.default_rng(seed)
    streaks = cv2.GaussianBlur(rng.normal(0, 1, (part.shape[0], part.shape[1])).astype(np.float32), (0, 0), sigmaX=9,
                               sigmaY=0.8)
    bg = part[~fg].astype(np.float32)
    weave = bg.mean(axis=0) + (bg.std() * streaks / streaks.std())[..., None]
    out = part.copy()
    out[~fg] = np.clip(weave[~fg], 0, 255).astype(np.uint8)
    return out


def test_plain_background_parts_are_told_from_textures(default_pack, line):
    pixels = [to_input_pixels(img, default_pack.input) for img in line.good(4)]
    assert plain_background(pixels) is None
    why = plain_background([pixels[0], to_input_pixels(texture(1), default_pack.input)])
    assert why is not None and why.startswith("reference 2:")
    fg, band = raw_foreground(pixels[0])
    assert band == 0.0 and 0.3 < fg.mean() < 0.7  # the flange, bore and bolt holes filled, not the conveyor


def test_background_cannot_raise_a_masked_part_score(default_pack, line):
    refs = line.good(1)
    masked = build_state(default_pack, refs, seed=0, quiet=True)
    plain = build_state(default_pack, refs, seed=0, quiet=True, foreground="off")
    assert masked.info["foreground"] == "on" and plain.info["foreground"].startswith("off")
    with_mask, without = build_scorer(default_pack, masked), build_scorer(default_pack, plain)
    for part in line.good(4)[1:]:
        # The conveyor away from the part (outside the widened mask) comes in another weave.
        keep = masked.head.foreground.keep(to_input_pixels(part, default_pack.input))
        away = cv2.resize(keep.astype(np.uint8), part.shape[1::-1], interpolation=cv2.INTER_NEAREST) == 0
        moved = part.copy()
        moved[away] = repainted_background(part, seed=3)[away]
        # Unmasked, that alone raises the part's score past the threshold; masked, it changes nothing.
        assert without.score_one(moved).anomalous and without.score_one(moved).score > 3 * without.score_one(part).score
        a, b = with_mask.score_one(part), with_mask.score_one(moved)
        assert not b.anomalous and abs(b.score - a.score) < 0.05 * a.score


def test_missing_chunk_on_the_outline_is_still_caught(default_pack, line):
    state = build_state(default_pack, line.good(4), seed=0, quiet=True)
    assert state.info["foreground"] == "on"
    scorer = build_scorer(default_pack, state)
    chunks = [p for p in line.parts(60) if p.defect == "missing_chunk"][:4]
    assert len(chunks) >= 3
    results = scorer.score([p.image for p in chunks])
    assert all(r.anomalous for r in results), [round(r.score, 2) for r in results]
    for part, r in zip(chunks, results):  # and it is found where the chunk is missing
        assert any(part.mask[g.y:g.y + g.height, g.x:g.x + g.width].any() for g in r.regions)


def test_foreground_choice_is_saved_and_kept_on_re_enrollment(default_pack, tmp_path):
    good = write_good_parts(tmp_path / "good", 3, seed=2)
    out = tmp_path / "state"
    enroll(default_pack, good[:1], out, quiet=True, log=lambda m: None, foreground="off")
    assert load_state(out, default_pack).head.foreground is None
    state = enroll(default_pack, good[1:], out, quiet=True, log=lambda m: None)  # adds two: keeps "off"
    assert state.info["foreground_mode"] == "off" and state.head.foreground is None
    state = enroll(default_pack, good, tmp_path / "auto", quiet=True, log=lambda m: None)
    loaded = load_state(tmp_path / "auto", default_pack)
    assert state.info["foreground"] == "on"
    np.testing.assert_array_equal(loaded.head.foreground.envelope, state.head.foreground.envelope)


def test_textures_score_unmasked_and_a_misspelt_mode_is_refused(default_pack):
    tiles = [texture(s) for s in range(2)]
    state = build_state(default_pack, tiles, seed=0, quiet=True)
    assert state.head.foreground is None and state.info["foreground"].startswith("off: reference 1:")
    with pytest.raises(StateError, match="foreground 'maybe'"):
        build_state(default_pack, tiles, seed=0, quiet=True, foreground="maybe")
