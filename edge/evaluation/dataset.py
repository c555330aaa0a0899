"""Datasets as people have them: the MVTec-AD folder layout (train/good, test/<kind>,
ground_truth/<kind>/<stem>_mask.png) and VisA's (split_csv/1cls.csv naming object, split, label,
image and mask paths under the dataset root; one folder per object class). Images may be any size.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.errors import DatasetError, ImageError
from edge.inference.preprocess import list_images, read_image


@dataclass(frozen=True)
class TestSample:
    path: Path
    kind: str  # "good" or the defect type
    mask_path: Path | None
    mask_min: int = 128  # mask pixels >= this are defect (VisA's masks label defects 1, 2, ...)

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
    return mask >= sample.mask_min


VISA_SPLIT = Path("split_csv") / "1cls.csv"
VISA_COLUMNS = ("object", "split", "label", "image", "mask")


def open_visa(root: str | Path, obj: str) -> MvtecCategory:
    """One object class of a VisA-layout dataset: train normals and test images from split_csv/1cls.csv."""
    root = Path(root)
    split = root / VISA_SPLIT
    if not split.is_file():
        raise DatasetError(f"{root}: not a VisA-layout folder (missing {VISA_SPLIT})")
    with open(split, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in VISA_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(f"{split}: missing column(s) {', '.join(missing)} (expected {', '.join(VISA_COLUMNS)})")
        rows = [r for r in reader if r["object"] == obj]
    if not rows:
        raise DatasetError(f"{split}: no rows for object {obj!r}")
    train, test = [], []
    for n, r in enumerate(rows, start=2):
        label = r["label"].strip().lower()
        if label not in ("normal", "anomaly"):
            raise DatasetError(f"{split} line {n}: label {r['label']!r} (expected normal or anomaly)")
        image = root / r["image"]
        if r["split"] == "train":
            if label == "normal":
                train.append(image)
        elif r["split"] == "test":
            mask = root / r["mask"] if label == "anomaly" and r["mask"].strip() else None
            test.append(TestSample(image, "good" if label == "normal" else "anomaly",
                                   mask if mask is not None and mask.is_file() else None, mask_min=1))
        else:
            raise DatasetError(f"{split} line {n}: split {r['split']!r} (expected train or test)")
    if not train:
        raise DatasetError(f"{split}: no normal train images for {obj!r}")
    if not test:
        raise DatasetError(f"{split}: no test images for {obj!r}")
    return MvtecCategory(root / obj, train, test)


def open_dataset(path: str | Path) -> MvtecCategory:
    """An MVTec category folder, or a VisA class folder (its parent holds split_csv/1cls.csv)."""
    path = Path(path)
    if (path / "train").is_dir() or not (path.parent / VISA_SPLIT).is_file():
        if (path / VISA_SPLIT).is_file():
            raise DatasetError(f"{path}: a VisA dataset root; name one object class folder, e.g. {path}/candle")
        return open_mvtec(path)
    return open_visa(path.parent, path.name)
