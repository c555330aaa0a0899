"""Frames in, encoder batches out: reading images, colour conversion, resize, normalization."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from edge.errors import ImageError
from edge.pack import InputSpec

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def read_image(path: str | Path) -> np.ndarray:
    """An image file as uint8 BGR (or grey) array; ImageError naming the file when it can't be read."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such image file")
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise ImageError(f"{path}: cannot read: {e.strerror or e}") from None
    if data.size == 0:
        raise ImageError(f"{path}: file is empty")
    try:
        img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    except cv2.error as e:
        raise ImageError(f"{path}: not a readable image ({str(e).strip().splitlines()[-1]})") from None
    if img is None:
        raise ImageError(f"{path}: not a readable image (corrupt or unsupported format)")
    return check_frame(img, str(path))


def check_frame(img, origin: str = "frame") -> np.ndarray:
    """Accept uint8/uint16 grey, BGR or BGRA frames; return uint8 grey or BGR."""
    if not isinstance(img, np.ndarray):
        raise ImageError(f"{origin}: expected a numpy array, got {type(img).__name__}")
    if img.size == 0 or img.ndim not in (2, 3) or min(img.shape[:2]) < 2:
        raise ImageError(f"{origin}: empty or degenerate image of shape {img.shape}")
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise ImageError(f"{origin}: pixel type {img.dtype} not supported (uint8 or uint16)")
    if img.ndim == 3:
        channels = img.shape[2]
        if channels == 1:
            img = img[:, :, 0]
        elif channels == 4:
            img = cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
        elif channels != 3:
            raise ImageError(f"{origin}: {channels} channels not supported (1, 3 or 4)")
    return img


def to_input_pixels(img: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Frame (grey or BGR uint8) -> H x W x C float32 in the pack's colour order and size, not normalized."""
    img = check_frame(img)
    if spec.colour == "gray":
        grey = img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
        out = cv2.resize(grey, (spec.width, spec.height), interpolation=cv2.INTER_AREA)[:, :, None]
        out = np.repeat(out, spec.channels, axis=2)
    else:
        bgr = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR) if img.ndim == 2 else img
        out = cv2.resize(bgr, (spec.width, spec.height), interpolation=cv2.INTER_AREA)
        if spec.colour == "rgb":
            out = out[:, :, ::-1]
    return out.astype(np.float32)


def to_batch(images: list[np.ndarray], spec: InputSpec) -> np.ndarray:
    """Frames -> N x C x H x W float32, normalized as the pack says."""
    mean = np.asarray(spec.normalization.mean, np.float32)
    std = np.asarray(spec.normalization.std, np.float32)
    batch = np.empty((len(images), spec.channels, spec.height, spec.width), np.float32)
    for i, img in enumerate(images):
        batch[i] = ((to_input_pixels(img, spec) - mean) / std).transpose(2, 0, 1)
    return batch


def read_images(paths, log=print) -> tuple[list[np.ndarray], list[Path], list[str]]:
    """Read every path; unreadable ones are logged and skipped. Returns (images, their paths, skip messages)."""
    images, kept, skipped = [], [], []
    for p in paths:
        try:
            images.append(read_image(p))
            kept.append(Path(p))
        except ImageError as e:
            skipped.append(str(e))
            log(f"skipped: {e}")
    return images, kept, skipped


def choose_shots(paths: list, shots: int | None, seed: int) -> list:
    """K of the paths drawn with the seed (kept in their order), or all of them."""
    if shots is None or shots >= len(paths):
        return list(paths)
    chosen = np.random.default_rng(seed).choice(len(paths), shots, replace=False)
    return [paths[i] for i in sorted(chosen)]


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageError(f"{folder}: not a folder")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
