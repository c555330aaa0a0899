"""Enrollment, automatic threshold and pixel scoring on synthetic parts with known defects."""
from statistics import NormalDist

import numpy as np
import pytest

from edge.scoring.bank import MemoryBank, greedy_coreset
from edge.errors import ImageError, StateError
from edge.scoring.scorer import Scorer
from edge.station.enrollment import build_state, enroll
from edge.station.state import load_state
from edge.line.synthetic import SyntheticLine


@pytest.fixture(scope="module")
def line():
    return SyntheticLine(seed=11, defect_rate=0.5)


@pytest.fixture(scope="module")
def station(default_pack, line):
    state = build_state(default_pack, line.good(10), seed=0, quiet=True)
    return state, Scorer(default_pack, state.bank, state.calibration.threshold, head=state.head,
                         calibration=state.calibration)


def test_bank_search_equals_brute_force():
    rng = np.random.default_rng(0)
    bank_rows = rng.standard_normal((3000, 24)).astype(np.float32)
    queries = rng.standard_normal((500, 24)).astype(np.float32)
    brute = ((queries[:, None, :] - bank_rows[None]) ** 2).sum(-1).min(1)
    # A tiny block budget forces many row and column blocks.
    got = MemoryBank(bank_rows).nearest_sqdist(queries, block_elements=10_000)
    np.testing.assert_allclose(got, brute, rtol=1e-4, atol=1e-3)


def test_projected_bank_matches_search_in_the_projected_space():
    rng = np.random.default_rng(2)
    # Data that lives in 6 of 40 dims: a 6-component projection loses nothing.
    basis = rng.standard_normal((6, 40)).astype(np.float32)
    rows = rng.standard_normal((800, 6)).astype(np.float32) @ basis
    queries = rng.standard_normal((50, 6)).astype(np.float32) @ basis
    projected = MemoryBank.with_pca(rows, 6)
    assert projected.features.shape == (800, 6) and projected.channels == 40
    np.testing.assert_allclose(projected.nearest_sqdist(queries), MemoryBank(rows).nearest_sqdist(queries),
                               rtol=1e-3, atol=1e-2)


def test_coreset_picks_distinct_points_that_cover_the_outliers():
    rng = np.random.default_rng(1)
    cluster = rng.standard_normal((2000, 8)).astype(np.float32) * 0.1
    outliers = rng.standard_normal((5, 8)).astype(np.float32) * 10 + 50
    data = np.concatenate([cluster, outliers])
    idx = greedy_coreset(data, 20, seed=0)
    assert len(set(idx.tolist())) == 20
    assert set(range(2000, 2005)) <= set(idx.tolist())


def test_defective_parts_score_above_good_parts_and_verdicts_follow(station, line):
    _, scorer = station
    parts = list(line.parts(24))
    results = scorer.score([p.image for p in parts])
    good = [r.score for r, p in zip(results, parts) if p.defect is None]
    bad = [r.score for r, p in zip(results, parts) if p.defect]
    assert len(bad) >= 8 and len(good) >= 8
    assert min(bad) > np.median(good)
    correct = sum(r.anomalous == bool(p.defect) for r, p in zip(results, parts))
    assert correct / len(parts) >= 0.9


def test_masks_and_regions_land_on_the_true_defects(station, line):
    _, scorer = station
    hits = total = 0
    for part in line.parts(24):
        if part.defect is None:
            continue
        r = scorer.score_one(part.image)
        if not r.anomalous:
            continue
        total += 1
        predicted = r.mask_at_frame()
        hits += (predicted & part.mask).any()
        biggest = r.regions[0]
        assert 0 <= biggest.x < 256 and 0 <= biggest.y < 256 and biggest.area > 0
    assert total >= 8 and hits / total >= 0.9


def test_batch_scoring_equals_one_at_a_time(station, line):
    _, scorer = station
    frames = [p.image for p in line.parts(4)]
    batch = scorer.score(frames)
    single = [scorer.score_one(f) for f in frames]
    for a, b in zip(batch, single):
        assert a.score == pytest.approx(b.score, rel=1e-4)


