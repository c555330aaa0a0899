"""The good part of the synthetic line: a turned metal flange on a dark conveyor, drawn from a numpy
Generator (the same Generator state always draws the same pixels)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

DEFECT_KINDS: tuple[str, ...] = ("scratch", "hole", "stain", "missing_chunk")

# Key light from the upper left (image coordinates, y down); defects shade themselves with the same light.
LIGHT_ANGLE = math.radians(-135.0)
LIGHT_X, LIGHT_Y = math.cos(LIGHT_ANGLE), math.sin(LIGHT_ANGLE)


@dataclass(eq=False)
class SyntheticPart:
    part_id: str
    image: np.ndarray  # uint8 HxWx3 BGR
    mask: np.ndarray  # bool HxW, True where the defect is
    defect: str | None  # one of DEFECT_KINDS, None for a good part




@lru_cache(maxsize=8)
def pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


def disc_coverage(radius: float, r: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage of the disc `r < radius` (1 inside, 0 outside, a 1 px ramp)."""
    return np.clip(radius - r + 0.5, 0.0, 1.0)


def conveyor(rng: np.random.Generator, shape: tuple[int, int], level: float) -> np.ndarray:
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
    yy, xx = pixel_grid(s)

    gain = rng.uniform(0.95, 1.05)
    cx = s / 2 + rng.uniform(-3.0, 3.0) * k
    cy = s / 2 + rng.uniform(-3.0, 3.0) * k
    R = 0.38 * s * rng.uniform(0.995, 1.005)
    rot = math.radians(rng.uniform(-8.0, 8.0))
    light = LIGHT_ANGLE + math.radians(rng.uniform(-4.0, 4.0))

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
    hub = disc_coverage(Rh, r)
    face += 10.0 * hub
    step = np.clip(1.0 - np.abs(r - Rh) / 1.2, 0.0, 1.0)
    face += 45.0 * cos_l * step

    # Outer chamfer (normal points outwards: bright on the lit side) and bore chamfer (normal inwards).
    ch = 0.035 * R
    a = np.clip(r - (R - ch) + 0.5, 0.0, 1.0)
    face = face * (1 - a) + (140.0 + 60.0 * cos_l) * a
    Rb = 0.17 * R
    a = disc_coverage(Rb + ch, r)
    face = face * (1 - a) + (125.0 - 70.0 * cos_l) * a
    a = disc_coverage(Rb, r)
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
        a = disc_coverage(Rbh + bch, d)
        win[:] = win * (1 - a) + (125.0 - 65.0 * c) * a
        a = disc_coverage(Rbh, d)
        win[:] = win * (1 - a) + (16.0 + 12.0 * np.clip(-c, 0, 1)) * a

    disc = disc_coverage(R, r)
    bg = conveyor(rng, (s, s), 40.0)
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

