"""The score stage: frames -> encoder features -> nearest-neighbour distances -> smoothed anomaly maps.

`Scorer` takes patch features from `edge.inference.features.FeatureExtractor` (the pack's encoder run in
batches) and adds the memory bank and the
calibrated threshold and hands each map to the decide stage (`edge.scoring.decide`). Which scorer a
station scores with is chosen by edge.scoring.factory alone (the bank scorer's builder, with its
station-graph form, registers in edge.scoring.station_graph); this module must not import its subclasses.
"""
from __future__ import annotations

import time
from collections.abc import Sequence

import cv2
import numpy as np

from edge.inference.features import FeatureExtractor
from edge.scoring.bank import MemoryBank
from edge.scoring.decide import Result, decide, image_score
from edge.pack import Pack
from edge.inference.preprocess import check_frame, to_input_pixels


def _align_corners_matrix(n_out: int, n_in: int) -> np.ndarray:
    """n_out x n_in linear interpolation weights with the end samples on the end pixels."""
    pos = np.linspace(0, n_in - 1, n_out) if n_in > 1 else np.zeros(n_out)
    lo = np.minimum(np.floor(pos).astype(int), max(n_in - 2, 0))
    frac = pos - lo
    m = np.zeros((n_out, n_in), np.float32)
    m[np.arange(n_out), lo] = 1 - frac
    if n_in > 1:
        m[np.arange(n_out), lo + 1] = frac
    return m


def distances_to_maps(sqdist: np.ndarray, n: int, grid: tuple[int, int], size: tuple[int, int],
                      sigma: float, metric: str = "l2", upsample: str = "linear") -> np.ndarray:
    """Flat squared distances of n images' patches -> n x H x W smoothed anomaly maps: L2 distances, or
    1 - cosine similarity for unit features (`metric` and `upsample` as in ScorerSpec)."""
    patch = (np.sqrt(sqdist) if metric == "l2" else 0.5 * sqdist).reshape(n, *grid)
    return upsample_maps(patch, size, sigma, upsample)


def upsample_maps(patch: np.ndarray, size: tuple[int, int], sigma: float, upsample: str = "linear") -> np.ndarray:
    """n x h x w patch scores -> n x H x W maps, upsampled and Gaussian-smoothed."""
    n, grid = len(patch), patch.shape[1:]
    maps = np.empty((n, *size), np.float32)
    if upsample == "linear_align_corners":
        rows, cols = _align_corners_matrix(size[0], grid[0]), _align_corners_matrix(size[1], grid[1])
    for i in range(n):
        if upsample == "linear_align_corners":
            m = rows @ patch[i].astype(np.float32) @ cols.T
        else:
            m = cv2.resize(patch[i], (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
        if sigma > 0:
            m = cv2.GaussianBlur(m, (0, 0), sigma)
        maps[i] = m
    return maps


def pack_maps(sqdist: np.ndarray, n: int, grid: tuple[int, int], pack: Pack) -> np.ndarray:
    """`distances_to_maps` at the pack's input size with its scorer's metric, upsampling and smoothing."""
    s = pack.scorer
    return distances_to_maps(sqdist, n, grid, (pack.input.height, pack.input.width), s.smoothing_sigma, s.metric,
                             s.upsample)


def grid_maps(patch: np.ndarray, pack: Pack) -> np.ndarray:
    """n x h x w patch scores -> n x H x W maps at the pack's input size, upsampled and smoothed as it says."""
    s = pack.scorer
    return upsample_maps(patch, (pack.input.height, pack.input.width), s.smoothing_sigma, s.upsample)


def anomaly_maps(bank: MemoryBank, features: np.ndarray, pack: Pack) -> np.ndarray:
    """N x h x w x C patch features -> N x H x W anomaly maps at the pack's input size."""
    n, h, w, c = features.shape
    return pack_maps(bank.nearest_sqdist(features.reshape(-1, c)), n, (h, w), pack)


def image_scores(bank: MemoryBank, features: np.ndarray, pack: Pack) -> np.ndarray:
    return np.array([image_score(m, pack.scorer.top_fraction) for m in anomaly_maps(bank, features, pack)])


class Scorer:
    """Scores frames against one station's memory bank with its calibrated threshold."""

    def __init__(self, pack: Pack, bank: MemoryBank | None, threshold: float, extractor: FeatureExtractor | None = None,
                 head=None, calibration=None):
        """`head`: the state's FewShotHead (None: nearest-neighbour distances only); `calibration`: the
        state's Calibration, which gives each result its conformal p-value."""
        self.pack = pack
        self.bank = bank
        self.threshold = float(threshold)
        self.extractor = extractor or FeatureExtractor(pack)
        self.head = head
        self.calibration = calibration

    def anomaly_maps(self, features: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        """N x h x w x C features -> N x H x W anomaly maps at the pack's input size. `weights` (N x h x w,
        a head that masks the background: `prepare`): each patch's score times its weight."""
        if self.head is not None:
            return grid_maps(self.head.patch_scores(features, self.bank, weights), self.pack)
        return anomaly_maps(self.bank, features, self.pack)

    def decide(self, anomaly_map: np.ndarray, frame_size: tuple[int, int], latency_ms: float = 0.0) -> Result:
        score = image_score(anomaly_map, self.pack.scorer.top_fraction)
        p_value = self.calibration.p_value(score) if self.calibration is not None else None
        return decide(anomaly_map, score, self.threshold, frame_size, latency_ms, p_value=p_value)

    def score(self, frames: Sequence[np.ndarray]) -> list[Result]:
        """Score a batch of frames (grey or BGR uint8, any size)."""
        t0 = time.perf_counter()
        frames = [check_frame(f) for f in frames]
        encoded, weights = self.prepare(frames)
        features = self.extractor.patch_features(encoded)
        maps = self.anomaly_maps(features) if weights is None else self.anomaly_maps(features, weights)
        per_frame_ms = (time.perf_counter() - t0) * 1000 / max(1, len(frames))
        return [self.decide(m, f.shape[:2], per_frame_ms) for m, f in zip(maps, frames)]

    def prepare(self, frames: list[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray | None]:
        """The frames as the encoder sees them, and their patch weights: a head that masks the background
        (edge.scoring.foreground) paints it over and weighs its patches 0; else the frames and None."""
        if self.head is None or self.head.foreground is None:
            return frames, None
        return self.head.foreground.prepare(frames, lambda f: to_input_pixels(f, self.pack.input),
                                            self.pack.encoder.feature_shape[1:])

    def score_one(self, frame: np.ndarray) -> Result:
        return self.score([frame])[0]
