"""Tiled scoring of high-resolution frames: ROI -> overlapping tiles at the pack's input size -> one
encoder batch -> per-tile anomaly maps -> blended back into one map in ROI, then frame, coordinates.

A frame is first shrunk by `scale` (frame pixels per tile pixel); everything after that works at
tile resolution, so a 2448x2048 frame at scale 3 is an 816x683 image cut into 224 px tiles.
`TiledScorer` has `Scorer`'s interface (`score`, `score_one`, `threshold`, `decide`); its maps are
frame maps at tile resolution (`Result.map_at_frame()` brings them to frame size); the scorer kind
`tiled` registers itself with edge.scoring.registry. Enrolling tiles (banks and threshold from the
references' tiles) is the station's: edge.station.tiled_enrollment. This module must not import edge.station.
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
from pydantic import Field

from edge.scoring.bank import MemoryBank
from edge.scoring.decide import Result, decide, image_score
from edge.scoring.frozen_spec import FrozenSpec
from edge.errors import StateError
from edge.pack import Pack
from edge.inference.preprocess import check_frame
from edge.scoring.roi import RoiError, RoiSpec, compose, estimate_alignment, fixed_box, grey, largest_contour_box, place, \
    polygon_mask
from edge.scoring.registry import ScorerRequest, register_scorer
from edge.inference.features import FeatureExtractor
from edge.scoring.scorer import pack_maps


class TilingSpec(FrozenSpec):
    """How a high-resolution frame is scored tile by tile. The station configuration's `tiling:` section
    (with its top-level `roi:` as `roi`), state.yaml's `tiling` and the CLI's --tile-* options hold it as it is."""

    scale: float = Field(gt=0, le=64)  # frame pixels per tile pixel
    overlap: float = Field(default=0.25, ge=0, lt=1)  # fraction of a tile shared with its neighbour
    bank: Literal["shared", "per_tile"] = "shared"  # one bank for all tile positions, or one per position
    bank_patches: int | None = Field(default=None, ge=16)  # bank size cap (None: the pack's max_bank_patches)
    roi: RoiSpec = RoiSpec()


def axis_origins(length: int, tile: int, overlap: float) -> list[int]:
    """Tile starts along one axis: evenly spread, first at 0, last ending at `length`, neighbours
    sharing at least `overlap` of a tile."""
    if length <= tile:
        return [0]
    step = tile * (1 - overlap)
    n = math.ceil((length - tile) / max(step, 1)) + 1
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


@dataclass(frozen=True)
class TileGrid:
    size: tuple[int, int]  # (height, width) of the ROI image at tile resolution
    tile: tuple[int, int]  # (height, width) of a tile: the pack's input
    origins: tuple[tuple[int, int], ...]  # (y, x) of each tile's top-left corner

    @classmethod
    def cover(cls, size: tuple[int, int], tile: tuple[int, int], overlap: float) -> "TileGrid":
        ys, xs = axis_origins(size[0], tile[0], overlap), axis_origins(size[1], tile[1], overlap)
        return cls(tuple(size), tuple(tile), tuple((y, x) for y in ys for x in xs))

    def __len__(self) -> int:
        return len(self.origins)

    def cut(self, image: np.ndarray) -> list[np.ndarray]:
        """The tiles of an ROI image (edge-replicated where the ROI is smaller than a tile)."""
        th, tw = self.tile
        h, w = image.shape[:2]
        if h < th or w < tw:
            image = cv2.copyMakeBorder(image, 0, max(th - h, 0), 0, max(tw - w, 0), cv2.BORDER_REPLICATE)
        return [image[y:y + th, x:x + tw] for y, x in self.origins]

    def weights(self) -> np.ndarray:
        """Per-pixel blending weight of a tile: 1 in the middle, ramping down over the overlap so a
        tile's border (where the encoder sees padding) counts least."""
        def ramp(n):
            edge = np.minimum(np.arange(n) + 0.5, n - np.arange(n) - 0.5)
            return np.clip(edge / max(n / 8, 1), 0.05, 1.0).astype(np.float32)
        return ramp(self.tile[0])[:, None] * ramp(self.tile[1])[None, :]

    def blend(self, maps: np.ndarray) -> np.ndarray:
        """len(self) tile maps -> one map over the ROI (weighted mean where tiles overlap)."""
        h, w = self.size
        th, tw = self.tile
        acc = np.zeros((max(h, th), max(w, tw)), np.float32)
        norm = np.zeros_like(acc)
        wt = self.weights()
        for (y, x), m in zip(self.origins, maps):
            acc[y:y + th, x:x + tw] += m * wt
            norm[y:y + th, x:x + tw] += wt
        return (acc / norm)[:h, :w]


