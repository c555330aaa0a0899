"""The synthetic line itself: a deterministic stream of parts (each depends only on seed and index) with
defects spread evenly, and the files written from it (good parts, an MVTec-layout dataset)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from edge.line.synthetic.defects import apply_defect
from edge.line.synthetic.render import DEFECT_KINDS, SyntheticPart, render_part

# Spawn keys of the independent random streams, combined with the seed as SeedSequence entropy.
_STREAM_LINE, _STREAM_GOOD, _STREAM_PLAN, _STREAM_KINDS, _STREAM_TEST_GOOD, _STREAM_TEST_DEFECT = range(1, 7)
_BLOCK = 20  # the line places exactly floor(rate * 20) defects per block of 20 parts (on average)


def seeded_rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


class SyntheticLine:
    """A deterministic stream of parts: each part depends only on (seed, index), so streams are reproducible
    and `parts()` restarts from the first part on every call (use `start` to skip ahead)."""

    def __init__(self, seed: int = 0, size: int = 256, defect_rate: float = 0.2):
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if not 0.0 <= defect_rate <= 1.0:
            raise ValueError(f"defect_rate must be in [0, 1], got {defect_rate}")
        self.seed = int(seed)
        self.size = int(size)
        self.defect_rate = float(defect_rate)

    def _n_defects_before(self, block: int) -> int:
        return math.floor(block * _BLOCK * self.defect_rate + 1e-9)

    def _defect_at(self, index: int) -> str | None:
        """Defects are spread evenly (a fixed count per block of parts, at random places) and their kinds are
        dealt from shuffled decks, so every kind shows up early and the rate holds over short runs."""
        block, pos = divmod(index, _BLOCK)
        first = self._n_defects_before(block)
        count = self._n_defects_before(block + 1) - first
        if count == 0:
            return None
        slots = np.sort(seeded_rng(self.seed, _STREAM_PLAN, block).choice(_BLOCK, size=count, replace=False))
        hit = np.flatnonzero(slots == pos)
        if hit.size == 0:
            return None
        j = first + int(hit[0])  # running number of this defect on the line
        deck, card = divmod(j, len(DEFECT_KINDS))
        order = seeded_rng(self.seed, _STREAM_KINDS, deck).permutation(len(DEFECT_KINDS))
        return DEFECT_KINDS[int(order[card])]

    def part(self, index: int) -> SyntheticPart:
        """The part at 0-based position `index` on the line (id syn-{index+1:06d})."""
        rng = seeded_rng(self.seed, _STREAM_LINE, index)
        image = render_part(rng, self.size)
        kind = self._defect_at(index)
        if kind is None:
            mask = np.zeros(image.shape[:2], bool)
        else:
            image, mask = apply_defect(image, kind, rng)
        return SyntheticPart(f"syn-{index + 1:06d}", image, mask, kind)

    def parts(self, n: int | None = None, start: int = 0) -> Iterator[SyntheticPart]:
        """Yield `n` parts (forever if None), starting at 0-based position `start`."""
        i = start
        while n is None or i < start + n:
            yield self.part(i)
            i += 1

    def good(self, n: int) -> list[np.ndarray]:
        """`n` good-part images from a stream independent of `parts()` (for enrollment)."""
        return [render_part(seeded_rng(self.seed, _STREAM_GOOD, i), self.size) for i in range(n)]


# -------------------------------------------------------------------------------------------------- export


def write_good_parts(folder: str | Path, n: int, seed: int = 0) -> list[Path]:
    """Write `n` good synthetic parts (the enrollment stream of `SyntheticLine(seed)`) as PNGs."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(SyntheticLine(seed=seed).good(n)):
        paths.append(folder / f"good-{i:04d}.png")
        if not cv2.imwrite(str(paths[-1]), img):
            raise OSError(f"{paths[-1]}: could not write")
    return paths


def write_mvtec_dataset(
    root: str | Path,
    n_train: int = 16,
    n_test_good: int = 8,
    n_test_per_defect: int = 4,
    size: int = 256,
    seed: int = 0,
) -> Path:
    """Write an MVTec-AD style category folder:

        root/train/good/000.png  root/test/good/000.png  root/test/<kind>/000.png
        root/ground_truth/<kind>/000_mask.png  (uint8 0/255)

    Rewriting replaces the PNGs this function owns, so the folder ends up the same whatever was there."""
    root = Path(root)
    line = SyntheticLine(seed=seed, size=size)

    def fresh(d: Path) -> Path:
        d.mkdir(parents=True, exist_ok=True)
        for old in d.glob("*.png"):
            old.unlink()
        return d

    def save(path: Path, img: np.ndarray) -> None:
        if not cv2.imwrite(str(path), img):
            raise OSError(f"could not write {path}")

    d = fresh(root / "train" / "good")
    for i, img in enumerate(line.good(n_train)):
        save(d / f"{i:03d}.png", img)
    d = fresh(root / "test" / "good")
    for i in range(n_test_good):
        save(d / f"{i:03d}.png", render_part(seeded_rng(seed, _STREAM_TEST_GOOD, i), size))
    for k, kind in enumerate(DEFECT_KINDS):
        d_img = fresh(root / "test" / kind)
        d_gt = fresh(root / "ground_truth" / kind)
        for i in range(n_test_per_defect):
            rng = seeded_rng(seed, _STREAM_TEST_DEFECT, k, i)
            img, mask = apply_defect(render_part(rng, size), kind, rng)
            save(d_img / f"{i:03d}.png", img)
            save(d_gt / f"{i:03d}_mask.png", mask.astype(np.uint8) * 255)
    return root

