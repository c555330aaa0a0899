"""Detection metrics: image-level ROC/AUROC, pixel AUROC, AUPRO, threshold reports.

Pure NumPy. Conventions used throughout:
  * label 1 / True = anomalous (positive), 0 / False = good (negative);
  * higher score = more anomalous; a verdict is "anomalous" iff score >= threshold.
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

__all__ = [
    "roc_curve",
    "auroc",
    "pixel_auroc",
    "aupro",
    "threshold_metrics",
    "best_threshold",
]


# --------------------------------------------------------------------------- validation


def _as_scores(scores, name: str = "scores") -> np.ndarray:
    arr = np.asarray(scores)
    if arr.dtype == bool:
        arr = arr.astype(np.float32)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"{name} must be real numbers, got dtype {arr.dtype}")
    arr = arr.ravel()
    if np.issubdtype(arr.dtype, np.floating) and np.isnan(arr).any():
        raise ValueError(f"{name} contain NaN ({int(np.isnan(arr).sum())} of {arr.size} values)")
    return arr


def _as_labels(labels, name: str = "labels") -> np.ndarray:
    arr = np.asarray(labels)
    if arr.dtype == bool:
        return arr.ravel()
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"{name} must be bool or 0/1, got dtype {arr.dtype}")
    arr = arr.ravel()
    if not np.all((arr == 0) | (arr == 1)):  # also rejects NaN
        raise ValueError(f"{name} must contain only 0/1 (or bool); found other values")
    return arr.astype(bool)


def _scores_and_labels(scores, labels, need_both_classes: bool = True):
    s = _as_scores(scores)
    y = _as_labels(labels)
    if s.size != y.size:
        raise ValueError(f"scores and labels differ in length: {s.size} vs {y.size}")
    if s.size == 0:
        raise ValueError("scores and labels are empty")
    if need_both_classes:
        n_pos = int(np.count_nonzero(y))
        if n_pos == 0 or n_pos == y.size:
            only = "anomalous (1)" if n_pos else "good (0)"
            raise ValueError(
                f"only one class present (all {y.size} labels are {only}); "
                "ROC/AUROC need both good and anomalous samples"
            )
    return s, y


# --------------------------------------------------------------------------- ROC / AUROC


def roc_curve(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve with one point per distinct score (ties collapse into one point).

    Returns (fpr, tpr, thresholds), thresholds strictly decreasing; point i is the
    operating point "anomalous iff score >= thresholds[i]". The first point is
    (0, 0) at threshold +inf, as in sklearn (without drop_intermediate).
    """
    s, y = _scores_and_labels(scores, labels)
    order = np.argsort(s, kind="stable")[::-1]
    s_sorted = s[order]
    y_sorted = y[order]
    del order
    # Last index of each run of equal scores in the descending order.
    last_of_run = np.r_[np.flatnonzero(s_sorted[1:] != s_sorted[:-1]), s_sorted.size - 1]
    tps = np.cumsum(y_sorted, dtype=np.int64)[last_of_run]
    fps = (last_of_run + 1) - tps
    n_pos, n_neg = tps[-1], fps[-1]
    fpr = np.r_[0.0, fps / n_neg]
    tpr = np.r_[0.0, tps / n_pos]
    thresholds = np.r_[np.inf, s_sorted[last_of_run].astype(np.float64)]
    return fpr, tpr, thresholds


def auroc(scores, labels) -> float:
    """Area under the ROC curve (ties count 0.5), equal to sklearn's roc_auc_score.

    Computed as the Mann-Whitney statistic, which is exactly the trapezoid area
    under roc_curve, but needs only a sorted copy of the negatives (memory-light
    for tens of millions of pixels).
    """
    s, y = _scores_and_labels(scores, labels)
    negatives = np.sort(s[~y])
    positives = s[y]
    # For each positive: #negatives strictly below (left) and #below-or-equal (right);
    # left + right = 2 * (wins + 0.5 * ties). Integer sums keep this exact.
    below = np.searchsorted(negatives, positives, side="left").sum(dtype=np.int64)
    below_or_tied = np.searchsorted(negatives, positives, side="right").sum(dtype=np.int64)
    n_pairs = float(positives.size) * float(negatives.size)
    return float((int(below) + int(below_or_tied)) / (2.0 * n_pairs))


