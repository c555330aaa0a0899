"""Calibration follows the engine: a state calibrated with other numerics than the running backend's is
refused or recalibrated, by the station's policy.

The comparison and the refusal are edge.scoring.numerics (a threshold holds only for the encoder
numerics it was computed with). Recalibrating enrolls the state's stored references again with the
running backend, which rebuilds the bank and the threshold, and the message says so. Owns the policy;
must not be imported by edge.scoring.
"""
from __future__ import annotations

import logging

from edge.errors import StateError
from edge.scoring.numerics import check, mismatch
from edge.station.enrollment import enroll

log = logging.getLogger(__name__)
POLICIES = ("refuse", "recalibrate")


def follow_engine(pack, state, extractor, policy: str = "refuse", tiling=None):
    """`state` when its calibration holds for `extractor`'s backend; else, by `policy`, a StateError
    (refuse) or the state enrolled again from its stored references with that backend (recalibrate),
    saved where it was loaded from."""
    if policy not in POLICIES:
        raise ValueError(f"on_calibration_mismatch {policy!r}: choose {' or '.join(POLICIES)}")
    backend = extractor.backend
    why = mismatch(state, backend)
    if why is None:
        return state
    if policy == "refuse":
        check(state, backend)
    if state.root is None or not state.references:
        raise StateError(f"{why}: cannot recalibrate, the state holds no stored references (good/ is empty); "
                         "enroll good parts again with this backend")
    old = state.calibration.threshold
    log.warning("%s: recalibrating from its %d stored references with %s", why, len(state.references),
                backend.numerics)
    new = enroll(pack, [], state.root, seed=int(state.info.get("seed", 0)), extractor=extractor, quiet=True,
                 log=log.info, tiling=tiling)
    log.warning("recalibrated %s with %s: threshold %.4f -> %.4f (bank of %d patches rebuilt)", state.root,
                backend.numerics, old, new.calibration.threshold, len(new.bank))
    return new
