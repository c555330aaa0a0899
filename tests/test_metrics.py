import numpy as np
import pytest

from edge.evaluation.metrics import aupro, auroc, best_threshold, pixel_auroc, roc_curve, threshold_metrics

_trapezoid = getattr(np, "trapezoid", None) or np.trapz


# --------------------------------------------------------------------------- AUROC / ROC


def test_auroc_small_case_counts_correctly_ordered_pairs():
    # positives {0.35, 0.8} vs negatives {0.1, 0.4}:
    # 0.35>0.1 yes, 0.35>0.4 no, 0.8>0.1 yes, 0.8>0.4 yes -> 3/4
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)


def test_auroc_ties_get_half_credit():
    assert auroc([0.5, 0.5], [0, 1]) == pytest.approx(0.5)
    # positives {0.5, 0.9} vs negatives {0.2, 0.5}:
    # 0.5 vs 0.2 -> 1, 0.5 vs 0.5 -> 0.5, 0.9 vs both -> 2  => 3.5/4
    assert auroc([0.2, 0.5, 0.5, 0.9], [False, False, True, True]) == pytest.approx(0.875)


def test_auroc_perfect_and_inverted_detectors():
    assert auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert auroc([0.8, 0.9, 0.1, 0.2], [0, 0, 1, 1]) == 0.0


def test_roc_curve_points_small_case():
    # descending: 0.8(+) 0.4(-) 0.35(+) 0.1(-), 2 positives, 2 negatives
    fpr, tpr, thr = roc_curve([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    np.testing.assert_allclose(thr, [np.inf, 0.8, 0.4, 0.35, 0.1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])


def test_roc_curve_collapses_tied_scores_into_one_point():
    # the two 0.5 scores (one +, one -) enter together: (fpr, tpr) jumps (0, .5) -> (.5, 1)
    fpr, tpr, thr = roc_curve([0.2, 0.5, 0.5, 0.9], [0, 0, 1, 1])
    np.testing.assert_allclose(thr, [np.inf, 0.9, 0.5, 0.2])
    np.testing.assert_allclose(tpr, [0, 0.5, 1, 1])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 1])


def test_auroc_equals_trapezoid_of_roc_and_brute_force_pair_count():
    rng = np.random.default_rng(0)
    labels = rng.random(300) < 0.3
    scores = np.round(rng.normal(size=300) + labels, 1)  # rounding creates many ties
    fpr, tpr, _ = roc_curve(scores, labels)
    pos, neg = scores[labels], scores[~labels]
    diff = pos[:, None] - neg[None, :]
    brute = ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size
    assert auroc(scores, labels) == pytest.approx(brute, abs=1e-12)
    assert _trapezoid(tpr, fpr) == pytest.approx(brute, abs=1e-12)


@pytest.mark.parametrize("func", [auroc, roc_curve, best_threshold])
def test_single_class_raises(func):
    with pytest.raises(ValueError, match="one class"):
        func([0.1, 0.2, 0.3], [0, 0, 0])
    with pytest.raises(ValueError, match="one class"):
        func([0.1, 0.2, 0.3], [1, 1, 1])