# --------------------------------------------------------------------------- pixel metrics


def _check_pairs(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> None:
    if len(maps) != len(masks):
        raise ValueError(f"got {len(maps)} maps but {len(masks)} masks")
    if len(maps) == 0:
        raise ValueError("no maps given")
    for i, (m, g) in enumerate(zip(maps, masks)):
        if np.ndim(m) != 2 or np.ndim(g) != 2:
            raise ValueError(f"pair {i}: map and mask must be 2-D, got {np.shape(m)} and {np.shape(g)}")
        if np.shape(m) != np.shape(g):
            raise ValueError(f"pair {i}: map shape {np.shape(m)} != mask shape {np.shape(g)}")


def pixel_auroc(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], subsample: int = 1) -> float:
    """AUROC over all pixels of all images (mask > 0 = anomalous pixel).

    subsample=k keeps every k-th row and column of each pair. Values are
    concatenated as float32 (4 bytes + 1 byte per pixel).
    """
    _check_pairs(maps, masks)
    k = int(subsample)
    if k < 1 or k != subsample:
        raise ValueError(f"subsample must be a positive integer, got {subsample!r}")
    sizes = [np.asarray(m)[::k, ::k].size for m in maps]
    values = np.empty(sum(sizes), dtype=np.float32)
    truth = np.empty(sum(sizes), dtype=bool)
    pos = 0
    for m, g, n in zip(maps, masks, sizes):
        values[pos : pos + n] = np.asarray(m)[::k, ::k].ravel()
        truth[pos : pos + n] = (np.asarray(g)[::k, ::k] > 0).ravel()
        pos += n
    return auroc(values, truth)


def aupro(
    maps: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    fpr_limit: float = 0.3,
    num_thresholds: int = 200,
) -> float:
    """Normalised area under the per-region-overlap curve up to fpr_limit (MVTec AD).

    For each of num_thresholds thresholds evenly spaced over [min, max] of all map
    values (pixel positive iff value >= threshold):
      PRO = mean over every ground-truth connected component (8-connectivity, all
            images) of the fraction of its pixels predicted positive;
      FPR = fraction of normal pixels (mask == 0, all images) predicted positive.
    The curve, anchored at (0, 0) (threshold above the maximum, as in the MVTec
    reference code), is integrated with the trapezoid rule over [0, fpr_limit]
    (interpolated at fpr_limit) and divided by fpr_limit; a perfect map gives 1.0.
    """
    _check_pairs(maps, masks)
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    n_thr = int(num_thresholds)
    if n_thr < 2:
        raise ValueError(f"num_thresholds must be >= 2, got {num_thresholds}")

    lo, hi = np.inf, -np.inf
    for i, m in enumerate(maps):
        m = np.asarray(m)
        if m.size == 0:
            continue
        if np.isnan(m).any():
            raise ValueError(f"map {i} contains NaN")
        lo, hi = min(lo, float(m.min())), max(hi, float(m.max()))
    thresholds = np.linspace(lo, hi, n_thr)

    # Each pixel gets a bin b = #thresholds <= value; it is positive at threshold j iff j < b.
    normal_hist = np.zeros(n_thr + 1, dtype=np.int64)
    component_hists = []
    for m, g in zip(maps, masks):
        bins = np.searchsorted(thresholds, np.asarray(m, dtype=np.float64), side="right")
        defect = np.asarray(g) > 0
        normal_hist += np.bincount(bins[~defect], minlength=n_thr + 1)
        if not defect.any():
            continue
        n_labels, component = cv2.connectedComponents(defect.astype(np.uint8), connectivity=8)
        n_comp = n_labels - 1
        flat = (component[defect].astype(np.int64) - 1) * (n_thr + 1) + bins[defect]
        component_hists.append(np.bincount(flat, minlength=n_comp * (n_thr + 1)).reshape(n_comp, n_thr + 1))

    if not component_hists:
        raise ValueError("no defect components in the masks; AUPRO needs at least one anomalous region")
    n_normal = int(normal_hist.sum())
    if n_normal == 0:
        raise ValueError("no normal pixels in the masks; FPR is undefined")

    def positives_per_threshold(hist: np.ndarray) -> np.ndarray:
        # positives at threshold j = sum of hist[..., b] for b > j
        return np.cumsum(hist[..., ::-1], axis=-1)[..., ::-1][..., 1:]

    comp = np.concatenate(component_hists, axis=0)
    pro = (positives_per_threshold(comp) / comp.sum(axis=1, keepdims=True)).mean(axis=0)
    fpr = positives_per_threshold(normal_hist) / n_normal

    # Descending thresholds => FPR and PRO both non-decreasing; prepend the (0, 0) anchor.
    fpr = np.r_[0.0, fpr[::-1]]
    pro = np.r_[0.0, pro[::-1]]
    order = np.lexsort((pro, fpr))
    fpr, pro = fpr[order], pro[order]

    inside = fpr <= fpr_limit
    x, y = fpr[inside], pro[inside]
    if x[-1] < fpr_limit:  # the last point (threshold = min) has FPR 1, so there is a next one
        j = int(np.count_nonzero(inside))
        y_at_limit = y[-1] + (pro[j] - y[-1]) * (fpr_limit - x[-1]) / (fpr[j] - x[-1])
        x, y = np.r_[x, fpr_limit], np.r_[y, y_at_limit]
    area = float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) * 0.5))
    return area / fpr_limit


