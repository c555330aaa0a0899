"""The learned scorer: the pack encoder (teacher) and a small student network in one ONNX graph.

The graph (`student-<sha>.onnx` in the station state, built by `export.student`) emits the
teacher-student discrepancy on the encoder's patch grid, already normalised per position with the
mean and spread of held-out good images: N x 1 x h x w, about 0 on normal parts and in units of
"normal spread" elsewhere. `StudentScorer` upsamples and smooths it like the bank's maps and decides
with its own calibrated threshold, so the line runtime uses it as it uses `Scorer`. No torch here.

A student whose training did not run to the end of its schedule (stopped by the time budget) is
"undertrained" (`StudentTraining.status`): `scorer: auto` never picks it, and `scorer: student`
refuses it unless told `allow_undertrained` (`score --allow-undertrained`, station config
`student_allow_undertrained: true`). A state written before the training record existed is judged
from its `info` (completed when it says it ran all its planned steps without the budget stopping it;
"unknown", treated like undertrained, when it cannot tell). `chosen_student` makes that choice for
edge.scoring.factory; the scorer of kind `student` registers itself with edge.scoring.registry.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge.inference.backend import OnnxRuntimeBackend
from edge.scoring.calibration import Calibration
from edge.errors import StateError
from edge.pack import Pack, sha256_file
from edge.scoring.registry import ScorerRequest, register_scorer
from edge.inference.features import FeatureExtractor
from edge.scoring.scorer import Scorer, grid_maps

log = logging.getLogger(__name__)

OUTPUT = "anomaly_map"
SCORERS = ("bank", "student")
# What a station config's `scorer: auto` runs when its state holds a student. The bank, by
# measurement on magnetic_tile (docs/evaluation.md, "Learned scorer"): the student scores a little
# lower on every quality metric, and both meet the frame-rate target.
DEFAULT_SCORER = "bank"
STOP_REASONS = ("completed", "time_budget", "unknown")
LOSS_WINDOW = 50  # steps (at most a fifth of those done) over which the final loss and its trend are taken


def loss_summary(losses: list[float]) -> tuple[float | None, float | None, float | None]:
    """(first, final, trend) of a loss history: the means of the first and the last window, and the
    relative change of the last window's mean against the window before it (negative: still falling)."""
    n = len(losses)
    if n == 0:
        return None, None, None
    w = max(1, min(LOSS_WINDOW, n // 5))
    first, final = float(np.mean(losses[:w])), float(np.mean(losses[-w:]))
    trend = float(final / np.mean(losses[-2 * w:-w]) - 1) if n >= 2 * w else None
    return first, final, trend


@dataclass(frozen=True)
class StudentTraining:
    """How far the student's training got, which decides whether a station may score with it."""

    steps_done: int | None
    steps_planned: int | None
    stopped_by: str = "unknown"  # completed | time_budget | unknown (STOP_REASONS)
    final_loss: float | None = None  # mean loss of the last window of steps
    first_loss: float | None = None  # mean loss of the first window: how far it came down
    loss_trend: float | None = None  # last window against the one before, relative (-0.09: still falling 9%)
    time_budget_s: float | None = None
    train_seconds: float | None = None
    checkpoint: str | None = None  # where training can resume from, when it was given one

    @property
    def status(self) -> str:
        """complete | undertrained | unknown (a state written before the record, whose info cannot tell)."""
        if self.stopped_by == "completed" and self.steps_done is not None and self.steps_planned is not None \
                and self.steps_done >= self.steps_planned:
            return "complete"
        return "unknown" if self.stopped_by == "unknown" else "undertrained"

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    def to_dict(self) -> dict:
        return {"status": self.status, "steps_done": self.steps_done, "steps_planned": self.steps_planned,
                "stopped_by": self.stopped_by, "final_loss": _round(self.final_loss),
                "first_loss": _round(self.first_loss), "loss_trend": _round(self.loss_trend),
                "time_budget_s": self.time_budget_s, "train_seconds": self.train_seconds,
                "checkpoint": self.checkpoint}

    @classmethod
    def from_dict(cls, d: dict) -> "StudentTraining":
        stopped_by = str(d.get("stopped_by", "unknown"))
        if stopped_by not in STOP_REASONS:
            raise ValueError(f"student training stopped_by {stopped_by!r}: expected one of {', '.join(STOP_REASONS)}")
        return cls(**{k: d.get(k) for k in ("steps_done", "steps_planned", "final_loss", "first_loss", "loss_trend",
                                             "time_budget_s", "train_seconds", "checkpoint")}, stopped_by=stopped_by)

    @classmethod
    def from_info(cls, info: dict) -> "StudentTraining":
        """The record of a state written before it existed, from the student's `info`: completed when it
        ran its planned steps without the time budget stopping it, else what it says, else unknown."""
        steps, planned = info.get("steps"), (info.get("config") or {}).get("steps")
        budget = info.get("stopped_by_time_budget")
        if budget is True:
            stopped_by = "time_budget"
        elif budget is False and steps is not None and planned is not None and steps >= planned:
            stopped_by = "completed"
        else:
            stopped_by = "unknown"
        return cls(steps, planned, stopped_by, final_loss=info.get("final_loss"),
                   time_budget_s=(info.get("config") or {}).get("time_budget_s"),
                   train_seconds=info.get("train_seconds"))

    def describe(self) -> str:
        """'stopped by the 780 s time budget after 286 of 4000 steps (loss 0.452, down from 0.948; still
        falling: -19.0% over its last 50 steps against the 50 before)'"""
        steps = f"{_num(self.steps_done)} of {_num(self.steps_planned)} steps"
        if self.stopped_by == "time_budget":
            budget = f"the {self.time_budget_s:g} s time budget" if self.time_budget_s else "the time budget"
            head = f"stopped by {budget} after {steps}"
        elif self.stopped_by == "completed":
            head = f"completed {steps}"
        else:
            head = f"training record incomplete ({steps}, stop reason unknown)"
        loss = []
        if self.final_loss is not None:
            came_down = self.first_loss is not None and self.loss_trend is not None  # enough steps for two windows
            loss.append(f"loss {self.final_loss:.3f}" + (f", down from {self.first_loss:.3f}" if came_down else ""))
        if self.loss_trend is not None:
            w = max(1, min(LOSS_WINDOW, (self.steps_done or 0) // 5))
            word = "still falling" if self.loss_trend < -0.01 else ("rising" if self.loss_trend > 0.01 else "flat")
            loss.append(f"{word}: {self.loss_trend:+.1%} "
                        f"over its last {w} steps against the {w} before")
        return head + (f" ({'; '.join(loss)})" if loss else "")

    def resume_hint(self, state_dir: str | Path | None = None) -> str:
        out = f" --out {state_dir}" if state_dir is not None else ""
        if self.checkpoint:
            return (f"run `anomaly-edge enroll --scorer student --checkpoint {self.checkpoint}{out}` again with the "
                    "same good images (and --steps) to resume where it stopped")
        return (f"train it again with `anomaly-edge enroll --scorer student --checkpoint FILE{out}` and a larger "
                "--time-budget (each run resumes from FILE)")


def _round(x):
    return None if x is None else round(float(x), 6)


def _num(x) -> str:
    return "?" if x is None else str(x)


@dataclass
class StudentSpec:
    """The student part of a station state: the fused graph, its per-position statistics, threshold."""

    file: str
    sha256: str
    position_mean: np.ndarray  # h x w, raw discrepancy of held-out good images
    position_std: np.ndarray
    calibration: Calibration
    info: dict = field(default_factory=dict)
    training: StudentTraining | None = None  # None: judged from `info` (states written before the record)

    def __post_init__(self):
        if self.training is None:
            self.training = StudentTraining.from_info(self.info)

    def to_dict(self) -> dict:
        return {"file": self.file, "sha256": self.sha256, "grid": list(self.position_mean.shape),
                "position_mean": np.round(self.position_mean, 6).tolist(),
                "position_std": np.round(self.position_std, 6).tolist(),
                "calibration": self.calibration.to_dict(), "info": self.info, "training": self.training.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "StudentSpec":
        mean, std = np.asarray(d["position_mean"], np.float32), np.asarray(d["position_std"], np.float32)
        if mean.shape != tuple(d["grid"]) or std.shape != mean.shape:
            raise ValueError(f"student statistics have shapes {mean.shape}/{std.shape}, grid says {d['grid']}")
        training = StudentTraining.from_dict(d["training"]) if d.get("training") else None
        return cls(str(d["file"]), str(d["sha256"]), mean, std, Calibration.from_dict(d["calibration"]),
                   dict(d.get("info") or {}), training)

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

    def anomaly_maps(self, features: np.ndarray, weights=None) -> np.ndarray:
        return grid_maps(features[..., 0], self.pack)


def chosen_student(state, kind: str, allow_undertrained: bool = False) -> StudentSpec | None:
    """The student a station state scores with for `kind` student or auto; None where the bank scores
    (auto on a state without a student, with DEFAULT_SCORER bank, or whose student did not complete
    its training). `kind` student refuses a student that did not complete unless `allow_undertrained`."""
    if kind not in (*SCORERS, "auto"):
        raise StateError(f"scorer {kind!r}: expected one of bank, student, auto")
    student = state.student
    if kind == "student" and student is None:
        raise StateError(f"{state.root}: holds no student (train one: anomaly-edge enroll --scorer student)")
    if student is None or (kind == "auto" and DEFAULT_SCORER == "bank"):
        return None
    training = student.training
    if not training.complete:
        if kind == "auto":
            log.warning("%s: scoring with the bank, not the student: its training is %s (%s)", state.root,
                        training.status, training.describe())
            return None
        if not allow_undertrained:
            raise StateError(
                f"{state.root}: its student is {training.status}: {training.describe()}. Scoring with it is "
                f"refused: {training.resume_hint(state.root)}, or score with the bank (scorer auto or bank); "
                "to score with it anyway: --allow-undertrained (score) or student_allow_undertrained: true "
                "(station config)")
        log.warning("%s: scoring with a student whose training is %s (allowed): %s", state.root, training.status,
                    training.describe())
    return student


@register_scorer("student", checks_engine=False)  # its own graph on ONNX Runtime's CPU, calibrated there
def build_student_scorer(request: ScorerRequest) -> StudentScorer:
    """The state's student (edge.scoring.factory picks this kind where `chosen_student` names one)."""
    state = request.state
    return StudentScorer.from_spec(request.pack, state.root, state.student)
