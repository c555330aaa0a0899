"""Few-shot enrollment pieces: augmented views of each shot, L2-normalised patch features and the
PCA-subspace residual head (SubspaceAD idea: normal patches live near a low-dimensional subspace of
feature space; a patch's score is its squared distance to that subspace).
"""
from __future__ import annotations

import cv2
import numpy as np

from edge.errors import StateError
from edge.scoring.foreground import Foreground

# flip4: the turns that keep a frame's shape (a non-square station input: quarter turns would squash it).
VIEW_MODES = ("none", "rot8", "rot8+shift", "rot8+shift+photo", "flip4+shift")
SHIFTS = ((0.04, 0.03), (-0.03, -0.04), (0.05, -0.02), (-0.02, 0.05))
# (contrast about the image mean, brightness offset) pairs: slow lighting drift on the line.
PHOTOMETRIC = ((0.85, 0.0), (1.15, 0.0), (1.0, -18.0), (1.0, 18.0))


def flips_and_rotations(image: np.ndarray) -> list[np.ndarray]:
    """The 8 images of the dihedral group: rotations by 0/90/180/270 degrees, with and without a flip."""
    views = []
    for flipped in (image, cv2.flip(image, 1)):
        for k in range(4):
            views.append(np.ascontiguousarray(np.rot90(flipped, k)))
    return views


def flips(image: np.ndarray) -> list[np.ndarray]:
    """The 4 views that keep the frame's shape: as it is, mirrored left-right, upside down, turned by 180 degrees."""
    return [image, *(np.ascontiguousarray(cv2.flip(image, code)) for code in (1, 0, -1))]