@dataclass
class Layout:
    """A tiling resolved for one station: the spec, the ROI size in frame pixels and the reference ROI."""

    spec: TilingSpec
    roi_size: tuple[int, int]  # (width, height) in frame pixels
    reference: np.ndarray | None = None  # grey ROI of the first reference, tile resolution (template, align)

    def small_roi(self) -> tuple[int, int]:
        return round(self.roi_size[0] / self.spec.scale), round(self.roi_size[1] / self.spec.scale)

    def grid(self, pack: Pack) -> TileGrid:
        w, h = self.small_roi()
        return TileGrid.cover((h, w), (pack.input.height, pack.input.width), self.spec.overlap)

    def to_dict(self) -> dict:
        return {**self.spec.model_dump(mode="json"), "roi_size": list(self.roi_size)}


def resolve_layout(spec: TilingSpec, first: np.ndarray) -> Layout:
    """The ROI size from the spec (fixed kinds) or from the part in the first reference frame."""
    h, w = first.shape[:2]
    roi = spec.roi
    if roi.kind in ("full", "rect", "polygon"):
        _, _, rw, rh = fixed_box(roi, (h, w))
    elif roi.size is not None:
        rw, rh = roi.size
        if rw > w or rh > h or rw <= 0 or rh <= 0:
            raise RoiError(f"roi.size {list(roi.size)} does not fit the {w}x{h} frame")
    else:
        small = _shrink(grey(first), spec.scale)
        _, _, bw, bh = largest_contour_box(small)
        rw = min(w, round(bw * spec.scale * (1 + 2 * roi.margin)))
        rh = min(h, round(bh * spec.scale * (1 + 2 * roi.margin)))
    layout = Layout(spec, (int(rw), int(rh)))
    if roi.kind in ("template", "contour") or roi.align != "none":
        # The reference itself is cut where the part's contour is (a template has nothing to match yet).
        first_roi = roi.model_copy(update={"kind": "contour"}) if roi.kind == "template" else roi
        roi_img, _ = prepare(Layout(spec.model_copy(update={"roi": first_roi}), layout.roi_size), first)
        layout.reference = grey(roi_img)
    return layout


def _shrink(frame: np.ndarray, scale: float) -> np.ndarray:
    h, w = frame.shape[:2]
    return cv2.resize(frame, (max(1, round(w / scale)), max(1, round(h / scale))), interpolation=cv2.INTER_AREA)


