"""Region of interest: where the part is in a frame, and how it sits against the enrolled reference.

The ROI has a fixed size (so every part gets the same tile grid); its place is fixed (`rect`,
`polygon`) or found per frame (`contour`: the largest bright contour; `template`: a match against
the enrolled reference). `align: ecc` then refines translation and rotation with OpenCV's ECC.
All of it runs on the frame already shrunk to tile resolution ("small" coordinates).
"""
from __future__ import annotations

from typing import Literal

import cv2
import numpy as np
from pydantic import Field, model_validator

from edge.errors import EdgeError
from edge.scoring.frozen_spec import FrozenSpec


class RoiError(EdgeError):
    """An ROI does not fit the frame (outside it, empty, degenerate) or the part cannot be found."""


class RoiSpec(FrozenSpec):
    """Where the part is: the whole frame, a fixed rect [x, y, width, height] or polygon [[x, y], ...] in
    frame pixels, or found per frame (contour: the largest bright object; template: a match against the
    reference). The station configuration's `roi:` section and state.yaml's `tiling.roi` hold it as it is."""

    kind: Literal["full", "rect", "polygon", "contour", "template"] = "full"
    rect: tuple[int, int, int, int] | None = None  # x, y, width, height in frame pixels
    points: tuple[tuple[float, float], ...] | None = None  # polygon corners in frame pixels
    size: tuple[int, int] | None = None  # contour/template: ROI width, height in frame pixels (None: from enrollment)
    margin: float = Field(default=0.04, ge=0, le=1)  # contour: padding around the part when the size comes from enrollment
    align: Literal["none", "ecc"] = "none"  # ecc: refine shift and rotation against the reference

    @model_validator(mode="after")
    def _shape(self):
        if (self.kind == "rect") != (self.rect is not None):
            raise ValueError("rect [x, y, width, height] is needed with kind rect, and only with it")
        if (self.kind == "polygon") != (self.points is not None):
            raise ValueError("points [[x, y], ...] are needed with kind polygon, and only with them")
        if self.rect is not None and (min(self.rect[:2]) < 0 or min(self.rect[2:]) <= 0):
            raise ValueError(f"rect {list(self.rect)}: x, y must be >= 0 and width, height > 0")
        if self.points is not None and (problem := polygon_problem(self.points)):
            raise ValueError(f"points: polygon {problem}")
        if self.size is not None and min(self.size) <= 0:
            raise ValueError(f"size {list(self.size)}: width and height must be > 0")
        return self


def polygon_problem(points) -> str | None:
    """Why a polygon cannot be an ROI (fewer than 3 corners, no area), or None."""
    if not points or len(points) < 3:
        return f"needs at least 3 corners, got {len(points or [])}"
    if abs(cv2.contourArea(np.asarray(points, np.float32))) < 1.0:
        return f"has no area (corners {[list(p) for p in points]} are on a line or repeated)"
    return None


def fixed_box(spec: RoiSpec, frame_size: tuple[int, int], key: str = "roi") -> tuple[int, int, int, int]:
    """x, y, w, h of a fixed ROI, checked against the frame (height, width); RoiError naming key and frame size."""
    h, w = frame_size
    where = f"the {w}x{h} frame"
    if spec.kind == "full":
        return 0, 0, w, h
    if spec.kind == "rect":
        x, y, rw, rh = spec.rect
        if rw <= 0 or rh <= 0:
            raise RoiError(f"{key}.rect {list(spec.rect)}: width and height must be > 0")
        if x < 0 or y < 0 or x + rw > w or y + rh > h:
            raise RoiError(f"{key}.rect {list(spec.rect)} (x, y, width, height) reaches outside {where}")
        return x, y, rw, rh
    if spec.kind == "polygon":
        problem = polygon_problem(spec.points)
        if problem:
            raise RoiError(f"{key}.points: polygon {problem}")
        pts = np.asarray(spec.points, np.float64)
        if pts.min() < 0 or (pts[:, 0] > w).any() or (pts[:, 1] > h).any():
            raise RoiError(f"{key}.points {[list(p) for p in spec.points]}: corners outside {where}")
        x0, y0 = np.floor(pts.min(axis=0)).astype(int)
        x1, y1 = np.ceil(pts.max(axis=0)).astype(int)
        return int(x0), int(y0), int(x1 - x0), int(y1 - y0)
    raise RoiError(f"{key}.kind {spec.kind!r} has no fixed box")


