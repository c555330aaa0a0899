"""Calibration follows the engine: a threshold holds only for the encoder numerics it was computed with.

A state records the backend family (onnxruntime, onnxruntime-tensorrt, tensorrt) and precision (fp32,
fp16) its bank and threshold were built with (Calibration.backend, .precision). ONNX Runtime's CPU and
CUDA providers agree to float32 rounding and count as one; TensorRT's engines (FP16, TF32 tactics) do
not. Scoring with other numerics than the state's either refuses, naming both, or recalibrates: the
state's stored references are enrolled again with the running backend, which rebuilds the bank and the
threshold, and the message says so.
"""
from __future__ import annotations

import logging

from edge.errors import StateError

log = logging.getLogger(__name__)
POLICIES = ("refuse", "recalibrate")


def calibrated_with(calibration) -> str:
    return f"{calibration.backend} {calibration.precision}"


def stamp(state, backend) -> None:
    """Record on `state`'s calibration the backend that computed its features (enrollment)."""
    state.calibration.backend = backend.family
    state.calibration.precision = backend.precision


def mismatch(state, backend) -> str | None:
    """Why `state`'s threshold does not hold for `backend`, or None when it does."""
    cal = state.calibration
    if (cal.backend, cal.precision) == (backend.family, backend.precision):
        return None
    return (f"the station state{f' {state.root}' if state.root else ''} was calibrated with {calibrated_with(cal)}, "
            f"and this station scores with {backend.numerics} ({backend.name})")


def check(state, backend) -> None:
    """Raise StateError when `state` was calibrated with other numerics than `backend`'s."""
    why = mismatch(state, backend)
    if why is not None:
        raise StateError(f"{why}: its threshold does not hold here. Set gpu.on_calibration_mismatch: recalibrate "
                         f"(re-enrolls its {len(state.references)} stored references with {backend.numerics}), "
                         f"re-enroll, or score with gpu.backend the state was calibrated with")


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
    from edge.station.state import enroll

    old = state.calibration.threshold
    log.warning("%s: recalibrating from its %d stored references with %s", why, len(state.references),
                backend.numerics)
    new = enroll(pack, [], state.root, seed=int(state.info.get("seed", 0)), extractor=extractor, quiet=True,
                 log=log.info, tiling=tiling)
    log.warning("recalibrated %s with %s: threshold %.4f -> %.4f (bank of %d patches rebuilt)", state.root,
                backend.numerics, old, new.calibration.threshold, len(new.bank))
    return new
