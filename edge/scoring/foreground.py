"""Foreground masking for parts on a plain background: which patches of a frame show the part, so that
the few-shot head scores only those and the background (a conveyor, a tray, the encoder's border ring
around the frame) cannot raise a part's score.

The background is read from the frame itself: the colour of its outer band. A pixel is foreground where
it differs from that colour by more than the band's own spread; holes inside the part (a bore, a slot)
are filled, and the mask is widened by a margin so that a chunk missing from the part's outline still
lies inside it. The mask a frame is scored under is its own foreground joined with the references'
envelope (every reference view's foreground), so a defect is masked out only where neither the part nor
the references ever were. Outside the mask the frame is painted with its background colour before it is
encoded, for references and frames alike.

`plain_background(images)` decides at enrollment whether the references are parts on a plain background
(every reference: a uniform outer band, one part covering 5-85% of the frame); textures that fill the
frame (magnetic tiles, fabric, wood) are not, and score unmasked as before. This module knows frames
and grids, not heads or thresholds.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

BAND = 0.06  # the outer band read as background, as a fraction of the frame's shorter side
MARGIN = 0.06  # the mask is widened by this fraction of the shorter side
MIN_CONTRAST = 12.0  # grey levels: a foreground pixel differs from the background by at least this much
SPREAD_FACTOR = 3.0  # ... and by this many times the band's 95th-percentile difference
MIN_AREA, MAX_AREA = 0.05, 0.85  # the part's share of the frame for a plain-background reference
MAX_BAND_FOREGROUND = 0.05  # at most this share of the outer band may be foreground (the part leaves it clear)
MIN_LARGEST_SHARE = 0.8  # the largest foreground component holds at least this share of the foreground


def _band(shape: tuple[int, int]) -> np.ndarray:
    h, w = shape
    b = max(2, round(BAND * min(h, w)))
    band = np.ones((h, w), bool)
    band[b:h - b, b:w - b] = False
    return band


def raw_foreground(pixels: np.ndarray) -> tuple[np.ndarray, float]:
    """H x W (x C) pixels (0..255) -> (H x W bool foreground with holes filled, share of the outer band
    that is foreground)."""
    x = cv2.GaussianBlur(np.asarray(pixels, np.float32), (0, 0), 1.5)
    if x.ndim == 2:
        x = x[:, :, None]
    band = _band(x.shape[:2])
    background = np.median(x[band], axis=0)
    d = np.sqrt(((x - background) ** 2).sum(axis=2))
    level = max(MIN_CONTRAST, SPREAD_FACTOR * float(np.percentile(d[band], 95)))
    fg = (d > level).astype(np.uint8)
    fg = cv2.morphologyEx(fg, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    fg = cv2.morphologyEx(fg, cv2.MORPH_CLOSE, np.ones((7, 7), np.uint8))
    band_share = float(fg[band].mean())
    # Holes: background pixels that cannot be reached from the frame's edge through background.
    outside = np.zeros((fg.shape[0] + 2, fg.shape[1] + 2), np.uint8)
    outside[1:-1, 1:-1] = fg
    cv2.floodFill(outside, None, (0, 0), 2)
    filled = outside[1:-1, 1:-1] != 2
    return filled, band_share


def reference_problem(pixels: np.ndarray) -> str | None:
    """Why one reference is not a part on a plain background (None: it is one)."""
    fg, band_share = raw_foreground(pixels)
    if band_share > MAX_BAND_FOREGROUND:
        return f"{band_share:.0%} of the frame's outer band differs from its background colour"
    area = float(fg.mean())
    if not MIN_AREA <= area <= MAX_AREA:
        return f"the part covers {area:.0%} of the frame (a plain-background part covers {MIN_AREA:.0%}-{MAX_AREA:.0%})"
    n, labels, stats, _ = cv2.connectedComponentsWithStats(fg.astype(np.uint8), connectivity=8)
    largest = stats[1:, cv2.CC_STAT_AREA].max() if n > 1 else 0
    if largest < MIN_LARGEST_SHARE * fg.sum():
        return f"the foreground falls into {n - 1} pieces (the largest holds {largest / max(1, fg.sum()):.0%})"
    return None


def plain_background(references: Sequence[np.ndarray]) -> str | None:
    """None where every reference (pixels at the encoder's input size) is a part on a plain background,
    else why not (naming the first reference that is not)."""
    for i, pixels in enumerate(references):
        why = reference_problem(pixels)
        if why is not None:
            return f"reference {i + 1}: {why}"
    return None


def widened(fg: np.ndarray) -> np.ndarray:
    r = max(1, round(MARGIN * min(fg.shape)))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    return cv2.dilate(fg.astype(np.uint8), kernel) > 0


def to_grid(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """H x W bool mask -> grid h x w bool: a cell is in where any of its pixels is."""
    return cv2.resize(mask.astype(np.float32), (grid[1], grid[0]), interpolation=cv2.INTER_AREA) > 0


def band_colour(frame: np.ndarray) -> np.ndarray:
    """The background's colour (per channel, uint8) read from a frame's outer band."""
    return np.median(frame[_band(frame.shape[:2])], axis=0).astype(np.uint8)


@dataclass
class Foreground:
    """The mask a station scores under: each frame's own widened foreground joined with `envelope`, the
    references' (H x W bool at the encoder's input size). Outside it a frame's pixels are painted over
    with its background colour before encoding (so nothing there reaches the features, whose receptive
    fields are wider than a patch), and the patches there score 0."""

    envelope: np.ndarray

    @classmethod
    def from_references(cls, view_pixels: Sequence[np.ndarray]) -> "Foreground":
        envelope = np.zeros(view_pixels[0].shape[:2], bool)
        for pixels in view_pixels:
            envelope |= widened(raw_foreground(pixels)[0])
        return cls(envelope)

    def keep(self, pixels: np.ndarray) -> np.ndarray:
        """H x W bool: where a frame (pixels at the encoder's input size) is scored."""
        return widened(raw_foreground(pixels)[0]) | self.envelope

    def prepare(self, frames: Sequence[np.ndarray], input_pixels, grid: tuple[int, int]
                ) -> tuple[list[np.ndarray], np.ndarray]:
        """Frames -> (the frames with their background painted over, N x h x w float32 patch weights: 1 on
        the part, 0 on the background). `input_pixels(frame)`: the frame at the encoder's input size."""
        painted, weights = [], []
        for frame in frames:
            keep = self.keep(input_pixels(frame))
            at_frame = cv2.resize(keep.astype(np.uint8), (frame.shape[1], frame.shape[0]),
                                  interpolation=cv2.INTER_NEAREST) > 0
            out = frame.copy()
            out[~at_frame] = band_colour(frame)
            painted.append(out)
            weights.append(to_grid(keep, grid).astype(np.float32))
        return painted, np.stack(weights)
