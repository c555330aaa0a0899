"""Defects put on a rendered part (scratch, hole, stain, missing chunk) with their exact masks. The
part is found from the image itself, so a defect goes on any render without extra state."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import cv2
import numpy as np

from edge.line.synthetic.render import DEFECT_KINDS, LIGHT_X, LIGHT_Y, conveyor, disc_coverage, pixel_grid


@dataclass
class PartGeometry:
    metal: np.ndarray  # bool: bright metal surface (not holes, not background)
    part: np.ndarray  # bool: the whole part silhouette, holes included
    dist: np.ndarray  # float32: distance of each metal pixel to the nearest non-metal pixel
    center: tuple[float, float]
    radius: float
    bg_level: float


def part_geometry(image: np.ndarray) -> PartGeometry:
    """Recover where the part is from the image itself (bright metal on a dark belt), so `apply_defect`
    works on any render without extra state."""
    grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if image.ndim == 3 else image
    _, th = cv2.threshold(cv2.GaussianBlur(grey, (3, 3), 0), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    th = cv2.morphologyEx(th, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    contours, _ = cv2.findContours(th, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        raise ValueError("no part found in the image")
    outline = max(contours, key=cv2.contourArea)
    part = np.zeros_like(th)
    cv2.drawContours(part, [outline], -1, 255, thickness=cv2.FILLED)
    (cx, cy), radius = cv2.minEnclosingCircle(outline)
    # The shadowed side of the rim chamfer can fall below the threshold; the enclosing circle still spans it.
    cv2.circle(part, (round(cx * 16), round(cy * 16)), round(radius * 16), 255, thickness=cv2.FILLED, shift=4)
    metal = (th > 0) & (part > 0)
    dist = cv2.distanceTransform(metal.astype(np.uint8), cv2.DIST_L2, 5)
    around = cv2.dilate(part, np.ones((9, 9), np.uint8)) == 0
    bg_level = float(np.median(grey[around])) if around.any() else 40.0
    return PartGeometry(metal, part > 0, dist, (float(cx), float(cy)), float(radius), bg_level)


def sample_point(geo: PartGeometry, min_dist: float, rng: np.random.Generator) -> tuple[float, float]:
    """A random (x, y) on the metal at least `min_dist` px from any edge or hole (best effort)."""
    ys, xs = np.nonzero(geo.dist >= min_dist)
    if ys.size == 0:
        y, x = np.unravel_index(int(np.argmax(geo.dist)), geo.dist.shape)
        return float(x), float(y)
    i = int(rng.integers(ys.size))
    return float(xs[i]) + rng.uniform(-0.5, 0.5), float(ys[i]) + rng.uniform(-0.5, 0.5)


def _scratch(img: np.ndarray, geo: PartGeometry, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h, w = geo.metal.shape
    s = min(h, w)
    thick = int(rng.integers(1, 4))
    length = rng.uniform(0.15, 0.40) * s
    curved = rng.random() < 0.6
    best, best_frac = None, -1.0
    for _ in range(60):
        x0, y0 = sample_point(geo, thick + 2, rng)
        a = rng.uniform(0, 2 * math.pi)
        bend = rng.uniform(0.12, 0.3) * rng.choice([-1.0, 1.0]) if curved else rng.uniform(-0.03, 0.03)
        chord = length / (1 + 2.5 * bend * bend)  # keeps the arc length close to `length`
        p0 = np.array([x0, y0])
        p2 = p0 + chord * np.array([math.cos(a), math.sin(a)])
        ctrl = (p0 + p2) / 2 + bend * chord * np.array([-math.sin(a), math.cos(a)])
        t = np.linspace(0, 1, int(np.clip(length / 4, 6, 40)))[:, None]
        pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * ctrl + t**2 * p2
        xi, yi = np.rint(pts[:, 0]).astype(int), np.rint(pts[:, 1]).astype(int)
        if xi.min() < 0 or yi.min() < 0 or xi.max() >= w or yi.max() >= h:
            continue
        frac = float(geo.metal[yi, xi].mean())
        if frac > best_frac:
            best, best_frac = pts, frac
        if frac >= 0.95:
            break
    if best is None:
        raise ValueError("could not place a scratch on the part")
    canvas = np.zeros((h, w), np.uint8)
    # Segment by segment so the groove fades out at both ends and its depth wanders along the way.
    t = np.linspace(0, 1, len(best) - 1)
    depth = np.sqrt(np.sin(np.pi * (0.04 + 0.92 * t))) * rng.uniform(0.8, 1.0, len(t))
    pts16 = np.rint(best * 16).astype(np.int32)
    for i, dep in enumerate(depth):
        layer = np.zeros_like(canvas)
        cv2.line(layer, tuple(map(int, pts16[i])), tuple(map(int, pts16[i + 1])), int(255 * dep),
                 thickness=thick, lineType=cv2.LINE_AA, shift=4)
        np.maximum(canvas, layer, out=canvas)
    alpha = canvas.astype(np.float32) / 255.0
    mask = (alpha > 0.25) & geo.metal
    alpha = np.where(mask, np.minimum(alpha * 1.3, 1.0), 0.0)[..., None]  # AA ramp, but only inside the mask
    if rng.random() < 0.7:  # a dark groove
        out = img * (1.0 - rng.uniform(0.55, 0.7) * alpha)
    else:  # bright fresh metal
        out = img + (250.0 - img) * rng.uniform(0.75, 0.95) * alpha
    return out, mask


def _hole(img: np.ndarray, geo: PartGeometry, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h, w = geo.metal.shape
    s = min(h, w)
    rp = rng.uniform(0.02, 0.05) * s
    rr = rp * 1.45 + 1.0
    cx, cy = sample_point(geo, rr + 3.0, rng)
    yy, xx = pixel_grid(s) if h == w else np.mgrid[0:h, 0:w].astype(np.float32)
    dx, dy = xx - np.float32(cx), yy - np.float32(cy)
    d = np.hypot(dx, dy)
    c = (dx * LIGHT_X + dy * LIGHT_Y) / np.maximum(d, 1e-3)  # +1 on the side facing the light
    pit = disc_coverage(rp, d)
    ring = disc_coverage(rr, d) - pit
    mask = (disc_coverage(rr, d) > 0.25) & geo.part
    # Raised burr: lit outer slope towards the light, shadowed away from it; pit far wall catches the light.
    out = img + ((55.0 * c - 20.0) * ring)[..., None]
    inside = 22.0 + 45.0 * np.clip(-(dx * LIGHT_X + dy * LIGHT_Y) / rp, 0.0, 1.0)
    pit3 = pit[..., None]
    out = out * (1 - pit3) + (inside[..., None] * np.float32([1.0, 0.97, 0.95])) * pit3
    out = np.where(mask[..., None], out, img)
    return out, mask


def _stain(img: np.ndarray, geo: PartGeometry, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h, w = geo.metal.shape
    s = min(h, w)
    rad = rng.uniform(0.05, 0.10) * s
    cx, cy = sample_point(geo, 0.35 * rad, rng)
    yy, xx = pixel_grid(s) if h == w else np.mgrid[0:h, 0:w].astype(np.float32)
    dx, dy = xx - np.float32(cx), yy - np.float32(cy)
    d = np.hypot(dx, dy)
    phi = np.arctan2(dy, dx)
    edge = np.ones_like(d)  # an irregular outline from a few angular harmonics
    for kk, amp in ((2, 0.14), (3, 0.10), (4, 0.06), (7, 0.03)):
        edge += rng.uniform(0.3, 1.0) * amp * np.cos(kk * phi + np.float32(rng.uniform(0, 2 * math.pi)))
    x = np.clip((1.0 - d / (rad * edge)) / 0.55, 0.0, 1.0)
    alpha = x * x * (3 - 2 * x)  # smoothstep: a soft rim
    blotch = cv2.GaussianBlur(rng.standard_normal((h, w), dtype=np.float32), (0, 0), max(rad / 5, 1.0))
    blotch /= max(float(np.abs(blotch).max()), 1e-6)
    alpha *= (0.85 + 0.15 * blotch) * rng.uniform(0.75, 0.95)
    alpha *= geo.metal  # the stain sits on the metal, not over holes or belt
    mask = alpha > 0.25
    if rng.random() < 0.5:  # rust: orange-brown
        tint, offset = np.float32([0.22, 0.42, 0.85]), np.float32([8, 22, 45])
    else:  # oil: dark brown, translucent
        tint, offset = np.float32([0.30, 0.38, 0.48]), np.float32([6, 10, 16])
    a3 = alpha[..., None]
    out = img * (1 - a3) + (img * tint + offset) * a3
    return out, mask


def _missing_chunk(img: np.ndarray, geo: PartGeometry, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h, w = geo.metal.shape
    s = min(h, w)
    (cx, cy), R = geo.center, geo.radius
    theta = rng.uniform(0, 2 * math.pi)
    depth = rng.uniform(0.05, 0.10) * s  # how far the break reaches into the part
    rb = depth * rng.uniform(1.1, 1.8)
    px = cx + (R + rb - depth) * math.cos(theta)
    py = cy + (R + rb - depth) * math.sin(theta)
    n = 16
    angs = (np.arange(n) + rng.uniform(-0.3, 0.3, n)) * (2 * math.pi / n)
    radii = rb * rng.uniform(0.9, 1.12, n) * np.where(np.arange(n) % 2 == 0, 1.0, 0.92)  # jagged fracture
    poly = np.stack([px + radii * np.cos(angs), py + radii * np.sin(angs)], axis=1)
    bite = np.zeros((h, w), np.uint8)
    cv2.fillPoly(bite, [np.rint(poly * 16).astype(np.int32)], 255, lineType=cv2.LINE_8, shift=4)
    # Include the anti-aliased outer edge of the rim so no ghost of the old outline remains.
    part = cv2.dilate(geo.part.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    removed = (bite > 0) & part
    lip = (cv2.dilate(removed.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0) & geo.part & ~removed
    # Match the belt right next to the break (lit or in the part's shadow) so the old outline leaves no ghost.
    near = (cv2.dilate(bite, np.ones((9, 9), np.uint8)) > 0) & ~(cv2.dilate(part.astype(np.uint8),
                                                                         np.ones((5, 5), np.uint8)) > 0)
    level = float(np.median(img[near].mean(axis=1))) if near.sum() >= 10 else geo.bg_level
    belt = conveyor(rng, (h, w), level)
    out = img.copy()
    out[removed] = belt[removed][:, None] * np.float32([1.0, 1.02, 1.0])
    out[lip] = out[lip] * 0.55 + 235.0 * 0.45  # freshly broken edge catches the light
    return out, removed | lip


_DEFECTS: dict[str, Callable[[np.ndarray, PartGeometry, np.random.Generator], tuple[np.ndarray, np.ndarray]]] = {
    "scratch": _scratch,
    "hole": _hole,
    "stain": _stain,
    "missing_chunk": _missing_chunk,
}


def apply_defect(image: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Put one defect of `kind` at a random place on the part in `image` (a `render_part` output).

    Returns (new uint8 BGR image, bool HxW mask of the defect); the input is not modified."""
    if kind not in _DEFECTS:
        raise ValueError(f"unknown defect kind {kind!r}; expected one of {DEFECT_KINDS}")
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 HxWx3 BGR image, got {image.dtype} {image.shape}")
    geo = part_geometry(image)
    src = image.astype(np.float32)
    for _ in range(8):  # a placement that lands entirely off the metal is redrawn (rare, tiny images)
        out, mask = _DEFECTS[kind](src, geo, rng)
        if mask.any():
            return np.clip(np.rint(out), 0, 255).astype(np.uint8), mask.astype(bool)
    raise ValueError(f"could not place a {kind} on the part")

