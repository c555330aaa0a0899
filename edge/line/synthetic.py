"""A seeded synthetic production line: machined flanges on a conveyor, with known defects and exact masks.

Used by `make demo` and by tests on machines with no real data. Everything is drawn from numpy Generators,
so the same seed always gives byte-identical images.

    line = SyntheticLine(seed=0)
    refs = line.good(10)                      # enrollment images
    for part in line.parts(100): ...          # SyntheticPart(part_id, image, mask, defect)

A defective part is a good render followed by `apply_defect(image, kind, rng)`; calling `render_part` and
`apply_defect` on one Generator in that order reproduces exactly what the line yields.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator

import cv2
import numpy as np

__all__ = [
    "DEFECT_KINDS",
    "SyntheticPart",
    "SyntheticLine",
    "render_part",
    "apply_defect",
    "write_mvtec_dataset",
]

DEFECT_KINDS: tuple[str, ...] = ("scratch", "hole", "stain", "missing_chunk")

# Key light from the upper left (image coordinates, y down); defects shade themselves with the same light.
_LIGHT = math.radians(-135.0)
_LX, _LY = math.cos(_LIGHT), math.sin(_LIGHT)

# Spawn keys of the independent random streams, combined with the seed as SeedSequence entropy.
_STREAM_LINE, _STREAM_GOOD, _STREAM_PLAN, _STREAM_KINDS, _STREAM_TEST_GOOD, _STREAM_TEST_DEFECT = range(1, 7)
_BLOCK = 20  # the line places exactly floor(rate * 20) defects per block of 20 parts (on average)


@dataclass(eq=False)
class SyntheticPart:
    part_id: str
    image: np.ndarray  # uint8 HxWx3 BGR
    mask: np.ndarray  # bool HxW, True where the defect is
    defect: str | None  # one of DEFECT_KINDS, None for a good part


# ----------------------------------------------------------------------------------------------- good part


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


def _edge(radius: float, r: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage of the disc `r < radius` (1 inside, 0 outside, a 1 px ramp)."""
    return np.clip(radius - r + 0.5, 0.0, 1.0)


def _conveyor(rng: np.random.Generator, shape: tuple[int, int], level: float) -> np.ndarray:
    """Dark belt: fine woven grain plus faint streaks along the direction of travel (x)."""
    h, w = shape
    grain = cv2.GaussianBlur(rng.standard_normal((h, w), dtype=np.float32), (0, 0), 0.7)
    streaks = cv2.blur(rng.standard_normal((h, w), dtype=np.float32), (15, 1))
    return level + 7.0 * grain + 6.0 * streaks


