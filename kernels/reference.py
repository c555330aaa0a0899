"""NumPy references for the CUDA kernels: the same arithmetic, written plainly, for tests and benchmarks.

Each reference is also checked against the CPU path it replaces (OpenCV and `edge.bank`), so the
kernels, the references and the CPU runtime agree.
"""
from __future__ import annotations

import math

import numpy as np


def _area(n_in: int, n_out: int) -> np.ndarray:
    """n_out x n_in weights averaging the source span each output pixel covers (edges by coverage)."""
    s = n_in / n_out
    w = np.zeros((n_out, n_in), np.float64)
    for o in range(n_out):
        x0, x1 = o * s, (o + 1) * s
        for i in range(int(math.floor(x0)), min(int(math.ceil(x1)), n_in)):
            w[o, i] = (min(i + 1, x1) - max(i, x0)) / s
    return w


def _area_enlarge(n_in: int, n_out: int) -> np.ndarray:
    """OpenCV INTER_AREA's weights when not both axes shrink: two taps whose split follows where the
    output pixel's right edge falls (close to nearest-neighbour, with a blend at pixel boundaries)."""
    s, inv = n_in / n_out, n_out / n_in
    w = np.zeros((n_out, n_in), np.float64)
    for o in range(n_out):
        i = int(math.floor(o * s))
        f = (o + 1) - (i + 1) * inv
        f = 0.0 if f <= 0 else f - math.floor(f)
        if i >= n_in - 1:
            i, f = n_in - 1, 0.0
        w[o, i] += 1 - f
        if f:
            w[o, i + 1] += f
    return w


def _linear(n_in: int, n_out: int) -> np.ndarray:
    """n_out x n_in bilinear weights with half-pixel centres and clamped edges (OpenCV INTER_LINEAR)."""
    s = n_in / n_out
    w = np.zeros((n_out, n_in), np.float64)
    for o in range(n_out):
        f = max((o + 0.5) * s - 0.5, 0.0)
        i0 = min(int(f), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        w[o, i0] += 1 - (f - i0)
        w[o, i1] += f - i0
    return w


def preprocess(frame: np.ndarray, out_h: int, out_w: int, colour: str, channels: int,
               mean, std) -> np.ndarray:
    """uint8 grey/BGR frame -> C x out_h x out_w float32 (colour: rgb, bgr or gray)."""
    img = frame.astype(np.float64)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    img = img[:, :, :3]
    if colour == "gray":
        g = 0.114 * img[:, :, 0] + 0.587 * img[:, :, 1] + 0.299 * img[:, :, 2]
        img = np.repeat(g[:, :, None], 3, axis=2)
    # Like OpenCV's INTER_AREA (and the kernel): area averaging only when both axes shrink.
    shrink = img.shape[0] >= out_h and img.shape[1] >= out_w
    resample = _area if shrink else _area_enlarge
    ry, rx = resample(img.shape[0], out_h), resample(img.shape[1], out_w)
    rows = (ry @ img.reshape(img.shape[0], -1)).reshape(out_h, img.shape[1], 3)
    resized = np.einsum("owc,pw->opc", rows, rx)
    if colour == "rgb":
        resized = resized[:, :, ::-1]
    mean = np.broadcast_to(np.asarray(mean, np.float64), (3,))
    std = np.broadcast_to(np.asarray(std, np.float64), (3,))
    out = (resized - mean) / std
    return np.ascontiguousarray(out.transpose(2, 0, 1)[:channels]).astype(np.float32)


def nn_min_sqdist(queries: np.ndarray, bank: np.ndarray) -> np.ndarray:
    """Squared L2 distance of each query to its nearest bank row, by the expansion the kernel uses."""
    q = queries.astype(np.float64)
    b = bank.astype(np.float64)
    d = (b * b).sum(1)[None, :] - 2 * q @ b.T
    return np.maximum(d.min(1) + (q * q).sum(1), 0).astype(np.float32)


def gaussian_weights(sigma: float) -> np.ndarray:
    """OpenCV's float-image Gaussian kernel for ksize (0, 0): size round(8 sigma + 1) | 1."""
    ksize = int(round(sigma * 8 + 1)) | 1
    r = ksize // 2
    x = np.arange(-r, r + 1, dtype=np.float64)
    w = np.exp(-(x * x) / (2 * sigma * sigma))
    return (w / w.sum()).astype(np.float32)


def _reflect101(i: np.ndarray, n: int) -> np.ndarray:
    if n == 1:
        return np.zeros_like(i)
    period = 2 * n - 2
    i = np.abs(i) % period
    return np.where(i >= n, period - i, i)


def upsample_bilinear(grid: np.ndarray, H: int, W: int) -> np.ndarray:
    return (_linear(grid.shape[0], H) @ grid.astype(np.float64) @ _linear(grid.shape[1], W).T).astype(np.float32)


def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    w = gaussian_weights(sigma).astype(np.float64)
    r = len(w) // 2
    H, W = img.shape
    x = img.astype(np.float64)
    cols = _reflect101(np.arange(W)[:, None] + np.arange(-r, r + 1)[None, :], W)
    x = (x[:, cols] * w).sum(2)
    rows = _reflect101(np.arange(H)[:, None] + np.arange(-r, r + 1)[None, :], H)
    x = (x[rows, :] * w[None, :, None]).sum(1)
    return x.astype(np.float32)


def map_post(grid: np.ndarray, H: int, W: int, sigma: float) -> tuple[np.ndarray, float]:
    """Patch grid of distances -> upsampled, blurred map and its maximum."""
    m = upsample_bilinear(grid, H, W)
    if sigma > 0:
        m = gaussian_blur(m, sigma)
    return m, float(m.max())
