"""High-resolution frames of the synthetic line: a part in a wide 5 MP camera frame with one small pit or
scratch, for tiling."""
from __future__ import annotations

import math

import cv2
import numpy as np

from edge.line.synthetic.defects import part_geometry, sample_point
from edge.line.synthetic.line import seeded_rng
from edge.line.synthetic.render import SyntheticPart, conveyor, render_part

HIGHRES_FRAME = (2048, 2448)  # (height, width): a 5 MP line camera
SMALL_DEFECT_KINDS: tuple[str, ...] = ("pit", "scratch")
_STREAM_HIGHRES_GOOD, _STREAM_HIGHRES_TEST = 7, 8


def render_frame(rng: np.random.Generator, frame_size: tuple[int, int] = HIGHRES_FRAME) -> np.ndarray:
    """A good part in a wide camera frame: a `render_part` of the frame's height, placed at a random
    column on a belt that fills the rest of the frame (the part also moves and turns as in render_part)."""
    h, w = frame_size
    if w < h:
        raise ValueError(f"frame must be at least as wide as it is high, got {w}x{h}")
    part = render_part(rng, h)
    x0 = int(rng.integers(0, w - h + 1))
    belt = conveyor(rng, (h, w), 40.0 * rng.uniform(0.95, 1.05)) + rng.normal(0.0, 2.0, (h, w)).astype(np.float32)
    frame = np.clip(belt + 0.5, 0, 255).astype(np.uint8)[..., None] * np.ones(3, np.uint8)
    frame[:, x0:x0 + h] = part
    return frame


def apply_small_defect(image: np.ndarray, kind: str, area: float, rng: np.random.Generator
                       ) -> tuple[np.ndarray, np.ndarray]:
    """A dark pit (disc) or a thin dark scratch of about `area` pixels on the metal of `image`.
    Returns (new image, exact bool mask of the changed pixels)."""
    if kind not in SMALL_DEFECT_KINDS:
        raise ValueError(f"unknown small defect kind {kind!r}; expected one of {SMALL_DEFECT_KINDS}")
    geo = part_geometry(image)
    h, w = geo.metal.shape
    canvas = np.zeros((h, w), np.uint8)
    if kind == "pit":
        r = math.sqrt(area / math.pi)
        x, y = sample_point(geo, r + 4, rng)
        cv2.circle(canvas, (round(x * 16), round(y * 16)), round(r * 16), 255, thickness=cv2.FILLED,
                   lineType=cv2.LINE_AA, shift=4)
    else:
        thick = int(rng.integers(3, 6))
        length = max(area / thick, 4.0)
        x, y = sample_point(geo, length / 2 + thick + 4, rng)
        a = rng.uniform(0, 2 * math.pi)
        dx, dy = 0.5 * length * math.cos(a), 0.5 * length * math.sin(a)
        cv2.line(canvas, (round((x - dx) * 16), round((y - dy) * 16)), (round((x + dx) * 16), round((y + dy) * 16)),
                 255, thickness=thick, lineType=cv2.LINE_AA, shift=4)
    alpha = canvas.astype(np.float32) / 255.0
    mask = (alpha > 0.25) & geo.metal
    alpha = np.where(mask, alpha, 0.0)[..., None]
    out = image.astype(np.float32) * (1.0 - rng.uniform(0.45, 0.6) * alpha)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8), mask


class HighResLine:
    """Deterministic high-resolution frames: `good(n)` for enrollment, `part(i)` for testing (every
    other part has one small defect, its area drawn log-uniformly in `defect_area` pixels)."""

    def __init__(self, seed: int = 0, frame_size: tuple[int, int] = HIGHRES_FRAME,
                 defect_area: tuple[float, float] = (150.0, 20000.0)):
        self.seed = int(seed)
        self.frame_size = tuple(frame_size)
        self.defect_area = defect_area

    def good(self, n: int, start: int = 0) -> list[np.ndarray]:
        """Good frames `start` .. n-1 of the enrollment stream."""
        return [render_frame(seeded_rng(self.seed, _STREAM_HIGHRES_GOOD, i), self.frame_size) for i in range(start, n)]

    def part(self, index: int) -> SyntheticPart:
        rng = seeded_rng(self.seed, _STREAM_HIGHRES_TEST, index)
        image = render_frame(rng, self.frame_size)
        if index % 2 == 0:
            return SyntheticPart(f"hr-{index + 1:06d}", image, np.zeros(image.shape[:2], bool), None)
        kind = SMALL_DEFECT_KINDS[(index // 2) % len(SMALL_DEFECT_KINDS)]
        lo, hi = self.defect_area
        area = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        image, mask = apply_small_defect(image, kind, area, rng)
        return SyntheticPart(f"hr-{index + 1:06d}", image, mask, kind)


def write_wide_dataset(root, n_train: int = 16, n_test: int = 80, frame_size: tuple[int, int] = (500, 1250),
                       defect_area: tuple[float, float] = (60.0, 1500.0), seed: int = 0):
    """An MVTec-layout category of wide frames (`HighResLine` at `frame_size`: a part on a long belt, half
    of the test frames with one small pit or scratch): train/good, test/good, test/pit, test/scratch and
    ground_truth/<kind>/<stem>_mask.png. Returns the root."""
    from pathlib import Path

    root = Path(root)
    line = HighResLine(seed=seed, frame_size=frame_size, defect_area=defect_area)
    folders = {"good": root / "train" / "good"}
    for d in folders.values():
        d.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(line.good(n_train)):
        cv2.imwrite(str(folders["good"] / f"{i:03d}.png"), img)
    for i in range(n_test):
        part = line.part(i)
        kind = part.defect or "good"
        (root / "test" / kind).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / "test" / kind / f"{i:03d}.png"), part.image)
        if part.defect:
            (root / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / "ground_truth" / kind / f"{i:03d}_mask.png"), part.mask.astype(np.uint8) * 255)
    return root
