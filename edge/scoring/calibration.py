"""Automatic decision threshold from normal references alone: no defective samples, no hand-set number.

Enrollment scores each reference image against a bank built without it (k-fold hold-out), which
shows how high a *normal* part scores. The threshold is the (1 - target false-reject rate) point of
a robust normal fit to those scores: median + z * IQR/1.349. The robust fit matters: held-out
scores have a heavy upper tail (a few unusual good parts), and an empirical high quantile or the
maximum lands far above where normal parts really sit. How it does on real photos: docs/evaluation.md.

Few-shot enrollment (`calibrate_few_shot`) adds synthetic defects pasted into the references and
places the threshold between the held-out good scores and the synthetic-defect scores. When the held-out
scores come from fewer independent units than a (1 - target) point needs (the quadrants of a single
shot), the good side is the largest held-out score, the conformal bound for so few units. Every
calibration also gives a conformal p-value for a new score: the share of held-out normal scores at
or above it, (1 + #{s_i >= s}) / (n + 1).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from statistics import NormalDist

import numpy as np

TARGET_FALSE_REJECT = 0.05


def check_target_false_reject(value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"target false-reject rate {value!r}: expected a number in (0, 0.5)") from None
    if not 0 < v < 0.5:
        raise ValueError(f"target false-reject rate must be in (0, 0.5), got {value}")
    return v


@dataclass
class Calibration:
    threshold: float
    method: str
    n_scores: int
    median: float
    spread: float  # robust standard deviation, IQR / 1.349
    max: float
    normal_scores: list[float]
    source: str = "holdout"  # where the scores came from: holdout, quadrants, loso, +synthetic
    target_false_reject: float = TARGET_FALSE_REJECT
    synthetic_scores: list[float] = field(default_factory=list)
    # The encoder backend and precision the scores were computed with (edge.station.engine_calibration);
    # states written before this was recorded were all calibrated on ONNX Runtime in float32.
    backend: str = "onnxruntime"
    precision: str = "fp32"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        return cls(**d)  # state files written before `source` and friends get their defaults

    def p_value(self, score: float) -> float:
        """Conformal p-value of `score` against the held-out normal scores, in (0, 1]: small = unlike
        any good reference. Non-increasing in the score."""
        normal = np.asarray(self.normal_scores, np.float64)
        return float((1 + np.count_nonzero(normal >= score)) / (normal.size + 1))


def _robust(scores: np.ndarray) -> tuple[float, float]:
    med = float(np.median(scores))
    q1, q3 = np.quantile(scores, [0.25, 0.75])
    # Floor the spread so identical scores (a perfectly repeated frame) still leave a margin.
    return med, max(float(q3 - q1) / 1.349, 1e-3 * max(abs(med), 1e-6))


def calibrate(normal_scores, target_false_reject: float = TARGET_FALSE_REJECT, source: str = "holdout") -> Calibration:
    scores = np.asarray(normal_scores, dtype=np.float64)
    if scores.size < 2 or not np.all(np.isfinite(scores)):
        raise ValueError("calibration needs at least two finite held-out normal scores")
    target_false_reject = check_target_false_reject(target_false_reject)
    med, spread = _robust(scores)
    z = NormalDist().inv_cdf(1 - target_false_reject)
    return Calibration(
        threshold=med + z * spread,
        method=f"{source} median + {z:.3f} * IQR/1.349 (target false-reject {target_false_reject:g})",
        n_scores=int(scores.size), median=med, spread=spread, max=float(scores.max()),
        normal_scores=[float(s) for s in scores], source=source, target_false_reject=target_false_reject,
    )


def conformal_rank(units: int, target_false_reject: float) -> int:
    """The rank (1-based, among `units` exchangeable held-out scores) a new score stays at or under
    with probability at least 1 - target: ceil((1 - target) * (units + 1)). Above `units` no held-out
    score is high enough for that guarantee."""
    return int(np.ceil((1 - target_false_reject) * (units + 1) - 1e-9))


def calibrate_few_shot(normal_scores, synthetic_scores, normal_source: str,
                       target_false_reject: float = TARGET_FALSE_REJECT, cap: bool = True,
                       held_out_units: int | None = None) -> Calibration:
    """Threshold from held-out good scores, capped below the synthetic defects' scores.

    The good side is the robust fit of `calibrate` to the held-out scores (quadrants and re-lit copies
    of a single shot, or leave-one-shot-out views). Leave-one-shot-out overstates how far a new good
    part lands when there are few shots (the head that scores a held-out shot has one shot fewer, and a
    shot's augmented views stand together), so with `cap` the threshold is capped at the synthetic-defect
    median: at least half of the synthetic defects pasted into the references stay above it. Without
    `cap` (many shots held out by folds, no views: the bank's own k-fold rule) the synthetic scores are
    only recorded, and the method says how many of them the threshold would pass.

    `held_out_units`: how many independent units the held-out scores come from (4 for the quadrants of
    a single shot, whose every view and re-lit copy is scored once per quadrant). When that is fewer
    than `conformal_rank` needs, the good side is the largest held-out score instead of the robust fit:
    the parts of one part vary less than different parts do, so a fit to them lands under most new good
    parts (magnetic_tile at 1 shot: false-reject 0.84-0.99 with the fit; docs/evaluation.md).
    """
    cal = calibrate(normal_scores, target_false_reject, source=normal_source)
    synthetic = np.asarray(synthetic_scores, np.float64)
    if synthetic.size == 0 or not np.all(np.isfinite(synthetic)):
        raise ValueError("few-shot calibration needs finite synthetic-defect scores")
    z = NormalDist().inv_cdf(1 - cal.target_false_reject)
    fit = f"{normal_source} median + {z:.3f} * IQR/1.349 = {cal.threshold:.4g}"
    if held_out_units is not None and conformal_rank(held_out_units, cal.target_false_reject) > held_out_units:
        cal.threshold = cal.max
        fit = f"{normal_source} max {cal.max:.4g} ({held_out_units} held-out units, too few for the fit)"
    good_threshold = cal.threshold
    median = float(np.median(synthetic))
    cal.synthetic_scores = [float(s) for s in synthetic]
    if cap:
        cal.threshold = min(good_threshold, median)
        cal.source = f"{normal_source}+synthetic"
        cal.method = (f"{fit}, capped at the synthetic-defect median {median:.4g} "
                      f"(target false-reject {cal.target_false_reject:g})")
    else:
        above = float(np.mean(synthetic > good_threshold))
        cal.method = (f"{fit} (target false-reject {cal.target_false_reject:g}); {above:.0%} of "
                      f"{synthetic.size} synthetic defects score above it")
    return cal