def shifted(image: np.ndarray, dx: float, dy: float, interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
    """The frame moved by (dx, dy) of its width/height, reflect-padded."""
    h, w = image.shape[:2]
    m = np.float32([[1, 0, dx * w], [0, 1, dy * h]])
    return cv2.warpAffine(image, m, (w, h), flags=interpolation, borderMode=cv2.BORDER_REFLECT)


def photometric(image: np.ndarray, contrast: float, brightness: float) -> np.ndarray:
    """Contrast about the image mean and a brightness offset, clipped to uint8."""
    f = image.astype(np.float32)
    out = (f - f.mean()) * contrast + f.mean() + brightness
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def few_shot_views(image: np.ndarray, mode: str, labels: bool = False) -> list[np.ndarray]:
    """The views of one reference that enrollment puts in the bank (`mode` one of VIEW_MODES).

    `labels`: `image` is a label map pushed through the same geometry (nearest-neighbour shifts, no
    photometric change), so each view's pixels can be traced back to where they came from."""
    if mode not in VIEW_MODES:
        raise ValueError(f"view mode {mode!r}: expected one of {', '.join(VIEW_MODES)}")
    if mode == "none":
        return [image]
    views = flips_and_rotations(image) if mode.startswith("rot8") else flips(image)
    if "shift" in mode:
        interpolation = cv2.INTER_NEAREST if labels else cv2.INTER_LINEAR
        views += [shifted(image, dx, dy, interpolation) for dx, dy in SHIFTS]
    if "photo" in mode:
        views += [image.copy() if labels else photometric(image, c, b) for c, b in PHOTOMETRIC]
    return views


# Nuisance views of a single shot, scored at calibration but never enrolled: how far lighting drift,
# focus and sensor noise alone move a good part's score.
JITTER = (("contrast", 0.8), ("contrast", 1.25), ("brightness", -25.0), ("brightness", 25.0), ("blur", 1.0),
          ("noise", 4.0))


def jittered_views(image: np.ndarray, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for kind, amount in JITTER:
        if kind == "contrast":
            out.append(photometric(image, amount, 0.0))
        elif kind == "brightness":
            out.append(photometric(image, 1.0, amount))
        elif kind == "blur":
            out.append(cv2.GaussianBlur(image, (0, 0), amount))
        else:
            noisy = image.astype(np.float32) + rng.normal(0, amount, image.shape)
            out.append(np.clip(noisy + 0.5, 0, 255).astype(np.uint8))
    return out


def l2_normalise(features: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Each patch vector (last axis) scaled to unit length."""
    features = np.asarray(features, np.float32)
    return features / (np.linalg.norm(features, axis=-1, keepdims=True) + eps)


class SubspaceHead:
    """Mean and orthonormal basis (C x k) of the references' patch features; k keeps `variance` of it."""

    def __init__(self, mean: np.ndarray, basis: np.ndarray):
        self.mean = np.ascontiguousarray(mean, np.float32)
        self.basis = np.ascontiguousarray(basis, np.float32)
        if self.basis.ndim != 2 or self.basis.shape[0] != self.mean.shape[0]:
            raise ValueError(f"subspace basis {self.basis.shape} does not fit mean {self.mean.shape}")

    @classmethod
    def fit(cls, features: np.ndarray, variance: float = 0.99, max_rows: int = 200_000, seed: int = 0
            ) -> "SubspaceHead":
        flat = np.asarray(features, np.float32).reshape(-1, np.shape(features)[-1])
        if len(flat) < 2:
            raise ValueError("a subspace needs at least two patch features")
        if len(flat) > max_rows:
            flat = flat[np.random.default_rng(seed).choice(len(flat), max_rows, replace=False)]
        mean = flat.mean(axis=0)
        centred = flat - mean
        cov = (centred.T @ centred).astype(np.float64) / (len(flat) - 1)
        eigval, eigvec = np.linalg.eigh(cov)
        eigval, eigvec = eigval[::-1].clip(min=0), eigvec[:, ::-1]
        share = np.cumsum(eigval) / max(eigval.sum(), 1e-12)
        k = int(min(np.searchsorted(share, variance) + 1, len(eigval) - 1))
        return cls(mean, eigvec[:, :k].astype(np.float32))

    @property
    def dims(self) -> int:
        return int(self.basis.shape[1])

    def residual(self, features: np.ndarray) -> np.ndarray:
        """Squared distance of each row (N x C) to the subspace, float32, >= 0."""
        x = np.asarray(features, np.float32) - self.mean
        coeff = x @ self.basis
        r = np.einsum("ij,ij->i", x, x) - np.einsum("ij,ij->i", coeff, coeff)
        return np.maximum(r, 0.0)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Value noise in 0..1: a random cells x cells grid, bicubically upsampled (a Perlin-like field)."""
    grid = rng.random((cells + 1, cells + 1)).astype(np.float32)
    up = cv2.resize(grid, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)
    return (up - up.min()) / max(float(up.max() - up.min()), 1e-6)


def cut_paste(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A rectangle of the part (2-6% of its area, any aspect 1:3..3:1) copied, turned, re-lit and pasted
    elsewhere (CutPaste). Returns (image, mask)."""
    h, w = image.shape[:2]
    area = rng.uniform(0.02, 0.06) * h * w
    aspect = np.exp(rng.uniform(np.log(1 / 3), np.log(3)))
    ph = int(np.clip(np.sqrt(area / aspect), 4, h - 2))
    pw = int(np.clip(np.sqrt(area * aspect), 4, w - 2))
    y0, x0 = rng.integers(0, h - ph + 1), rng.integers(0, w - pw + 1)
    patch = image[y0:y0 + ph, x0:x0 + pw]
    patch = np.ascontiguousarray(np.rot90(patch, int(rng.integers(1, 4)))) if ph == pw else cv2.flip(patch, -1)
    patch = photometric(patch, rng.uniform(0.6, 1.5), rng.uniform(-40, 40))
    ph, pw = patch.shape[:2]
    y1, x1 = rng.integers(0, h - ph + 1), rng.integers(0, w - pw + 1)
    out = image.copy()
    out[y1:y1 + ph, x1:x1 + pw] = patch
    mask = np.zeros((h, w), bool)
    mask[y1:y1 + ph, x1:x1 + pw] = True
    return out, mask


def noise_blend(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A Perlin-like blob region (2-10% of the part) blended with a re-lit, re-textured source: darker
    or brighter, streaked or smoothed (DRAEM-style). Returns (image, mask)."""
    h, w = image.shape[:2]
    field = _smooth_noise(rng, (h, w), int(rng.integers(3, 7)))
    share = rng.uniform(0.02, 0.10)
    mask = field >= np.quantile(field, 1 - share)
    f = image.astype(np.float32)
    kind = rng.integers(3)
    if kind == 0:  # dark or bright stain
        source = f + rng.choice([-1, 1]) * rng.uniform(40, 90)
    elif kind == 1:  # streaks: the part's texture stretched along one axis
        source = cv2.resize(cv2.resize(f, (max(2, w // 16), h)), (w, h))
        source = source + rng.uniform(-30, 30)
    else:  # foreign texture: the part with its contrast inverted
        source = 2 * f.mean() - f
    alpha = rng.uniform(0.6, 1.0)
    m = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), 1.5)
    if image.ndim == 3:
        m = m[:, :, None]
    out = np.clip(f * (1 - alpha * m) + source * alpha * m + 0.5, 0, 255).astype(np.uint8)
    return out, mask


def synthetic_defects(image: np.ndarray, n: int, seed: int = 0) -> list[np.ndarray]:
    """n defective copies of a good reference, alternating cut-paste and noise-blend defects."""
    rng = np.random.default_rng(seed)
    return [(cut_paste if i % 2 == 0 else noise_blend)(image, rng)[0] for i in range(n)]


HEAD_KINDS = ("subspace", "nn+subspace")


class FewShotHead:
    """The few-shot patch scorer: the subspace residual, alone or plus the bank's nearest-neighbour
    distance, each divided by its scale on the references (so the two add in comparable units).

    `patch_scores(features, bank)` takes N x h x w x C features and returns N x h x w scores."""

    def __init__(self, kind: str, views: str, subspace: SubspaceHead, subspace_scale: float,
                 nn_scale: float | None = None, border_offsets: np.ndarray | None = None,
                 foreground: Foreground | None = None):
        if kind not in HEAD_KINDS:
            raise ValueError(f"few-shot head {kind!r}: expected one of {', '.join(HEAD_KINDS)}")
        if kind == "nn+subspace" and not nn_scale:
            raise ValueError("head nn+subspace needs the nearest-neighbour scale")
        self.kind, self.views, self.subspace = kind, views, subspace
        self.subspace_scale = float(subspace_scale)
        self.nn_scale = None if nn_scale is None else float(nn_scale)
        # h x w x C: what the encoder's zero padding adds to the features of the grid's outer ring (each
        # position's mean over the references minus the mean of all; zero inside the ring), taken off
        # before scoring. None: heads fitted without it (single shots, states written before).
        self.border_offsets = None if border_offsets is None else np.ascontiguousarray(border_offsets, np.float32)
        self.border_scales = None  # h x w: the ring's typical score on the references over the interior's (1 inside)
        # Parts on a plain background: only the part's patches are scored (edge.scoring.foreground); None: all.
        self.foreground = foreground

    def flat_scores(self, rows: np.ndarray, bank=None) -> np.ndarray:
        s = self.subspace.residual(rows) / self.subspace_scale
        if self.kind == "nn+subspace":
            s += np.sqrt(bank.nearest_sqdist(rows)) / self.nn_scale
        return s

    def patch_scores(self, features: np.ndarray, bank=None, weights: np.ndarray | None = None) -> np.ndarray:
        """`weights` (N x h x w, from the head's `foreground.prepare`): each patch's score times its weight."""
        n, h, w, c = features.shape
        scores = self.flat_scores(self.without_border_offsets(features).reshape(-1, c), bank).reshape(n, h, w)
        if self.border_scales is not None:
            scores = scores / self.border_scales
        if weights is not None:
            scores = scores * weights
        return scores

    def without_border_offsets(self, features: np.ndarray) -> np.ndarray:
        """N x h x w x C features with the padding ring's offsets taken off (as the head was fitted)."""
        if self.border_offsets is None:
            return features
        if features.shape[1:] != self.border_offsets.shape:
            raise ValueError(f"features of shape {features.shape[1:]} (h x w x C) do not fit the few-shot head's "
                             f"border offsets {self.border_offsets.shape}: the state was enrolled with another "
                             "encoder grid")
        return features - self.border_offsets

    def to_dict(self) -> dict:
        return {"kind": self.kind, "views": self.views, "dims": self.subspace.dims,
                "subspace_scale": self.subspace_scale, "nn_scale": self.nn_scale,
                "foreground": self.foreground is not None}

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"mean": self.subspace.mean, "basis": self.subspace.basis}
        if self.border_offsets is not None:
            out["border_offsets"] = self.border_offsets
        if self.border_scales is not None:
            out["border_scales"] = self.border_scales
        if self.foreground is not None:
            out["foreground_envelope"] = self.foreground.envelope.astype(np.uint8)
        return out

    @classmethod
    def from_parts(cls, d: dict, arrays) -> "FewShotHead":
        envelope = arrays.get("foreground_envelope") if d.get("foreground") else None
        if d.get("foreground") and envelope is None:
            raise StateError("the few-shot head masks the background but its file holds no foreground_envelope")
        head = cls(d["kind"], d["views"], SubspaceHead(arrays["mean"], arrays["basis"]), d["subspace_scale"],
                   d.get("nn_scale"), arrays.get("border_offsets"),
                   None if envelope is None else Foreground(np.asarray(envelope) > 0))
        head.border_scales = arrays.get("border_scales")
        return head


PADDING_RING = 3  # grid cells from the edge whose features the encoder's zero padding shifts (docs/evaluation.md)


def border_offsets(features: np.ndarray, ring: int = PADDING_RING) -> np.ndarray | None:
    """h x w x C offsets of the outer `ring` cells of N x h x w x C reference features: each position's
    mean minus the mean over all positions, zero further in. None when the grid is too small for a ring."""
    n, h, w, c = features.shape
    if ring < 1 or h <= 2 * ring or w <= 2 * ring:
        return None
    per_position = features.mean(axis=0, dtype=np.float64)
    offsets = (per_position - per_position.reshape(-1, c).mean(axis=0)).astype(np.float32)
    offsets[ring:h - ring, ring:w - ring] = 0.0
    return offsets