def prepare(layout: Layout, frame: np.ndarray, small: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Frame -> (ROI image at tile resolution, 2x3 affine from ROI pixels to shrunk-frame pixels)."""
    spec = layout.spec
    small = _shrink(frame, spec.scale) if small is None else small
    rw, rh = layout.small_roi()
    small_grey = grey(small)
    x, y = place(small_grey, spec.roi, (rw, rh), frame.shape[:2], layout.reference)
    to_small = np.array([[1.0, 0, x], [0, 1.0, y]])
    if spec.roi.align == "ecc" and layout.reference is not None:
        crop = cv2.warpAffine(small_grey, to_small, (rw, rh), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                              borderMode=cv2.BORDER_REPLICATE)
        to_small = compose(to_small, estimate_alignment(layout.reference, crop))
    roi_img = cv2.warpAffine(small, to_small, (rw, rh), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                             borderMode=cv2.BORDER_REPLICATE)
    return roi_img, to_small


def to_frame_map(roi_map: np.ndarray, to_small: np.ndarray, small_size: tuple[int, int]) -> np.ndarray:
    """ROI map -> map over the whole shrunk frame (0 outside the ROI), through the ROI's affine."""
    return cv2.warpAffine(roi_map, to_small, (small_size[1], small_size[0]), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def tile_maps(pack: Pack, banks: list[MemoryBank], features: np.ndarray) -> np.ndarray:
    """N x T x h x w x C tile features -> (N*T) x H x W tile maps (one shared bank, or one per tile)."""
    n, t, h, w, c = features.shape
    if len(banks) == 1:
        sqdist = banks[0].nearest_sqdist(features.reshape(-1, c))
    else:
        if len(banks) != t:
            raise StateError(f"{len(banks)} per-tile banks for a grid of {t} tiles")
        sqdist = np.stack([banks[i].nearest_sqdist(features[:, i].reshape(-1, c)).reshape(n, h * w)
                           for i in range(t)], axis=1).ravel()
    return pack_maps(sqdist, n * t, (h, w), pack)


def roi_score(roi_map: np.ndarray, pack: Pack, grid: TileGrid, roi_mask: np.ndarray | None) -> float:
    """Mean of the top pixels, as many as `top_fraction` of one tile: the same count whatever the ROI
    size, so a small defect weighs on a large ROI as much as on one tile."""
    values = roi_map if roi_mask is None else roi_map[roi_mask > 0]
    k = pack.scorer.top_fraction * grid.tile[0] * grid.tile[1]
    return image_score(values, min(1.0, k / values.size))


class TiledScorer:
    """Scores high-resolution frames tile by tile against a station's bank(s) and threshold."""

    def __init__(self, pack: Pack, banks: list[MemoryBank], threshold: float, layout: Layout,
                 extractor: FeatureExtractor | None = None, calibration=None):
        self.pack = pack
        self.calibration = calibration  # gives each result its conformal p-value
        self.banks = banks
        self.bank = banks[0] if banks else None
        self.threshold = float(threshold)
        self.layout = layout
        self.grid = layout.grid(pack)
        self.extractor = extractor or FeatureExtractor(pack)
        self._masks: dict = {}

    def roi_mask(self, frame_size: tuple[int, int]) -> np.ndarray | None:
        if frame_size not in self._masks:
            spec = self.layout.spec
            box = fixed_box(spec.roi, frame_size) if spec.roi.kind in ("full", "rect", "polygon") else None
            self._masks[frame_size] = polygon_mask(spec.roi, box, spec.scale, self.grid.size) if box else None
        return self._masks[frame_size]

    def features(self, roi_images: Sequence[np.ndarray]) -> np.ndarray:
        """ROI images -> N x T x h x w x C tile features (all tiles of all frames in one encoder batch)."""
        tiles = [t for img in roi_images for t in self.grid.cut(img)]
        feats = self.extractor.patch_features(tiles)
        return feats.reshape(len(roi_images), len(self.grid), *feats.shape[1:])

    def roi_maps(self, features: np.ndarray) -> np.ndarray:
        maps = tile_maps(self.pack, self.banks, features)
        t = len(self.grid)
        return np.stack([self.grid.blend(maps[i * t:(i + 1) * t]) for i in range(len(features))])

    def decide(self, anomaly_map: np.ndarray, frame_size: tuple[int, int], latency_ms: float = 0.0,
               score: float | None = None) -> Result:
        """Verdict, mask and regions (frame pixels) from a frame map at tile resolution."""
        if score is None:
            score = roi_score(anomaly_map, self.pack, self.grid, None)
        p_value = self.calibration.p_value(score) if self.calibration is not None else None
        return decide(anomaly_map, score, self.threshold, frame_size, latency_ms, p_value=p_value)

    def score(self, frames: Sequence[np.ndarray]) -> list[Result]:
        t0 = time.perf_counter()
        frames = [check_frame(f) for f in frames]
        smalls = [_shrink(f, self.layout.spec.scale) for f in frames]
        prepared = [prepare(self.layout, f, s) for f, s in zip(frames, smalls)]
        roi_maps = self.roi_maps(self.features([p[0] for p in prepared]))
        out = []
        for f, s, (_, to_small), m in zip(frames, smalls, prepared, roi_maps):
            roi_mask = self.roi_mask(f.shape[:2])
            if roi_mask is not None:
                m = m * roi_mask
            frame_map = to_frame_map(m, to_small, s.shape[:2])
            out.append((f.shape[:2], frame_map, roi_score(m, self.pack, self.grid, roi_mask)))
        per_frame_ms = (time.perf_counter() - t0) * 1000 / max(1, len(frames))
        return [self.decide(fm, size, per_frame_ms, score) for size, fm, score in out]

    def score_one(self, frame: np.ndarray) -> Result:
        return self.score([frame])[0]


@register_scorer("tiled")
def build_tiled_scorer(request: ScorerRequest) -> TiledScorer:
    """The tiled scorer of a state enrolled with tiling (edge.scoring.factory picks this kind where the
    station tiles): its bank(s), each on the GPU's nn_min kernel where CUDA is usable."""
    from edge.inference.cuda import gpu_bank

    pack, state = request.pack, request.state
    if state.layout is None:
        raise StateError("station state was enrolled without tiling; enroll with --tile-scale or a tiling: "
                         "section to score tiled")
    return TiledScorer(pack, [gpu_bank(b) for b in state.banks], state.calibration.threshold, state.layout,
                       request.extractor or FeatureExtractor(pack, request.backend), calibration=state.calibration)
