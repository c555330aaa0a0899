"""Frames far from the pack's shape keep their aspect ratio: a 500 x 1250 strip is fed to the encoder at
128 x 352 (the same area), a defect on it is found where it is, the choice survives a state round trip,
and what cannot be kept (a fixed-size pack, references of mixed shapes, a student) is squashed or refused
with a clear error."""
import numpy as np
import pytest

from edge.errors import PackError, StateError
from edge.inference.features import FeatureExtractor
from edge.pack import load_pack
from edge.scoring.factory import build_scorer
from edge.station.enrollment import build_state, enroll
from edge.station.input_size import aspect_kept_size, station_input_size
from edge.station.state import load_state


def strips(n: int, shape=(500, 1250), seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    texture = (120 + 10 * rng.standard_normal(shape)).astype(np.float32)
    return [np.clip(texture + 3 * rng.standard_normal(shape), 0, 255).astype(np.uint8) for _ in range(n)]


def test_the_pack_encoder_takes_other_sizes(default_pack):
    assert default_pack.input.size_multiple == 32
    wide = default_pack.at_input_size(160, 352)
    assert wide.encoder.feature_shape[1:] == (20, 44) and wide.native_size == (224, 224)
    feats = FeatureExtractor(wide).patch_features(strips(1, (300, 660)))
    assert feats.shape == (1, 20, 44, default_pack.encoder.feature_shape[0])
    with pytest.raises(PackError, match="multiples of 32"):
        default_pack.at_input_size(100, 352)


def test_the_input_size_follows_the_references(default_pack):
    assert aspect_kept_size(2.5, 224 * 224, 32) == (128, 352)
    size, words = station_input_size(default_pack, strips(2))
    assert size == (128, 352) and "2.50 kept" in words
    assert station_input_size(default_pack, strips(2, (400, 440)))[0] is None  # near square: squashed
    size, words = station_input_size(default_pack, strips(1))  # one shot: no evidence of one frame shape
    assert size is None and "aspect keep" in words
    assert station_input_size(default_pack, strips(1), "keep")[0] == (128, 352)
    mixed = strips(1, (300, 600)) + strips(1, (300, 300))
    size, words = station_input_size(default_pack, mixed)
    assert size is None and "differ" in words
    assert station_input_size(default_pack, mixed, "keep")[0] == (192, 288)  # asked for: the median shape, 1.5
    assert station_input_size(default_pack, strips(2), "squash")[0] is None
    with pytest.raises(StateError, match="aspect 'wide'"):
        station_input_size(default_pack, strips(2), "wide")


def test_defect_on_a_long_strip_stays_inside_its_region(default_pack):
    """A 500 x 1250 strip: scored at its own aspect ratio, mapped back to the frame, the defect found where it is."""
    frames = strips(3)
    state = build_state(default_pack, frames[:2], seed=0, quiet=True)
    assert state.input_size == (128, 352) and state.info["views"] == "flip4+shift"  # no quarter turns
    scorer = build_scorer(default_pack, state)
    bad = frames[2].copy()
    bad[200:300, 900:1000] = 30  # dark 100 x 100 px blotch
    assert not scorer.score_one(frames[2]).anomalous
    r = scorer.score_one(bad)
    assert r.frame_size == (500, 1250) and r.anomalous and r.anomaly_map.shape == (128, 352)
    full = r.map_at_frame()
    y, x = np.unravel_index(np.argmax(full), full.shape)
    assert 150 <= y <= 350 and 850 <= x <= 1050
    assert r.regions and any(reg.x <= 1000 and reg.x + reg.width >= 900 and reg.y <= 300
                             and reg.y + reg.height >= 200 for reg in r.regions)
    # A frame of another shape is resized to the station's (one camera, one shape), and still scored.
    square = scorer.score_one(frames[2][:, 300:800])
    assert square.frame_size == (500, 500) and square.anomaly_map.shape == (128, 352)


def test_the_kept_size_survives_a_state_round_trip(default_pack, tmp_path):
    import cv2

    good = tmp_path / "good"
    good.mkdir()
    paths = []
    for i, img in enumerate(strips(3, (300, 900), seed=1)):
        paths.append(good / f"{i}.png")
        cv2.imwrite(str(paths[-1]), img)
    out = tmp_path / "state"
    state = enroll(default_pack, paths[:2], out, quiet=True, log=lambda m: None)
    assert state.input_size == (128, 384)
    loaded = load_state(out, default_pack)
    assert loaded.input_size == (128, 384) and loaded.info["aspect_mode"] == "auto"
    assert build_scorer(default_pack, loaded).score_one(cv2.imread(str(paths[2]), 0)).anomaly_map.shape == (128, 384)
    again = enroll(default_pack, paths[2:], out, quiet=True, log=lambda m: None, aspect="squash")
    assert again.input_size is None and load_state(out, default_pack).info["aspect_mode"] == "squash"
    broken = (out / "state.yaml").read_text() + "input_size: [128]\n"
    (out / "state.yaml").write_text(broken)
    with pytest.raises(StateError, match="input_size must be"):
        load_state(out, default_pack)


def test_a_fixed_size_pack_squashes_and_refuses_keep(default_pack_dir, tmp_path):
    import shutil

    import yaml

    fixed = tmp_path / "fixed"
    shutil.copytree(default_pack_dir, fixed)
    doc = yaml.safe_load((fixed / "pack.yaml").read_text())
    del doc["input"]["size_multiple"]
    (fixed / "pack.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    pack = load_pack(fixed)
    size, words = station_input_size(pack, strips(2))
    assert size is None and "takes that size only" in words
    with pytest.raises(StateError, match="aspect keep: pack .* takes 224x224 frames only"):
        station_input_size(pack, strips(2), "keep")
    with pytest.raises(PackError, match="no size_multiple"):
        pack.at_input_size(128, 352)


def test_a_student_station_is_trained_at_the_pack_size(default_pack, tmp_path):
    with pytest.raises(StateError, match="aspect keep: the learned scorer"):
        enroll(default_pack, [], tmp_path / "s", quiet=True, log=lambda m: None, aspect="keep",
               train_student=lambda images, out: None)


def test_a_scorer_that_takes_over_feeds_frames_at_its_own_state_size(default_pack):
    """A reload or enrollment that changes the state's input size (a one-shot station refined with wide
    parts keeps their aspect; one whose new references are square squashes again): the new scorer reuses
    the old one's encoder session but feeds frames at the new state's size."""
    wide_state = build_state(default_pack, strips(2), seed=0, quiet=True)
    square_state = build_state(default_pack, strips(1), seed=0, quiet=True)
    assert wide_state.input_size == (128, 352) and square_state.input_size is None
    wide = build_scorer(default_pack, wide_state)
    square = build_scorer(default_pack, square_state, replacing=wide)
    assert square.extractor.backend is wide.extractor.backend  # the session is reused
    frame = strips(1, seed=4)[0]
    for state, scorer, size in ((square_state, square, (224, 224)),
                                (wide_state, build_scorer(default_pack, wide_state, replacing=square), (128, 352))):
        assert (scorer.extractor.pack.input.height, scorer.extractor.pack.input.width) == size
        got, fresh = scorer.score_one(frame), build_scorer(default_pack, state).score_one(frame)
        assert got.anomaly_map.shape == size and got.score == pytest.approx(fresh.score, rel=1e-5)