def render_part(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """A good part: a turned metal flange (centre bore, 4 bolt holes, chamfered rim) seen from above on a dark
    conveyor. Uint8 HxWx3 BGR. Position, rotation, lighting, machining marks and sensor noise vary slightly."""
    s = int(size)
    if s < 32:
        raise ValueError(f"size must be >= 32, got {size}")
    k = s / 256.0
    yy, xx = _grid(s)

    gain = rng.uniform(0.95, 1.05)
    cx = s / 2 + rng.uniform(-3.0, 3.0) * k
    cy = s / 2 + rng.uniform(-3.0, 3.0) * k
    R = 0.38 * s * rng.uniform(0.995, 1.005)
    rot = math.radians(rng.uniform(-8.0, 8.0))
    light = _LIGHT + math.radians(rng.uniform(-4.0, 4.0))

    dx = xx - np.float32(cx)
    dy = yy - np.float32(cy)
    r = np.hypot(dx, dy)
    phi = np.arctan2(dy, dx)
    cos_l = np.cos(phi - np.float32(light))  # +1 on the side facing the light

    # Turned face: concentric tool marks (a 1-D profile over radius), the radial "bow-tie" sheen of turned
    # metal under a point light, and a smooth gradient towards the light.
    n_prof = int(2 * R) + 8
    prof = cv2.GaussianBlur(rng.standard_normal((1, n_prof)).astype(np.float32), (0, 0), 0.6).ravel()
    prof += 0.6 * cv2.GaussianBlur(rng.standard_normal((1, n_prof)).astype(np.float32), (0, 0), 4.0).ravel()
    marks = np.interp(np.minimum(r * 2.0, n_prof - 1), np.arange(n_prof), prof).astype(np.float32)
    sheen = np.cos(2.0 * (phi - np.float32(light + math.pi / 2)))
    grad = (dx * math.cos(light) + dy * math.sin(light)) / np.float32(R)
    face = 148.0 + 4.5 * marks + 16.0 * sheen + 12.0 * grad
    face += 2.0 * cv2.GaussianBlur(rng.standard_normal((s, s), dtype=np.float32), (0, 0), 0.6)

    # Raised hub around the bore, with a lit/shadowed step edge.
    Rh = 0.40 * R
    hub = _edge(Rh, r)
    face += 10.0 * hub
    step = np.clip(1.0 - np.abs(r - Rh) / 1.2, 0.0, 1.0)
    face += 45.0 * cos_l * step

    # Outer chamfer (normal points outwards: bright on the lit side) and bore chamfer (normal inwards).
    ch = 0.035 * R
    a = np.clip(r - (R - ch) + 0.5, 0.0, 1.0)
    face = face * (1 - a) + (140.0 + 60.0 * cos_l) * a
    Rb = 0.17 * R
    a = _edge(Rb + ch, r)
    face = face * (1 - a) + (125.0 - 70.0 * cos_l) * a
    a = _edge(Rb, r)
    face = face * (1 - a) + (14.0 + 10.0 * np.clip(-cos_l, 0, 1)) * a  # deep bore, far wall faintly lit

    # Bolt holes on the pitch circle; drawn in small windows for speed.
    pitch, Rbh, bch = 0.68 * R, 0.075 * R, 0.022 * R + 0.8
    for i in range(4):
        ang = rot + math.pi / 4 + i * math.pi / 2
        hx, hy = cx + pitch * math.cos(ang), cy + pitch * math.sin(ang)
        m = int(Rbh + bch + 3)
        x0, x1 = max(int(hx) - m, 0), min(int(hx) + m + 1, s)
        y0, y1 = max(int(hy) - m, 0), min(int(hy) + m + 1, s)
        ddx, ddy = xx[y0:y1, x0:x1] - np.float32(hx), yy[y0:y1, x0:x1] - np.float32(hy)
        d = np.hypot(ddx, ddy)
        c = (ddx * math.cos(light) + ddy * math.sin(light)) / np.maximum(d, 1e-3)
        win = face[y0:y1, x0:x1]
        a = _edge(Rbh + bch, d)
        win[:] = win * (1 - a) + (125.0 - 65.0 * c) * a
        a = _edge(Rbh, d)
        win[:] = win * (1 - a) + (16.0 + 12.0 * np.clip(-c, 0, 1)) * a

    disc = _edge(R, r)
    bg = _conveyor(rng, (s, s), 40.0)
    # Soft drop shadow away from the light.
    off = 4.0 * k
    M = np.float32([[1, 0, -off * math.cos(light)], [0, 1, -off * math.sin(light)]])
    shadow = cv2.GaussianBlur(cv2.warpAffine(disc, M, (s, s)), (0, 0), 3.0 * k + 0.5)
    bg *= 1.0 - 0.55 * shadow

    img = np.empty((s, s, 3), np.float32)
    metal_tint = (1.03, 1.0, 0.96)  # slightly cool steel
    belt_tint = (1.0, 1.02, 1.0)
    for ch_i in range(3):
        img[..., ch_i] = bg * belt_tint[ch_i] * (1 - disc) + face * metal_tint[ch_i] * disc
    img *= gain
    img += rng.normal(0.0, 2.0, size=img.shape).astype(np.float32)  # sensor noise
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------- defects


@dataclass
class _Geometry:
    metal: np.ndarray  # bool: bright metal surface (not holes, not background)
    part: np.ndarray  # bool: the whole part silhouette, holes included
    dist: np.ndarray  # float32: distance of each metal pixel to the nearest non-metal pixel
    center: tuple[float, float]
    radius: float
    bg_level: float


def _geometry(image: np.ndarray) -> _Geometry:
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
    return _Geometry(metal, part > 0, dist, (float(cx), float(cy)), float(radius), bg_level)


def _sample_point(geo: _Geometry, min_dist: float, rng: np.random.Generator) -> tuple[float, float]:
    """A random (x, y) on the metal at least `min_dist` px from any edge or hole (best effort)."""
    ys, xs = np.nonzero(geo.dist >= min_dist)
    if ys.size == 0:
        y, x = np.unravel_index(int(np.argmax(geo.dist)), geo.dist.shape)
        return float(x), float(y)
    i = int(rng.integers(ys.size))
    return float(xs[i]) + rng.uniform(-0.5, 0.5), float(ys[i]) + rng.uniform(-0.5, 0.5)


def _scratch(img: np.ndarray, geo: _Geometry, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h, w = geo.metal.shape
    s = min(h, w)
    thick = int(rng.integers(1, 4))
    length = rng.uniform(0.15, 0.40) * s
    curved = rng.random() < 0.6
    best, best_frac = None, -1.0
    for _ in range(60):
        x0, y0 = _sample_point(geo, thick + 2, rng)
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


def _hole(img: np.ndarray, geo: _Geometry, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h, w = geo.metal.shape
    s = min(h, w)
    rp = rng.uniform(0.02, 0.05) * s
    rr = rp * 1.45 + 1.0
    cx, cy = _sample_point(geo, rr + 3.0, rng)
    yy, xx = _grid(s) if h == w else np.mgrid[0:h, 0:w].astype(np.float32)
    dx, dy = xx - np.float32(cx), yy - np.float32(cy)
    d = np.hypot(dx, dy)
    c = (dx * _LX + dy * _LY) / np.maximum(d, 1e-3)  # +1 on the side facing the light
    pit = _edge(rp, d)
    ring = _edge(rr, d) - pit
    mask = (_edge(rr, d) > 0.25) & geo.part
    # Raised burr: lit outer slope towards the light, shadowed away from it; pit far wall catches the light.
    out = img + ((55.0 * c - 20.0) * ring)[..., None]
    inside = 22.0 + 45.0 * np.clip(-(dx * _LX + dy * _LY) / rp, 0.0, 1.0)
    pit3 = pit[..., None]
    out = out * (1 - pit3) + (inside[..., None] * np.float32([1.0, 0.97, 0.95])) * pit3
    out = np.where(mask[..., None], out, img)
    return out, mask


def _stain(img: np.ndarray, geo: _Geometry, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h, w = geo.metal.shape
    s = min(h, w)
    rad = rng.uniform(0.05, 0.10) * s
    cx, cy = _sample_point(geo, 0.35 * rad, rng)
    yy, xx = _grid(s) if h == w else np.mgrid[0:h, 0:w].astype(np.float32)
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


def _missing_chunk(img: np.ndarray, geo: _Geometry, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
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
    belt = _conveyor(rng, (h, w), level)
    out = img.copy()
    out[removed] = belt[removed][:, None] * np.float32([1.0, 1.02, 1.0])
    out[lip] = out[lip] * 0.55 + 235.0 * 0.45  # freshly broken edge catches the light
    return out, removed | lip


_DEFECTS: dict[str, Callable[[np.ndarray, _Geometry, np.random.Generator], tuple[np.ndarray, np.ndarray]]] = {
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
    geo = _geometry(image)
    src = image.astype(np.float32)
    for _ in range(8):  # a placement that lands entirely off the metal is redrawn (rare, tiny images)
        out, mask = _DEFECTS[kind](src, geo, rng)
        if mask.any():
            return np.clip(np.rint(out), 0, 255).astype(np.uint8), mask.astype(bool)
    raise ValueError(f"could not place a {kind} on the part")


# ---------------------------------------------------------------------------------------------------- line


def _rng(*key: int) -> np.random.Generator:
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
        slots = np.sort(_rng(self.seed, _STREAM_PLAN, block).choice(_BLOCK, size=count, replace=False))
        hit = np.flatnonzero(slots == pos)
        if hit.size == 0:
            return None
        j = first + int(hit[0])  # running number of this defect on the line
        deck, card = divmod(j, len(DEFECT_KINDS))
        order = _rng(self.seed, _STREAM_KINDS, deck).permutation(len(DEFECT_KINDS))
        return DEFECT_KINDS[int(order[card])]

    def part(self, index: int) -> SyntheticPart:
        """The part at 0-based position `index` on the line (id syn-{index+1:06d})."""
        rng = _rng(self.seed, _STREAM_LINE, index)
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
        return [render_part(_rng(self.seed, _STREAM_GOOD, i), self.size) for i in range(n)]


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
        save(d / f"{i:03d}.png", render_part(_rng(seed, _STREAM_TEST_GOOD, i), size))
    for k, kind in enumerate(DEFECT_KINDS):
        d_img = fresh(root / "test" / kind)
        d_gt = fresh(root / "ground_truth" / kind)
        for i in range(n_test_per_defect):
            rng = _rng(seed, _STREAM_TEST_DEFECT, k, i)
            img, mask = apply_defect(render_part(rng, size), kind, rng)
            save(d_img / f"{i:03d}.png", img)
            save(d_gt / f"{i:03d}_mask.png", mask.astype(np.uint8) * 255)
    return root


# ------------------------------------------------------------------------------------- high-resolution frames

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
    belt = _conveyor(rng, (h, w), 40.0 * rng.uniform(0.95, 1.05)) + rng.normal(0.0, 2.0, (h, w)).astype(np.float32)
    frame = np.clip(belt + 0.5, 0, 255).astype(np.uint8)[..., None] * np.ones(3, np.uint8)
    frame[:, x0:x0 + h] = part
    return frame


def apply_small_defect(image: np.ndarray, kind: str, area: float, rng: np.random.Generator
                       ) -> tuple[np.ndarray, np.ndarray]:
    """A dark pit (disc) or a thin dark scratch of about `area` pixels on the metal of `image`.
    Returns (new image, exact bool mask of the changed pixels)."""
    if kind not in SMALL_DEFECT_KINDS:
        raise ValueError(f"unknown small defect kind {kind!r}; expected one of {SMALL_DEFECT_KINDS}")
    geo = _geometry(image)
    h, w = geo.metal.shape
    canvas = np.zeros((h, w), np.uint8)
    if kind == "pit":
        r = math.sqrt(area / math.pi)
        x, y = _sample_point(geo, r + 4, rng)
        cv2.circle(canvas, (round(x * 16), round(y * 16)), round(r * 16), 255, thickness=cv2.FILLED,
                   lineType=cv2.LINE_AA, shift=4)
    else:
        thick = int(rng.integers(3, 6))
        length = max(area / thick, 4.0)
        x, y = _sample_point(geo, length / 2 + thick + 4, rng)
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
        return [render_frame(_rng(self.seed, _STREAM_HIGHRES_GOOD, i), self.frame_size) for i in range(start, n)]

    def part(self, index: int) -> SyntheticPart:
        rng = _rng(self.seed, _STREAM_HIGHRES_TEST, index)
        image = render_frame(rng, self.frame_size)
        if index % 2 == 0:
            return SyntheticPart(f"hr-{index + 1:06d}", image, np.zeros(image.shape[:2], bool), None)
        kind = SMALL_DEFECT_KINDS[(index // 2) % len(SMALL_DEFECT_KINDS)]
        lo, hi = self.defect_area
        area = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        image, mask = apply_small_defect(image, kind, area, rng)
        return SyntheticPart(f"hr-{index + 1:06d}", image, mask, kind)