def test_threshold_comes_from_held_out_normal_scores(station, default_pack, line):
    state, _ = station
    c = state.calibration
    assert c.n_scores == 10 * 12 and c.source == "loso+synthetic"  # leave-one-shot-out, 12 views per shot
    assert c.median > 0 and c.spread > 0 and c.threshold <= c.median + 1.645 * c.spread + 1e-9
    # Above FEW_SHOT_MAX_SHOTS (forced here) the bank's k-fold hold-out calibrates, as before.
    bank_state = build_state(default_pack, line.good(10), seed=0, quiet=True, few_shot=False)
    b = bank_state.calibration
    assert b.n_scores == 10 and b.source == "holdout" and bank_state.head is None
    assert b.threshold > b.median > 0 and b.spread > 0


def test_more_shots_enroll_without_views_and_calibrate_on_folds_up_to_the_bank_switch(default_pack, line):
    from edge.station.few_shot_enrollment import FEW_SHOT_MAX_FOLDS, FEW_SHOT_MAX_SHOTS, FEW_SHOT_MAX_VIEWED_SHOTS, enrolls_few_shot

    n = FEW_SHOT_MAX_FOLDS + 4
    assert n > FEW_SHOT_MAX_VIEWED_SHOTS
    state = build_state(default_pack, line.good(n), seed=0, quiet=True)
    c = state.calibration
    assert state.head is not None and state.info["views"] == "none" and state.info["augmented_views"] == n
    assert c.source == f"{FEW_SHOT_MAX_FOLDS}-fold" and c.n_scores == n  # each shot held out once
    z = NormalDist().inv_cdf(1 - c.target_false_reject)
    assert c.threshold == pytest.approx(c.median + z * c.spread)  # the bank's k-fold rule: no cap
    assert len(c.synthetic_scores) >= 32 and "synthetic defects score above it" in c.method
    assert enrolls_few_shot(default_pack, FEW_SHOT_MAX_SHOTS) and not enrolls_few_shot(default_pack, FEW_SHOT_MAX_SHOTS + 1)


def test_single_shot_enrolls_with_augmented_views(default_pack, line):
    state = build_state(default_pack, line.good(1), seed=0, quiet=True)
    assert state.info["augmented_views"] == 12
    assert state.calibration.n_scores == 4 * (12 + 6)  # 4 quadrants x (12 views + 6 re-lit/blurred/noisy copies)
    scorer = Scorer(default_pack, state.bank, state.calibration.threshold, head=state.head)
    scores = {bool(p.defect): [] for p in line.parts(16)}
    for p in line.parts(16):
        scores[bool(p.defect)].append(scorer.score_one(p.image).score)
    assert np.mean(scores[True]) > np.mean(scores[False])


def test_enrolling_more_images_updates_bank_and_threshold(default_pack, tmp_path):
    import cv2

    from edge.line.synthetic import SyntheticLine as Line

    good = tmp_path / "good"
    good.mkdir()
    for i, img in enumerate(Line(seed=5).good(6)):
        cv2.imwrite(str(good / f"g{i}.png"), img)
    first = sorted(good.iterdir())[:3]
    s1 = enroll(default_pack, first, tmp_path / "state", quiet=True, log=lambda m: None)
    s2 = enroll(default_pack, sorted(good.iterdir()), tmp_path / "state", quiet=True, log=lambda m: None)
    assert len(s1.references) == 3 and len(s2.references) == 6
    assert s2.info["candidate_patches"] > s1.info["candidate_patches"]
    assert s2.calibration.n_scores == 6 * 12 and s2.calibration.threshold != s1.calibration.threshold
    reloaded = load_state(tmp_path / "state", default_pack)
    assert reloaded.calibration.threshold == s2.calibration.threshold
    np.testing.assert_array_equal(reloaded.bank.features, s2.bank.features)