def test_length_mismatch_nan_and_bad_labels_raise():
    with pytest.raises(ValueError, match="length"):
        auroc([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match="NaN"):
        roc_curve([0.1, np.nan, 0.3], [0, 1, 1])
    with pytest.raises(ValueError, match="0/1"):
        auroc([0.1, 0.2, 0.3], [0, 2, 1])


# --------------------------------------------------------------------------- pixel AUROC


def test_pixel_auroc_concatenates_pairs_of_different_sizes_and_accepts_255_masks():
    rng = np.random.default_rng(1)
    masks = [np.zeros((6, 8), np.uint8), np.zeros((5, 5), np.uint8)]
    masks[0][1:3, 2:5] = 255
    masks[1][3:, 3:] = 255
    maps = [rng.random(m.shape) + (m > 0) * 0.5 for m in masks]
    expected = auroc(
        np.concatenate([m.ravel() for m in maps]).astype(np.float32),
        np.concatenate([g.ravel() > 0 for g in masks]),
    )
    assert pixel_auroc(maps, masks) == pytest.approx(expected)


def test_pixel_auroc_subsample_takes_every_kth_row_and_column():
    rng = np.random.default_rng(2)
    mask = np.zeros((9, 9), bool)
    mask[2:7, 2:7] = True
    amap = rng.random((9, 9)) + mask * 0.3
    expected = auroc(amap[::2, ::2].ravel().astype(np.float32), mask[::2, ::2].ravel())
    assert pixel_auroc([amap], [mask], subsample=2) == pytest.approx(expected)


def test_pixel_auroc_rejects_mismatched_pair_shapes():
    with pytest.raises(ValueError, match="shape"):
        pixel_auroc([np.zeros((4, 4))], [np.zeros((4, 5))])


# --------------------------------------------------------------------------- AUPRO


def test_aupro_map_equal_to_mask_is_perfect():
    mask = np.zeros((10, 10), np.uint8)
    mask[3:5, 3:5] = 1
    assert aupro([mask.astype(np.float64)], [mask]) == pytest.approx(1.0)


def test_aupro_one_of_two_components_detected_hand_computed():
    # Component A (4 px) has map 1, component B (4 px) and normal pixels have map 0.
    # t = 0 (lowest threshold): everything positive -> (FPR 1, PRO 1).
    # t > 0: only A positive -> FPR 0, PRO = (1 + 0) / 2 = 0.5.
    # Curve (0,0) -> (0,0.5) -> (1,1); at FPR 0.3: PRO = 0.5 + 0.5*0.3 = 0.65.
    # Area over [0, 0.3] = 0.3 * (0.5 + 0.65) / 2 = 0.1725;  / 0.3 = 0.575
    mask = np.zeros((10, 10), np.uint8)
    mask[1:3, 1:3] = 1
    mask[6:8, 6:8] = 1
    amap = np.zeros((10, 10))
    amap[1:3, 1:3] = 1.0
    assert aupro([amap], [mask], fpr_limit=0.3) == pytest.approx(0.575)


def test_aupro_good_image_contributes_normal_pixels():
    # As above, plus a good image (empty mask) with 4 false-alarm pixels at 1.0.
    # normal pixels: 100 - 8 + 100 = 192; for t > 0: FPR = 4/192 = 1/48, PRO = 0.5.
    # Curve (0,0) -> (1/48, 0.5) -> (1, 1).
    # PRO at 0.3 = 0.5 + 0.5 * (0.3 - 1/48) / (1 - 1/48)
    # area = (1/48)*(0 + 0.5)/2 + (0.3 - 1/48)*(0.5 + PRO(0.3))/2, normalised by 0.3
    mask = np.zeros((10, 10), np.uint8)
    mask[1:3, 1:3] = 1
    mask[6:8, 6:8] = 1
    amap = np.zeros((10, 10))
    amap[1:3, 1:3] = 1.0
    good_map = np.zeros((10, 10))
    good_map[0, :4] = 1.0
    f = 1 / 48
    pro_at_limit = 0.5 + 0.5 * (0.3 - f) / (1 - f)
    expected = (f * 0.5 / 2 + (0.3 - f) * (0.5 + pro_at_limit) / 2) / 0.3
    got = aupro([amap, good_map], [mask, np.zeros((10, 10), bool)], fpr_limit=0.3)
    assert got == pytest.approx(expected)


def _aupro_brute_force(maps, masks, fpr_limit, num_thresholds):
    import cv2

    components = []  # (image index, boolean region)
    for i, g in enumerate(masks):
        n, lab = cv2.connectedComponents((g > 0).astype(np.uint8), connectivity=8)
        for c in range(1, n):
            components.append((i, lab == c))
    n_normal = sum(int((g == 0).sum()) for g in masks)
    lo = min(m.min() for m in maps)
    hi = max(m.max() for m in maps)
    points = [(0.0, 0.0)]
    for t in np.linspace(lo, hi, num_thresholds):
        false_pos = 0
        for m, g in zip(maps, masks):
            false_pos += int(((m >= t) & (g == 0)).sum())
        overlaps = []
        for i, region in components:
            overlaps.append((maps[i][region] >= t).mean())
        points.append((false_pos / n_normal, float(np.mean(overlaps))))
    points.sort()
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:  # cut the segment at fpr_limit
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


def test_aupro_matches_plain_threshold_loop_on_random_maps():
    rng = np.random.default_rng(3)
    masks, maps = [], []
    for k in range(4):
        g = np.zeros((16, 12), np.uint8)
        if k != 3:  # image 3 is a good part
            g[2 + k : 6 + k, 3:7] = 255
            g[11:14, 8 + (k % 2) : 11] = 255
        maps.append(rng.random(g.shape) + (g > 0) * rng.uniform(0.0, 0.8))
        masks.append(g)
    for limit in (0.05, 0.3, 1.0):
        expected = _aupro_brute_force(maps, masks, limit, 50)
        assert aupro(maps, masks, fpr_limit=limit, num_thresholds=50) == pytest.approx(expected, abs=1e-12)


def test_aupro_without_defect_components_raises():
    with pytest.raises(ValueError, match="no defect components"):
        aupro([np.random.default_rng(0).random((5, 5))], [np.zeros((5, 5), np.uint8)])


# --------------------------------------------------------------------------- thresholds


def test_threshold_metrics_small_confusion_matrix():
    # good:  0.1 0.2 0.3 0.6 0.7 -> at t=0.5 rejected: 0.6, 0.7  => FP=2, TN=3
    # defect: 0.4 0.5 0.8 0.9    -> caught: 0.5 (>= t), 0.8, 0.9 => TP=3, FN=1
    # accuracy = 6/9; tpr = 3/4; tnr = 3/5; balanced = (0.75 + 0.6)/2 = 0.675
    # precision = 3/5; f1 = 2*3/(2*3 + 2 + 1) = 6/9; false reject = 2/5; miss = 1/4
    scores = [0.1, 0.2, 0.3, 0.6, 0.7, 0.4, 0.5, 0.8, 0.9]
    labels = [0, 0, 0, 0, 0, 1, 1, 1, 1]
    m = threshold_metrics(scores, labels, 0.5)
    assert m["accuracy"] == pytest.approx(6 / 9)
    assert m["tpr"] == pytest.approx(0.75)
    assert m["tnr"] == pytest.approx(0.6)
    assert m["balanced_accuracy"] == pytest.approx(0.675)
    assert m["precision"] == pytest.approx(0.6)
    assert m["f1"] == pytest.approx(6 / 9)
    assert m["false_reject_rate"] == pytest.approx(0.4)
    assert m["miss_rate"] == pytest.approx(0.25)


def test_threshold_metrics_undefined_precision_and_single_class():
    # nothing flagged -> precision and f1 undefined -> 0.0
    m = threshold_metrics([0.1, 0.2, 0.3], [0, 1, 1], 0.9)
    assert m["precision"] == 0.0 and m["f1"] == 0.0
    assert m["miss_rate"] == 1.0 and m["false_reject_rate"] == 0.0
    # only good parts: balanced accuracy is the tnr alone (2 of 3 accepted)
    m = threshold_metrics([0.1, 0.2, 0.7], [0, 0, 0], 0.5)
    assert m["balanced_accuracy"] == pytest.approx(2 / 3)
    assert m["false_reject_rate"] == pytest.approx(1 / 3)


def test_best_threshold_maximises_balanced_accuracy():
    # good 0.1 0.2 0.3 0.6, defect 0.5 0.9
    # t=0.5: tpr 1, tnr 3/4 -> 0.875; t=0.6: tpr 1/2, tnr 3/4 -> 0.625; t=0.9: 1/2, 1 -> 0.75
    threshold, balanced = best_threshold([0.1, 0.2, 0.3, 0.6, 0.5, 0.9], [0, 0, 0, 0, 1, 1])
    assert threshold == pytest.approx(0.5)
    assert balanced == pytest.approx(0.875)
