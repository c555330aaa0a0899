"""The learned scorer: the pack encoder (teacher) and a small student network in one ONNX graph.

The graph (`student-<sha>.onnx` in the station state, built by `export.student`) emits the
teacher-student discrepancy on the encoder's patch grid, already normalised per position with the
mean and spread of held-out good images: N x 1 x h x w, about 0 on normal parts and in units of
"normal spread" elsewhere. `StudentScorer` upsamples and smooths it like the bank's maps and decides
with its own calibrated threshold, so the line runtime uses it as it uses `Scorer`. No torch here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .backend import OnnxRuntimeBackend
from .calibration import Calibration
from .errors import StateError
from .pack import Pack, sha256_file
from .scorer import FeatureExtractor, Scorer, grid_maps

OUTPUT = "anomaly_map"
SCORERS = ("bank", "student")
# What a station config's `scorer: auto` runs when its state holds a student. The bank, by
# measurement on magnetic_tile (docs/evaluation.md, "Learned scorer"): the student scores a little
# lower on every quality metric, and both meet the frame-rate target.
DEFAULT_SCORER = "bank"


@dataclass
class StudentSpec:
    """The student part of a station state: the fused graph, its per-position statistics, threshold."""

    file: str
    sha256: str
    position_mean: np.ndarray  # h x w, raw discrepancy of held-out good images
    position_std: np.ndarray
    calibration: Calibration
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"file": self.file, "sha256": self.sha256, "grid": list(self.position_mean.shape),
                "position_mean": np.round(self.position_mean, 6).tolist(),
                "position_std": np.round(self.position_std, 6).tolist(),
                "calibration": self.calibration.to_dict(), "info": self.info}

    @classmethod
    def from_dict(cls, d: dict) -> "StudentSpec":
        mean, std = np.asarray(d["position_mean"], np.float32), np.asarray(d["position_std"], np.float32)
        if mean.shape != tuple(d["grid"]) or std.shape != mean.shape:
            raise ValueError(f"student statistics have shapes {mean.shape}/{std.shape}, grid says {d['grid']}")
        return cls(str(d["file"]), str(d["sha256"]), mean, std, Calibration.from_dict(d["calibration"]),
                   dict(d.get("info") or {}))

    def check_file(self, root: Path) -> Path:
        path = root / self.file
        if not path.is_file():
            raise StateError(f"{path}: student graph missing (train it: anomaly-edge enroll --scorer student)")
        if sha256_file(path) != self.sha256:
            raise StateError(f"{path}: student graph does not match the sha256 in {root / 'state.yaml'}")
        return path


class StudentScorer(Scorer):
    """Scores frames with the fused teacher-student graph; same interface as the bank `Scorer`."""

    def __init__(self, pack: Pack, graph: str | Path, threshold: float, threads: int | None = None,
                 calibration=None):
        grid = tuple(pack.encoder.feature_shape[1:])
        backend = OnnxRuntimeBackend(pack, threads=threads, path=Path(graph), output=OUTPUT,
                                     output_shape=(1, *grid))
        super().__init__(pack, None, threshold, FeatureExtractor(pack, backend), calibration=calibration)

    @classmethod
    def from_spec(cls, pack: Pack, root: str | Path, spec: StudentSpec) -> "StudentScorer":
        return cls(pack, spec.check_file(Path(root)), spec.calibration.threshold, calibration=spec.calibration)

    def anomaly_maps(self, features: np.ndarray) -> np.ndarray:
        return grid_maps(features[..., 0], self.pack)


def student_scorer(pack: Pack, state, kind: str) -> StudentScorer | None:
    """The student scorer of a station state for `kind` student or auto; None where the bank scores
    (auto on a state without a student, or with DEFAULT_SCORER bank)."""
    if kind not in (*SCORERS, "auto"):
        raise StateError(f"scorer {kind!r}: expected one of bank, student, auto")
    student = state.student
    if kind == "student" and student is None:
        raise StateError(f"{state.root}: holds no student (train one: anomaly-edge enroll --scorer student)")
    if student is None or (kind == "auto" and DEFAULT_SCORER == "bank"):
        return None
    return StudentScorer.from_spec(pack, state.root, student)