def polygon_mask(spec: RoiSpec, box: tuple[int, int, int, int], scale: float, size: tuple[int, int]) -> np.ndarray | None:
    """The polygon as a float mask over the ROI image at tile resolution (None for other kinds)."""
    if spec.kind != "polygon":
        return None
    pts = (np.asarray(spec.points, np.float64) - box[:2]) / scale
    mask = np.zeros(size, np.uint8)
    cv2.fillPoly(mask, [np.rint(pts * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    return mask.astype(np.float32)


def grey(img: np.ndarray) -> np.ndarray:
    return img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)


def largest_contour_box(small_grey: np.ndarray) -> tuple[int, int, int, int]:
    """Bounding box (x, y, w, h) of the largest bright object (Otsu threshold), in the image's pixels."""
    _, th = cv2.threshold(cv2.GaussianBlur(small_grey, (5, 5), 0), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    contours, _ = cv2.findContours(th, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        raise RoiError("roi.kind contour: no part found in the frame (nothing brighter than the background)")
    return cv2.boundingRect(max(contours, key=cv2.contourArea))


def place(small_grey: np.ndarray, spec: RoiSpec, size: tuple[int, int], frame_size: tuple[int, int],
          reference: np.ndarray | None) -> tuple[float, float]:
    """Top-left (x, y) in small coordinates of an ROI of `size` (w, h, small pixels) in a frame of
    `frame_size` (height, width) shrunk to `small_grey`."""
    h, w = small_grey.shape
    rw, rh = size
    if spec.kind in ("full", "rect", "polygon"):
        x, y, _, _ = fixed_box(spec, frame_size)
        return x * w / frame_size[1], y * h / frame_size[0]
    if spec.kind == "contour":
        bx, by, bw, bh = largest_contour_box(small_grey)
        x, y = bx + bw / 2 - rw / 2, by + bh / 2 - rh / 2
    else:  # template: the reference ROI matched at a quarter of the tile resolution
        if reference is None:
            raise RoiError("roi.kind template: the station state has no reference image to match")
        q = 4
        res = cv2.matchTemplate(cv2.resize(small_grey, (w // q, h // q), interpolation=cv2.INTER_AREA),
                                cv2.resize(reference, (rw // q, rh // q), interpolation=cv2.INTER_AREA),
                                cv2.TM_CCOEFF_NORMED)
        _, _, _, (mx, my) = cv2.minMaxLoc(res)
        x, y = mx * q, my * q
    return float(np.clip(x, 0, max(w - rw, 0))), float(np.clip(y, 0, max(h - rh, 0)))


def estimate_alignment(reference: np.ndarray, image: np.ndarray, downscale: int = 2,
                       iterations: int = 50) -> np.ndarray:
    """2x3 Euclidean warp W with image(W(p)) ~ reference(p), p in reference pixels (ECC on grey images
    of the same size, run `downscale` times smaller). Identity when ECC does not converge."""
    if reference.shape != image.shape:
        raise ValueError(f"alignment needs equal sizes, got {reference.shape} and {image.shape}")
    d = max(1, int(downscale))
    size = (reference.shape[1] // d, reference.shape[0] // d)
    ref = cv2.resize(reference, size, interpolation=cv2.INTER_AREA).astype(np.float32)
    img = cv2.resize(image, size, interpolation=cv2.INTER_AREA).astype(np.float32)
    warp = np.eye(2, 3, dtype=np.float32)
    try:
        _, warp = cv2.findTransformECC(ref, img, warp, cv2.MOTION_EUCLIDEAN,
                                       (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, iterations, 1e-4), None, 5)
    except cv2.error:
        return np.eye(2, 3, dtype=np.float64)
    warp = warp.astype(np.float64)
    warp[:, 2] *= d  # rotation is scale-free; translation scales back up
    return warp


def compose(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """2x3 affine of p -> outer(inner(p))."""
    a = np.vstack([outer, [0, 0, 1]])
    b = np.vstack([inner, [0, 0, 1]])
    return (a @ b)[:2]
