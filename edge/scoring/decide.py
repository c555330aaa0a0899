"""The decide stage: anomaly map -> image score, verdict, binary mask, connected regions.

Owns how a scored map becomes a verdict and regions; the map itself (encoder, head, smoothing) and the
threshold (edge.scoring.calibration) are made elsewhere and are not touched here."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import cv2
import numpy as np


@dataclass
class Region:
    """A connected anomalous area, in frame pixels (x, y from the top-left corner)."""

    x: int
    y: int
    width: int
    height: int
    area: int
    centroid_x: float
    centroid_y: float
    mean_score: float
    max_score: float

    def to_dict(self, mm_per_pixel: float | None = None) -> dict:
        """JSON-ready, rounded to what the measurement supports: whole pixels for the box and area, a
        tenth of a pixel for the centroid, 4 decimals for scores; with a scale, the same in mm rounded
        to the scale's own resolution (0.1 mm/px: 0.1 mm, 0.01 mm²)."""
        d = asdict(self)
        d["centroid_x"], d["centroid_y"] = round(self.centroid_x, 1), round(self.centroid_y, 1)
        d["mean_score"], d["max_score"] = round(self.mean_score, 4), round(self.max_score, 4)
        if mm_per_pixel:
            mpp = float(mm_per_pixel)
            digits = max(0, math.ceil(-math.log10(mpp) - 1e-9))
            area_digits = max(0, math.ceil(-math.log10(mpp * mpp) - 1e-9))
            d.update({f"{k}_mm": round(getattr(self, k) * mpp, digits)
                      for k in ("x", "y", "width", "height", "centroid_x", "centroid_y")})
            d["area_mm2"] = round(self.area * mpp * mpp, area_digits)
        return d


@dataclass
class Result:
    """One scored frame. Maps and masks are at the scorer's map resolution (the pack's input size; tile
    resolution over the whole frame when tiled): `map_at_frame`, `mask_at_frame` give frame size. Regions
    are in frame pixels."""

    score: float
    threshold: float
    anomalous: bool
    anomaly_map: np.ndarray
    mask: np.ndarray
    regions: list[Region] = field(default_factory=list)
    frame_size: tuple[int, int] = (0, 0)  # (height, width) of the frame that was scored
    latency_ms: float = 0.0
    # Conformal p-value against the held-out good scores: share of them at or above this score,
    # (1 + #{s_i >= score}) / (n + 1); None when the scorer has no calibration scores.
    p_value: float | None = None

    @property
    def verdict(self) -> str:
        return "anomalous" if self.anomalous else "normal"

    @property
    def severity(self) -> float:
        """Score over threshold: < 1 passes, >= 1 is flagged."""
        return self.score / self.threshold if self.threshold > 0 else float("inf")

    def map_at_frame(self) -> np.ndarray:
        h, w = self.frame_size
        return cv2.resize(self.anomaly_map, (w, h), interpolation=cv2.INTER_LINEAR)

    def mask_at_frame(self) -> np.ndarray:
        h, w = self.frame_size
        return cv2.resize(self.mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)

    def summary(self, mm_per_pixel: float | None = None) -> dict:
        """JSON-ready verdict, score, threshold and regions (with mm fields when `mm_per_pixel` is given)."""
        return {
            "score": round(self.score, 6),
            "threshold": round(self.threshold, 6),
            "verdict": self.verdict,
            "regions": [r.to_dict(mm_per_pixel) for r in self.regions],
            "latency_ms": round(self.latency_ms, 3),
            **({"p_value": round(self.p_value, 6)} if self.p_value is not None else {}),
        }


def image_score(anomaly_map: np.ndarray, top_fraction: float) -> float:
    """Mean of the highest `top_fraction` of map values: steadier than the max, still local."""
    flat = anomaly_map.ravel()
    k = max(1, int(round(flat.size * top_fraction)))
    return float(np.partition(flat, flat.size - k)[flat.size - k:].mean())


def find_regions(anomaly_map: np.ndarray, mask: np.ndarray, frame_size: tuple[int, int],
                 min_area: int = 4) -> list[Region]:
    """Connected components of the mask, scaled from map to frame pixels, largest first."""
    n, labels, stats, centroids = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    sy = frame_size[0] / mask.shape[0]
    sx = frame_size[1] / mask.shape[1]
    regions = []
    for i in range(1, n):
        x, y, w, h, area = stats[i]
        if area < min_area:
            continue
        values = anomaly_map[labels == i]
        regions.append(Region(
            x=int(round(x * sx)), y=int(round(y * sy)), width=max(1, int(round(w * sx))),
            height=max(1, int(round(h * sy))), area=int(round(area * sx * sy)),
            centroid_x=float(centroids[i][0] * sx), centroid_y=float(centroids[i][1] * sy),
            mean_score=float(values.mean()), max_score=float(values.max()),
        ))
    regions.sort(key=lambda r: r.area, reverse=True)
    return regions


