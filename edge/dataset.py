"""Datasets in the MVTec-AD folder layout: train/good, test/<kind>, ground_truth/<kind>/<stem>_mask.png."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DatasetError, ImageError
from .preprocess import list_images, read_image


@dataclass(frozen=True)
class TestSample:
    path: Path
    kind: str  # "good" or the defect type
    mask_path: Path | None

    @property
    def anomalous(self) -> bool:
        return self.kind != "good"


@dataclass
class MvtecCategory:
    root: Path
    train_good: list[Path]
    test: list[TestSample]

    @property
    def defect_kinds(self) -> list[str]:
        return sorted({s.kind for s in self.test if s.anomalous})


def open_mvtec(root: str | Path) -> MvtecCategory:
    root = Path(root)
    train = root / "train" / "good"
    test = root / "test"
    for folder in (train, test):
        if not folder.is_dir():
            raise DatasetError(f"{root}: not an MVTec-layout folder (missing {folder.relative_to(root)}/)")
    samples = []
    for kind_dir in sorted(p for p in test.iterdir() if p.is_dir()):
        kind = kind_dir.name
        for img in list_images(kind_dir):
            mask = None
            if kind != "good":
                mask = root / "ground_truth" / kind / f"{img.stem}_mask.png"
                if not mask.is_file():
                    mask = None  # scored for image metrics; left out of pixel metrics
            samples.append(TestSample(img, kind, mask))
    train_good = list_images(train)
    if not train_good:
        raise DatasetError(f"{train}: no images")
    if not samples:
        raise DatasetError(f"{test}: no test images")
    return MvtecCategory(root, train_good, samples)


def read_mask(sample: TestSample, shape: tuple[int, int]) -> np.ndarray:
    """Boolean defect mask at the image's size (all False for good images)."""
    if sample.mask_path is None:
        return np.zeros(shape, bool)
    mask = read_image(sample.mask_path)
    if mask.ndim == 3:
        mask = mask.max(axis=2)
    if mask.shape != shape:
        raise ImageError(f"{sample.mask_path}: mask is {mask.shape}, image is {shape}")
    return mask > 127
