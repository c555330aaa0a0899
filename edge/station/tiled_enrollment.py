"""Tiled enrollment: a station state for tiled scoring, its bank(s) and threshold from the references'
tiles, cut exactly as edge.scoring.tiling's `TiledScorer` cuts them (the tiler, layout and maps are
scoring's; this module owns building banks and the threshold from tiles). Called by edge.station.enrollment.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edge.errors import StateError
from edge.inference.preprocess import check_frame
from edge.pack import Pack
from edge.scoring.bank import MemoryBank
from edge.scoring.calibration import calibrate
from edge.inference.features import FeatureExtractor
from edge.scoring.tiling import Layout, TiledScorer, TilingSpec, prepare, resolve_layout, roi_score, tile_maps
from edge.station.reference_banks import build_bank, kfold_holdout_scores, progress_bar
from edge.station.state import StationState


def tiled_features(pack: Pack, layout: Layout, images: Sequence[np.ndarray], extractor: FeatureExtractor,
                   progress=None) -> np.ndarray:
    """N x T x h x w x C tile features of reference frames, tiled exactly as scoring tiles them."""
    scorer = TiledScorer(pack, [], 0.0, layout, extractor)
    out = None
    for i, img in enumerate(images):
        feats = scorer.features([prepare(layout, check_frame(img))[0]])
        if out is None:
            out = np.empty((len(images), *feats.shape[1:]), np.float32)
        out[i] = feats[0]
        if progress:
            progress(1)
    return out


def build_tiled_banks(pack: Pack, features: np.ndarray, spec: TilingSpec, seed: int, quiet: bool = True,
                      images: np.ndarray | None = None) -> list[MemoryBank]:
    """One bank over all tiles (shared) or one per tile position, from N x T x h x w x C features
    (`images`: boolean mask over N of the references to use)."""
    scorer = pack.scorer if spec.bank_patches is None else pack.scorer.model_copy(
        update={"max_bank_patches": spec.bank_patches})
    n, t = features.shape[:2]
    if spec.bank == "shared":
        mask = None if images is None else np.repeat(images, t)
        return [build_bank(features.reshape(n * t, *features.shape[2:]), scorer, seed, quiet=quiet, images=mask)]
    return [build_bank(features[:, i], scorer, seed + i, quiet=quiet, images=images) for i in range(t)]


def tiled_holdout_scores(pack: Pack, layout: Layout, features: np.ndarray, seed: int, quiet: bool = True,
                         roi_mask: np.ndarray | None = None) -> np.ndarray:
    """ROI scores of each reference against banks built without it (k-fold, as whole-frame enrollment)."""
    grid = layout.grid(pack)
    t = len(grid)

    def score_fold(f, n_folds, rest, held):
        banks = build_tiled_banks(pack, features, layout.spec, seed + 1 + f, quiet, images=rest)
        maps = tile_maps(pack, banks, features[held])
        blended = (grid.blend(maps[i * t:(i + 1) * t]) for i in range(len(held)))
        return [roi_score(m if roi_mask is None else m * roi_mask, pack, grid, roi_mask) for m in blended]
    return kfold_holdout_scores(len(features), seed, score_fold, "tiled calibration")


def build_tiled_state(pack: Pack, images: list[np.ndarray], spec: TilingSpec,
                      extractor: FeatureExtractor | None = None, seed: int = 0, references: list[str] | None = None,
                      quiet: bool = False) -> StationState:
    """Station state for tiled scoring: bank(s) and threshold from the references' tiles."""
    if len(images) < 2:
        raise StateError(f"tiled enrollment needs at least two good reference images, got {len(images)}")
    extractor = extractor or FeatureExtractor(pack)
    layout = resolve_layout(spec, check_frame(images[0]))
    with progress_bar("extracting tile features", len(images), quiet, unit="img") as bar:
        feats = tiled_features(pack, layout, images, extractor, progress=bar.update)
    roi_mask = TiledScorer(pack, [], 0.0, layout, extractor).roi_mask(images[0].shape[:2])
    calibration = calibrate(tiled_holdout_scores(pack, layout, feats, seed, quiet, roi_mask))
    banks = build_tiled_banks(pack, feats, spec, seed, quiet)
    return StationState(
        pack_model_id=pack.model_id, pack_encoder_sha256=pack.encoder_sha256, bank=banks[0],
        calibration=calibration, references=list(references or []), tile_banks=banks[1:], layout=layout,
        info={"shots": len(images), "augmented_views": 0, "seed": seed, "bank_patches": sum(len(b) for b in banks),
              "candidate_patches": int(np.prod(feats.shape[:4])), "tiles": len(layout.grid(pack))},
    )
