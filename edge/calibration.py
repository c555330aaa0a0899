"""Automatic decision threshold from normal references alone: no defective samples, no hand-set number.

Enrollment scores each reference image against a bank built without it (k-fold hold-out), which
shows how high a *normal* part can score. The threshold sits above the bulk of those scores by a
margin measured in the spread of the same scores, so it scales with the data rather than with a
constant tuned per dataset.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

# Threshold = q(QUANTILE) + MARGIN * (q(QUANTILE) - median): past the upper tail of held-out normal
# scores, with a margin proportional to the tail's own spread.
QUANTILE = 0.95
MARGIN = 0.5


@dataclass
class Calibration:
    threshold: float
    method: str
    n_scores: int
    median: float
    quantile: float
    max: float
    normal_scores: list[float]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        return cls(**d)


def calibrate(normal_scores, quantile: float = QUANTILE, margin: float = MARGIN) -> Calibration:
    scores = np.asarray(normal_scores, dtype=np.float64)
    if scores.size == 0 or not np.all(np.isfinite(scores)):
        raise ValueError("calibration needs at least one finite held-out normal score")
    med = float(np.median(scores))
    q = float(np.quantile(scores, quantile))
    spread = max(q - med, 1e-6 * max(abs(med), 1.0))
    threshold = q + margin * spread
    return Calibration(
        threshold=float(threshold), method=f"holdout q{quantile:g} + {margin:g}*(q - median)",
        n_scores=int(scores.size), median=med, quantile=q, max=float(scores.max()),
        normal_scores=[float(s) for s in scores],
    )
