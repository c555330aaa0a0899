"""Which encoder numerics a threshold holds for: a state's calibration against the scoring backend.

A state records the backend family (onnxruntime, onnxruntime-tensorrt, tensorrt) and precision (fp32,
fp16) its bank and threshold were built with (Calibration.backend, .precision). ONNX Runtime's CPU and
CUDA providers agree to float32 rounding and count as one; TensorRT's engines (FP16, TF32 tactics) do
not. Owns the stamp, the comparison and the refusal; recalibrating (enrolling the state's references
again) is the station's (edge.station.engine_calibration).
"""
from __future__ import annotations

from edge.errors import StateError


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