def test_corrupt_good_image_is_skipped_and_the_rest_enrolled(default_pack, tmp_path):
    import cv2

    good = tmp_path / "good"
    good.mkdir()
    for i, img in enumerate(SyntheticLine(seed=6).good(3)):
        cv2.imwrite(str(good / f"g{i}.png"), img)
    (good / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (good / "empty.jpg").write_bytes(b"")
    messages = []
    state = enroll(default_pack, sorted(good.iterdir()), tmp_path / "state", quiet=True, log=messages.append)
    assert len(state.references) == 3
    assert any("broken.png: not a readable image" in m for m in messages)
    assert any("empty.jpg: file is empty" in m for m in messages)


def test_state_from_another_pack_or_corrupt_bank_is_refused(default_pack, station, tmp_path):
    state, _ = station
    state.save(tmp_path / "s")
    text = (tmp_path / "s" / "state.yaml").read_text()
    (tmp_path / "s" / "state.yaml").write_text(text.replace(state.pack_encoder_sha256, "ab" * 32))
    with pytest.raises(StateError, match="enroll again for this pack"):
        load_state(tmp_path / "s", default_pack)
    state.save(tmp_path / "t")
    (bank_file,) = (tmp_path / "t").glob("bank-*.npz")
    arrays = dict(np.load(bank_file))
    arrays["features"] = arrays["features"] * 2
    np.savez(bank_file, **arrays)
    with pytest.raises(StateError, match="does not match the sha256"):
        load_state(tmp_path / "t")
    with pytest.raises(StateError, match="enroll good parts first"):
        load_state(tmp_path / "missing")
    state.save(tmp_path / "u")
    (tmp_path / "u" / "state.yaml").write_text("schema_version: 1\npack: {}\n")
    with pytest.raises(StateError, match="unreadable station state"):
        load_state(tmp_path / "u")


def test_saving_again_replaces_the_bank_and_leaves_no_partial_files(station, tmp_path):
    state, _ = station
    state.save(tmp_path / "s")
    state.save(tmp_path / "s")
    names = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert len([n for n in names if n.startswith("bank-")]) == 1
    assert not [n for n in names if n.endswith(".part")]
    assert load_state(tmp_path / "s").calibration.threshold == state.calibration.threshold


def test_bad_frames_are_refused_with_a_clear_error(station):
    _, scorer = station
    with pytest.raises(ImageError, match="empty or degenerate"):
        scorer.score_one(np.zeros((0, 0, 3), np.uint8))
    with pytest.raises(ImageError, match="pixel type float64"):
        scorer.score_one(np.zeros((64, 64), np.float64))
    with pytest.raises(ImageError, match="5 channels"):
        scorer.score_one(np.zeros((64, 64, 5), np.uint8))
    # Grey, 16-bit and BGRA frames of any size are accepted.
    for frame in (np.zeros((100, 300), np.uint8), np.zeros((64, 64), np.uint16), np.zeros((90, 90, 4), np.uint8)):
        assert scorer.score_one(frame).anomaly_map.shape == (224, 224)


def test_calibration_is_the_robust_95_percent_point_of_normal_scores():
    from edge.scoring.calibration import calibrate

    # median 10, IQR 2 (9..11) -> spread 2/1.349; z(0.95) = 1.6449
    scores = [8, 9, 9, 10, 10, 10, 11, 11, 12, 40]
    c = calibrate(scores)
    q1, q3 = np.quantile(scores, [0.25, 0.75])
    assert c.median == 10 and c.spread == pytest.approx((q3 - q1) / 1.349)
    assert c.threshold == pytest.approx(10 + 1.6449 * (q3 - q1) / 1.349, rel=1e-4)
    # The single outlying good part does not drag the threshold up to it.
    assert c.threshold < 15
    with pytest.raises(ValueError, match="at least two"):
        calibrate([1.0])


def test_enrolling_a_station_with_a_new_pack_rebuilds_it_from_its_references(default_pack, tmp_path):
    import cv2

    from edge.pack import load_pack
    from export.default_pack import export_default

    good = tmp_path / "good"
    good.mkdir()
    for i, img in enumerate(SyntheticLine(seed=8).good(3)):
        cv2.imwrite(str(good / f"g{i}.png"), img)
    enroll(default_pack, sorted(good.iterdir()), tmp_path / "state", quiet=True, log=lambda m: None)
    other = load_pack(export_default(tmp_path / "pack2", taps=(4, 10)))
    with pytest.raises(StateError, match="enroll again for this pack"):
        load_state(tmp_path / "state", other)
    messages = []
    state = enroll(other, [], tmp_path / "state", quiet=True, log=messages.append)
    assert any("rebuilding its 3 references" in m for m in messages)
    assert len(state.references) == 3 and state.bank.channels == 152
    assert load_state(tmp_path / "state", other).pack_model_id == other.model_id