# --------------------------------------------------------------------------- thresholds


def threshold_metrics(scores, labels, threshold: float) -> dict:
    """Confusion-matrix metrics at a fixed threshold (anomalous iff score >= threshold).

    false_reject_rate = good parts scored >= threshold / good parts;
    miss_rate = defective parts scored < threshold / defective parts.
    precision and f1 are 0.0 when undefined; rates of an absent class
    (tpr/miss_rate without defects, tnr/false_reject_rate without good parts) are NaN,
    and balanced_accuracy averages only the classes present.
    """
    s, y = _scores_and_labels(scores, labels, need_both_classes=False)
    flagged = s >= threshold
    tp = int(np.count_nonzero(flagged & y))
    fp = int(np.count_nonzero(flagged & ~y))
    fn = int(np.count_nonzero(~flagged & y))
    tn = int(np.count_nonzero(~flagged & ~y))
    n_pos, n_neg = tp + fn, tn + fp

    tpr = tp / n_pos if n_pos else float("nan")
    tnr = tn / n_neg if n_neg else float("nan")
    precision = tp / (tp + fp) if tp + fp else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    present_rates = [r for r, n in ((tpr, n_pos), (tnr, n_neg)) if n]
    return {
        "accuracy": (tp + tn) / s.size,
        "balanced_accuracy": float(np.mean(present_rates)),
        "f1": f1,
        "false_reject_rate": fp / n_neg if n_neg else float("nan"),
        "miss_rate": fn / n_pos if n_pos else float("nan"),
        "tpr": tpr,
        "tnr": tnr,
        "precision": precision,
    }


def best_threshold(scores, labels) -> tuple[float, float]:
    """Oracle threshold maximising balanced accuracy, and that balanced accuracy.

    Candidates are the distinct scores (verdict: score >= threshold); among equally
    good thresholds the lowest is returned. Needs both classes.
    """
    s, y = _scores_and_labels(scores, labels)
    candidates = np.unique(s)
    positives = np.sort(s[y])
    negatives = np.sort(s[~y])
    tp = positives.size - np.searchsorted(positives, candidates, side="left")
    tn = np.searchsorted(negatives, candidates, side="left")
    balanced = 0.5 * (tp / positives.size + tn / negatives.size)
    best = int(np.argmax(balanced))
    return float(candidates[best]), float(balanced[best])