# Where a region ends: half-way from the frame's own background (the map's median) up to the region's peak,
# the map's full width at half maximum. Not a per-dataset number: with the threshold alone as the edge, a
# strong defect's wide skirt (the smoothing and the encoder's receptive field) crosses the threshold far
# from the defect and runs into the raised border ring (docs/evaluation.md, "Regions that are not on the part").
REGION_HALF_HEIGHT = 0.5


_NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]


def ascent_peaks(anomaly_map: np.ndarray) -> np.ndarray:
    """For each pixel, the flat index of the local maximum its steepest ascent ends at (each pixel steps to
    its highest 8-neighbour while that is higher): the pixels sharing a peak are that peak's basin, and
    basins meet where the map dips between two peaks."""
    h, w = anomaly_map.shape
    padded = np.pad(anomaly_map, 1, constant_values=-np.inf)
    index = np.arange(h * w).reshape(h, w)
    highest, step = anomaly_map.copy(), index.copy()
    for dy, dx in _NEIGHBOURS:
        neighbour = padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
        higher = neighbour > highest
        highest = np.where(higher, neighbour, highest)
        step = np.where(higher, index + dy * w + dx, step)  # never off the map: the padding is -inf
    step = step.ravel()
    while True:  # pointer jumping: each round doubles the steps taken
        jumped = step[step]
        if np.array_equal(jumped, step):
            return step.reshape(h, w)
        step = jumped


def region_mask(anomaly_map: np.ndarray, score: float, threshold: float) -> np.ndarray:
    """The mask whose connected components are the regions. Candidates are the components of the map at
    or above the threshold; one is kept only when its own peak reaches the image score (the mean of the
    map's top values: a component that could not carry the verdict on its own, such as a patch of the
    border ring just over the threshold, is no region; the one holding the map's maximum always stays),
    and it is cut where the map falls below half-way between the map's median and that peak, never below
    the threshold. Within what is left, a basin (`ascent_peaks`) that reaches the frame's edge and whose
    own peak is under the image score is taken away: that is the encoder's raised border ring, joined to
    a defect's skirt above the cut, and the region stops where the map dips between the two."""
    above = anomaly_map >= threshold
    n, labels = cv2.connectedComponents(above.astype(np.uint8), connectivity=8)
    if n <= 1:
        return above
    peaks = np.full(n, -np.inf)
    np.maximum.at(peaks, labels[above], anomaly_map[above].astype(np.float64))
    gate = min(float(score), float(peaks.max()))
    keep = peaks >= gate
    background = float(np.median(anomaly_map))
    level = np.maximum(float(threshold), background + REGION_HALF_HEIGHT * (peaks - background))
    mask = keep[labels] & (anomaly_map >= level[labels])
    edge_rows, edge_cols = np.r_[0, mask.shape[0] - 1], np.r_[0, mask.shape[1] - 1]
    if not (mask[edge_rows].any() or mask[:, edge_cols].any()):
        return mask  # no part of it on the frame's edge: no basin to take away
    # A mask pixel's higher neighbours are mask pixels too (higher than its cut, and joined to it), so its
    # steepest ascent stays in the mask: the basins are found on the mask's bounding box alone.
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    box = np.where(mask[y0:y1, x0:x1], anomaly_map[y0:y1, x0:x1], -np.inf)
    basin_peak = ascent_peaks(box)
    inside = mask[y0:y1, x0:x1]
    weak = inside & (box.ravel()[basin_peak] < gate)
    frame_edge = _frame_edge(inside.shape, y0 == 0, y1 == mask.shape[0], x0 == 0, x1 == mask.shape[1])
    on_edge = np.zeros(inside.size, bool)
    on_edge[basin_peak[weak & frame_edge]] = True
    out = mask.copy()
    out[y0:y1, x0:x1] = inside & ~(weak & on_edge[basin_peak])
    return out


def _frame_edge(shape: tuple[int, int], top: bool, bottom: bool, left: bool, right: bool) -> np.ndarray:
    """Which cells of a box lie on the frame's edge, given which sides of the box are the frame's."""
    edge = np.zeros(shape, bool)
    edge[0] |= top
    edge[-1] |= bottom
    edge[:, 0] |= left
    edge[:, -1] |= right
    return edge


def decide(anomaly_map: np.ndarray, score: float, threshold: float, frame_size: tuple[int, int],
           latency_ms: float = 0.0, p_value: float | None = None) -> Result:
    """The verdict of a scored map: anomalous at or above the threshold. An anomalous frame's mask is
    `region_mask` (the score and verdict do not depend on it) and its connected regions are reported in
    frame pixels; a normal frame has no anomalous pixel and no region (an empty mask, at no cost on the
    frames that pass)."""
    anomalous = score >= threshold
    mask = region_mask(anomaly_map, score, threshold) if anomalous else np.zeros(anomaly_map.shape, bool)
    regions = find_regions(anomaly_map, mask, frame_size) if anomalous else []
    return Result(score=score, threshold=threshold, anomalous=anomalous, anomaly_map=anomaly_map,
                  mask=mask, regions=regions, frame_size=frame_size, latency_ms=latency_ms, p_value=p_value)
