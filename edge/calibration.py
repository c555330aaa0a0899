"""Automatic decision threshold from normal references alone: no defective samples, no hand-set number.

Enrollment scores each reference image against a bank built without it (k-fold hold-out), which
shows how high a *normal* part scores. The threshold is the (1 - target false-reject rate) point of
a robust normal fit to those scores: median + z * IQR/1.349. The robust fit matters: held-out
scores have a heavy upper tail (a few unusual good parts), and an empirical high quantile or the
maximum lands far above where normal parts really sit. How it does on real photos: docs/evaluation.md.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from statistics import NormalDist

import numpy as np

TARGET_FALSE_REJECT = 0.05


@dataclass
class Calibration:
    threshold: float
    method: str
    n_scores: int
    median: float
    spread: float  # robust standard deviation, IQR / 1.349
    max: float
    normal_scores: list[float]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        return cls(**d)


def calibrate(normal_scores, target_false_reject: float = TARGET_FALSE_REJECT) -> Calibration:
    scores = np.asarray(normal_scores, dtype=np.float64)
    if scores.size < 2 or not np.all(np.isfinite(scores)):
        raise ValueError("calibration needs at least two finite held-out normal scores")
    if not 0 < target_false_reject < 0.5:
        raise ValueError(f"target false-reject rate must be in (0, 0.5), got {target_false_reject}")
    med = float(np.median(scores))
    q1, q3 = np.quantile(scores, [0.25, 0.75])
    # Floor the spread so identical scores (a perfectly repeated frame) still leave a margin.
    spread = max(float(q3 - q1) / 1.349, 1e-3 * max(abs(med), 1e-6))
    z = NormalDist().inv_cdf(1 - target_false_reject)
    return Calibration(
        threshold=med + z * spread,
        method=f"holdout median + {z:.3f} * IQR/1.349 (target false-reject {target_false_reject:g})",
        n_scores=int(scores.size), median=med, spread=spread, max=float(scores.max()),
        normal_scores=[float(s) for s in scores],
    )
