"""Smoke tests on real photos from ../shared/data (skipped with the reason when it is absent)."""
import numpy as np
import pytest

from conftest import SHARED_DATA

MAGNETIC = SHARED_DATA / "magnetic_tile"
HAZELNUT = SHARED_DATA / "hazelnut_toy"


@pytest.mark.skipif(not MAGNETIC.is_dir(), reason=f"real data not present at {MAGNETIC}")
def test_magnetic_tile_few_shot_eval_runs_and_separates(default_pack, tmp_path):
    from edge.evaluation.evaluate import evaluate

    r = evaluate(default_pack, MAGNETIC, shots=16, seed=0, report_dir=tmp_path / "report", quiet=True,
                 log=lambda m: None)
    assert r["n_test"] == 592 and r["n_anomalous"] == 392
    # Measured 0.79 / 0.77 at 16 shots, seed 0 (docs/evaluation.md); well above chance either way.
    assert r["image_auroc"] > 0.65 and r["pixel_auroc"] > 0.65
    assert (tmp_path / "report" / "roc.png").is_file()


@pytest.mark.skipif(not HAZELNUT.is_dir(), reason=f"real data not present at {HAZELNUT}")
def test_hazelnut_one_shot_finds_both_real_defects(default_pack):
    from edge.evaluation.dataset import open_mvtec, read_mask
    from edge.inference.preprocess import read_image
    from edge.scoring.factory import build_scorer
    from edge.station.enrollment import build_state

    cat = open_mvtec(HAZELNUT)
    state = build_state(default_pack, [read_image(p) for p in cat.train_good], quiet=True)
    scorer = build_scorer(default_pack, state)
    for sample in cat.test:
        img = read_image(sample.path)
        r = scorer.score_one(img)
        truth = read_mask(sample, img.shape[:2])
        peak = np.unravel_index(np.argmax(r.map_at_frame()), truth.shape)
        # The hottest pixel lies on the real defect (within a few pixels of its mask).
        ys, xs = np.nonzero(truth)
        assert np.min(np.hypot(ys - peak[0], xs - peak[1])) < 16, sample.path


@pytest.mark.slow
@pytest.mark.skipif(not MAGNETIC.is_dir(), reason=f"real data not present at {MAGNETIC}")
def test_magnetic_tile_full_shot_threshold_reaches_target_balanced_accuracy(default_pack):
    from edge.evaluation.evaluate import evaluate

    r = evaluate(default_pack, MAGNETIC, shots=None, seed=0, quiet=True, log=lambda m: None)
    # The foundation issue's target for the automatic threshold; measured 0.911 (docs/evaluation.md).
    assert r["balanced_accuracy"] >= 0.90
    assert r["image_auroc"] >= 0.95
