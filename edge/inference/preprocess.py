"""Frames in, encoder batches out: reading images, colour conversion, resize, normalization.

Owns image decoding too: the C decoders under OpenCV (libjpeg, libpng) print their own warnings straight
to the process's stderr, so `read_image` catches them and either puts them in its ImageError (a file it
refuses) or drops them (a file that decoded whole); OpenCV's own log is kept to errors.
"""
from __future__ import annotations

import math

import logging
import os
import re
import sys
import tempfile
import threading
from pathlib import Path

import cv2
import numpy as np

from edge.errors import ImageError
from edge.pack import InputSpec

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}

# OpenCV's "[ WARN:0@...] imread_(...)" lines are not for a technician: every caller gets our own error.
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)

log = logging.getLogger(__name__)

# What libjpeg and libpng print themselves (their warning texts); any other line written to stderr while
# a decode runs came from another thread and is passed on.
_DECODER_LINE = re.compile(r"^(libpng (warning|error)|Corrupt JPEG data|Premature end of JPEG file|"
                           r"Invalid SOS parameters|Inconsistent progression sequence|Unknown Adobe color|"
                           r"Warning: unknown JFIF|Application transferred too many scanlines)")
# libjpeg warnings after which part of the picture is missing or made up: such a frame is refused.
_JPEG_DATA_LOST = re.compile(r"premature end|bad huffman code|bad arithmetic code|instead of RST", re.I)
# One decode at a time owns fd 2 (the decoders write there, not to sys.stderr).
_STDERR_CAPTURE = threading.Lock()


def _decode_catching_decoder_messages(data: np.ndarray) -> tuple[np.ndarray | None, list[str]]:
    """cv2.imdecode with fd 2 sent to a temporary file; the decoder's own lines come back as a list."""
    with _STDERR_CAPTURE, tempfile.TemporaryFile() as sink:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        sink.seek(0)
        lines = sink.read().decode("utf-8", "replace").splitlines()
    decoder = [line.strip() for line in lines if _DECODER_LINE.match(line.strip())]
    others = [line for line in lines if not _DECODER_LINE.match(line.strip())]
    if others:
        sys.stderr.write("\n".join(others) + "\n")
    return img, decoder


def _truncation(data: np.ndarray) -> str | None:
    """Why a JPEG or PNG that failed to decode looks cut short, or None."""
    head, tail = data[:8].tobytes(), data[-4096:].tobytes()
    if head.startswith(b"\xff\xd8") and b"\xff\xd9" not in tail:
        return f"truncated JPEG: no end-of-image marker in its {data.size} bytes"
    if head == b"\x89PNG\r\n\x1a\n" and b"IEND" not in tail:
        return f"truncated PNG: no IEND chunk in its {data.size} bytes"
    return None


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
        img, decoder_says = _decode_catching_decoder_messages(data)
    except cv2.error as e:
        raise ImageError(f"{path}: not a readable image ({str(e).strip().splitlines()[-1]})") from None
    said = f"; decoder: {'; '.join(decoder_says)}" if decoder_says else ""
    if img is None:
        why = _truncation(data) or "corrupt or unsupported format"
        raise ImageError(f"{path}: not a readable image ({why}{said})")
    lost = [m for m in decoder_says if _JPEG_DATA_LOST.search(m)]
    if lost:
        raise ImageError(f"{path}: corrupt JPEG data, part of the picture is missing ({'; '.join(lost)}); "
                         f"not scored")
    if decoder_says:
        log.debug("%s: decoded with decoder warnings: %s", path, "; ".join(decoder_says))
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


def aspect_kept_size(aspect: float, area: int, multiple: int) -> tuple[int, int]:
    """(height, width), both multiples of `multiple`, of about `area` pixels and width/height `aspect`."""
    h = math.sqrt(area / aspect)
    return (max(multiple, round(h / multiple) * multiple), max(multiple, round(h * aspect / multiple) * multiple))


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
