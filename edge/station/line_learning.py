"""Learn mode on the running line: a station with no state yet builds its references and threshold from
the first N parts that come off the line (unlabeled, most of them good), then scores from the next part on.
With `refining`, a station that has a state (enrolled from a few good parts) scores every part as usual
while it keeps the next N, then refines its state with them (`edge.station.learn.refine`).

This module owns the collection of those frames (kept under `<storage.dir>/learning/`, or `refining/`, so a restart
during learning resumes where it stopped) and the hand-over to `edge.station.learn.learn`, which sets the
unusual parts aside and enrolls the rest. It does not score and does not publish: the runtime gives
every part collected here a result with verdict `learning` and, when the state is built, publishes
what was set aside (by part id) on `P/reply`.
"""
from __future__ import annotations

import shutil
import threading
from pathlib import Path

import cv2
import numpy as np

from edge.errors import StateError
from edge.station.learn import MIN_PARTS, learn, refine
from edge.pack import Pack

FOLDER = "learning"
REFINING_FOLDER = "refining"


class LineLearner:
    """Collects the first `parts` frames of a station without state, then learns its state from them; with
    `refining`, the next `parts` scored frames of a station with a state, then refines that state."""

    def __init__(self, pack: Pack, state_dir: Path, storage_dir: Path, parts: int, suspect_z: float,
                 target_false_reject: float | None = None, refining: bool = False, tiling=None):
        if parts < MIN_PARTS:
            raise StateError(f"learn.parts {parts}: learn mode needs at least {MIN_PARTS} parts")
        self.pack, self.state_dir, self.parts, self.suspect_z = pack, Path(state_dir), int(parts), suspect_z
        self.target_false_reject = target_false_reject
        self.refining, self.tiling = refining, tiling
        self.folder = Path(storage_dir) / (REFINING_FOLDER if refining else FOLDER)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._count = len(self.collected())  # kept before a restart count; then counted here, not globbed per part
        self.attempts = 0
        self.last_error: str | None = None
        self.learning = False  # the state is being built

    def collected(self) -> list[Path]:
        """The frames kept so far, oldest first (file names start with a sequence number)."""
        return sorted(p for p in self.folder.glob("*.png") if not p.name.startswith("."))

    def progress(self) -> dict:
        return {"collected": min(self._count, self.parts), "of": self.parts,
                "building": self.learning, "attempts": self.attempts, "last_error": self.last_error}

    def add(self, part_id: str, image: np.ndarray) -> tuple[dict, bool]:
        """Keep the frame of `part_id` if the collection is not full yet. Returns (progress, full now):
        `full now` is true once, for the part that completes the collection."""
        with self._lock:
            have = self._count
            if have >= self.parts:
                return self.progress(), False
            path = self.folder / f"{have:05d}_{_safe(part_id)}.png"
            tmp = path.with_name("." + path.name)
            if not cv2.imwrite(str(tmp), image):
                raise StateError(f"learn mode: could not write {tmp}")
            path.with_suffix(".id").write_text(part_id, encoding="utf-8")
            tmp.replace(path)
            self._count = have + 1
            return self.progress(), self._count == self.parts

    def full(self) -> bool:
        return self._count >= self.parts

    def build(self, log=print):
        """Learn the state from the collected frames into state_dir. Returns (state, summary with the
        suspects' part ids). On failure the collection starts again from the next part (the error says
        why: e.g. most parts looked unusual) and StateError is raised."""
        paths = self.collected()[: self.parts]
        self.learning = True
        self.attempts += 1
        try:
            kw = {} if self.target_false_reject is None else {"target_false_reject": self.target_false_reject}
            if self.refining:
                result = refine(self.pack, paths, self.state_dir, z=self.suspect_z, quiet=True, log=log,
                                tiling=self.tiling, **kw)
            else:
                result = learn(self.pack, paths, self.state_dir, z=self.suspect_z, quiet=True, log=log, **kw)
        except Exception as e:
            self.last_error = str(e)
            self.clear()
            what = "refining the state" if self.refining else "learn mode"
            raise StateError(f"{what}: {e}; collecting {self.parts} new parts") from e
        finally:
            self.learning = False
        summary = result.summary()
        summary["suspects"] = [{"part_id": self.part_id(s["file"]), "score": s["score"]} for s in summary["suspects"]]
        summary["threshold"] = round(float(result.state.calibration.threshold), 6)
        summary["threshold_source"] = result.state.calibration.source
        if self.refining:
            refined = result.state.info["refined"]
            summary.update(references_before=refined["references_before"],
                           references=len(result.state.references),
                           threshold_before=round(refined["threshold_before"], 6))
        self.clear()
        self.last_error = None
        return result.state, summary

    def part_id(self, file_name: str) -> str:
        """The part id a collected frame came from."""
        try:
            return (self.folder / file_name).with_suffix(".id").read_text(encoding="utf-8")
        except OSError:
            return Path(file_name).stem.split("_", 1)[-1]

    def clear(self) -> None:
        """Drop what was collected; collecting starts again from the next part."""
        with self._lock:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder.mkdir(parents=True, exist_ok=True)
            self._count = 0


def _safe(part_id: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_.T" else "_" for ch in part_id)[:120]

