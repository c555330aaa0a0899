"""Few-shot enrollment: up to FEW_SHOT_MAX_SHOTS references enroll with the subspace head of
edge.scoring.fewshot (saved as `head-<sha>.npz`), augmented views of every shot, and a threshold from
held-out views (quadrants of a single shot, or leave-one-shot-out): capped below synthetic-defect scores
from 2 up to FEW_SHOT_MAX_VIEWED_SHOTS shots; at 1 shot the largest held-out quadrant score. Called by edge.station.enrollment; owns the head's fitting and the
few-shot threshold, not the state's files.
"""
from __future__ import annotations

import cv2
import numpy as np

from edge.errors import StateError
from edge.inference.preprocess import to_input_pixels
from edge.pack import Pack
from edge.scoring.bank import MemoryBank
from edge.scoring.calibration import TARGET_FALSE_REJECT, calibrate_few_shot
from edge.scoring.decide import image_score
from edge.scoring.fewshot import (PADDING_RING, FewShotHead, SubspaceHead, border_offsets, few_shot_views,
                                  jittered_views, synthetic_defects)
from edge.inference.features import FeatureExtractor
from edge.scoring.foreground import Foreground, plain_background
from edge.scoring.scorer import grid_maps
from edge.station.reference_banks import build_bank, progress_bar, sampled_bank
from edge.station.state import StationState

# Up to this many references, enrollment scores with the subspace head and the held-out +
# synthetic-defect threshold; above it, with the nearest-neighbour bank and its k-fold hold-out. On
# magnetic_tile the head measured better than the bank up to 64 references, level in image AUROC at 96
# and 128 but with a far better automatic threshold (96: balanced accuracy 0.79 vs 0.68) and faster; the
# bank wins at 256 and at all 752 (docs/evaluation.md, "Few shots").
FEW_SHOT_MAX_SHOTS = 128
# Augmented views of every shot up to this many shots: they lift image AUROC at 1-16 shots and cost
# it at 48 (more real parts show more than turned copies of them).
FEW_SHOT_MAX_VIEWED_SHOTS = 16
FEW_SHOT_VIEWS = "rot8+shift"
SHAPE_KEEPING_VIEWS = "flip4+shift"  # a station fed non-square frames (edge.station.input_size)
FEW_SHOT_MAX_FOLDS = 16  # above this many shots the held-out scores come from folds of shots, not one each
FEW_SHOT_HEAD = "subspace"
# Several shots: the subspace head takes the encoder's zero-padding offsets off the grid's outer ring
# (BORDER_OFFSETS) and divides the ring's scores by their typical level on the references (BORDER_SCALES).
# Off: on magnetic_tile, whose defects often sit on the frame's edge, they cost image and pixel AUROC
# (docs/evaluation.md, "Regions on the frame border"), though on the synthetic line they end border boxes.
BORDER_SCALES = False
BORDER_OFFSETS = False
SYNTHETIC_DEFECTS = 32  # synthetic defective copies, spread over the shots
QUADRANTS = 4  # a single shot is held out by quadrants (few_shot_quadrant_scores)
# Background masking of parts on a plain background (edge.scoring.foreground): auto = where every shot is one.
FOREGROUND_MODES = ("auto", "on", "off")


def enrolls_few_shot(pack: Pack, n_references: int) -> bool:
    """Whether `n_references` enroll with the few-shot head (else the bank). AnomalyGPT packs score their
    few-shot branch with the bank itself: they keep the bank path."""
    return n_references <= FEW_SHOT_MAX_SHOTS and pack.scorer.kind == "memory_bank"


def fit_head(kind: str, views: str, feats: np.ndarray, pack: Pack, seed: int, border: bool = False,
             weights: np.ndarray | None = None) -> FewShotHead:
    """The few-shot head fitted to N x h x w x C (or rows x C) reference features; `border` (N x h x w x C
    of several shots only): the padding ring's offsets are taken off first (edge.scoring.fewshot.border_offsets);
    `weights` (N x h x w, or rows, foreground masking): only the part's patches (weight > 0) are fitted."""
    # (the subspace head only: the nn+subspace head's bank holds the features as they come)
    offsets = border_offsets(feats) if border and kind == "subspace" and feats.ndim == 4 else None
    if offsets is not None:
        feats = feats - offsets
    all_rows = feats.reshape(-1, feats.shape[-1])
    rows = all_rows if weights is None else all_rows[weights.reshape(-1) > 0]
    subspace = SubspaceHead.fit(rows, seed=seed)
    sample = rows[:: max(1, len(rows) // 20000)]
    scale = float(np.median(subspace.residual(sample))) or 1.0
    nn_scale = _nn_scale(feats, pack, seed) if kind == "nn+subspace" else None
    head = FewShotHead(kind, views, subspace, scale, nn_scale, offsets)
    if offsets is not None and BORDER_SCALES:
        head.border_scales = _border_scales(head.flat_scores(all_rows).reshape(feats.shape[:3]))
    return head


def _border_scales(scores: np.ndarray, ring: int = PADDING_RING) -> np.ndarray:
    """h x w: each ring position's median reference score over the interior's median; 1 inside."""
    n, h, w = scores.shape
    inner = float(np.median(scores[:, ring:h - ring, ring:w - ring])) or 1.0
    scales = np.maximum(np.median(scores, axis=0) / inner, 1.0).astype(np.float32)
    scales[ring:h - ring, ring:w - ring] = 1.0
    return scales


def _head_bank(head: FewShotHead, feats: np.ndarray, pack: Pack, seed: int) -> MemoryBank | None:
    """The bank a head searches (None for the subspace head alone, which does not search)."""
    return build_bank(feats, pack.scorer, seed, quiet=True) if head.kind != "subspace" else None


def _nn_scale(feats: np.ndarray, pack: Pack, seed: int) -> float:
    """Median nearest distance of half of the references' patches to a bank of the other half (halves:
    the first and second half of the views, or the top and bottom of a single view)."""
    if len(feats) >= 2:
        a, b = feats[: len(feats) // 2], feats[len(feats) // 2:]
    else:
        a, b = feats[:, : feats.shape[1] // 2], feats[:, feats.shape[1] // 2:]
    bank = build_bank(a, pack.scorer, seed, quiet=True)
    return float(np.median(np.sqrt(bank.nearest_sqdist(b.reshape(-1, b.shape[-1]))))) or 1.0


def head_image_scores(head: FewShotHead, bank: MemoryBank, feats: np.ndarray, pack: Pack,
                      weights: np.ndarray | None = None) -> np.ndarray:
    maps = grid_maps(head.patch_scores(feats, bank, weights), pack)
    return np.array([image_score(m, pack.scorer.top_fraction) for m in maps])


def few_shot_quadrant_scores(pack: Pack, head: FewShotHead, view_features: np.ndarray, frame_shape: tuple[int, int],
                             seed: int, jitter_features: np.ndarray | None = None,
                             weights: np.ndarray | None = None) -> np.ndarray:
    """One shot's held-out scores: every view's patches from one quadrant of the part scored by a head
    fitted to all views' patches from the other three (as `single_reference_scores` does for the bank),
    each quadrant's score the mean of the top fraction of its own map pixels. `jitter_features`
    (untransformed geometry, re-lit / blurred / noisy copies of the shot) are scored the same way,
    against the enrolled views only: they stand in for the part-to-part variation one shot cannot show.
    `weights` (foreground masking: views, then jittered copies): only the part's patches are fitted and
    scored, as the station scores."""
    h, w = frame_shape
    labels = np.zeros((h, w), np.uint8)
    labels[: h // 2, w // 2:] = 1
    labels[h // 2:, : w // 2] = 2
    labels[h // 2:, w // 2:] = 3
    gh, gw = view_features.shape[1:3]
    grids = np.stack([cv2.resize(v, (gw, gh), interpolation=cv2.INTER_NEAREST)
                      for v in few_shot_views(labels, head.views, labels=True)])
    fitted_on = len(view_features)
    if jitter_features is not None:
        grids = np.concatenate([grids, np.repeat(grids[:1], len(jitter_features), axis=0)])
        view_features = np.concatenate([view_features, jitter_features])
    part = np.ones(grids.shape, bool) if weights is None else weights > 0
    scores = []
    for region in range(QUADRANTS):
        others = view_features[:fitted_on][(grids[:fitted_on] != region) & part[:fitted_on]]
        part_head = fit_head(head.kind, head.views, others, pack, seed + region)
        part_bank = _head_bank(part_head, others, pack, seed + region)
        for v in range(len(view_features)):
            own = grids[v] == region
            if not own.any():
                continue
            patch = np.empty((gh, gw), np.float32)
            patch[own] = part_head.flat_scores(view_features[v][own], part_bank) * part[v][own]
            patch[~own] = np.median(patch[own])  # only the held-out quadrant is scored
            m = grid_maps(patch[None], pack)[0]
            # The held-out quadrant's own top fraction, the statistic a whole part gets over its whole
            # map (the top fraction of the filled map would be a quarter as extreme: its upper 20%).
            in_region = cv2.resize(own.astype(np.uint8), (m.shape[1], m.shape[0]), interpolation=cv2.INTER_NEAREST) > 0
            scores.append(image_score(m[in_region], pack.scorer.top_fraction))
    return np.asarray(scores)


def few_shot_loso_scores(pack: Pack, head: FewShotHead, per_shot: list[np.ndarray], seed: int,
                         max_folds: int = FEW_SHOT_MAX_FOLDS, weights: list[np.ndarray] | None = None) -> np.ndarray:
    """Held-out scores of the shots: each shot's views scored by a head (and bank) fitted to the views of
    the shots outside its fold. Up to `max_folds` shots that is leave-one-shot-out; above, the shots are
    dealt into `max_folds` folds (shot i into fold i mod max_folds). `weights` (per shot, foreground
    masking): only the part's patches are fitted and scored."""
    n_folds = min(len(per_shot), max_folds)

    def joined(arrays, fold, held):
        return None if arrays is None else np.concatenate([x for i, x in enumerate(arrays) if (i % n_folds == fold) == held])

    scores = []
    for f in range(n_folds):
        others = joined(per_shot, f, False)
        part_head = fit_head(head.kind, head.views, others, pack, seed + 1 + f, border=BORDER_OFFSETS,
                             weights=joined(weights, f, False))
        part_bank = _head_bank(part_head, others, pack, seed + 1 + f)
        scores.append(head_image_scores(part_head, part_bank, joined(per_shot, f, True), pack, joined(weights, f, True)))
    return np.concatenate(scores)


def foreground_for(mode: str, images: list[np.ndarray], view_images: list[list[np.ndarray]], pack: Pack
                   ) -> tuple[Foreground | None, str]:
    """The head's foreground mask for `mode` auto (where every shot is a part on a plain background), on or
    off, and what was decided in words ("on", "off: <why>")."""
    if mode not in FOREGROUND_MODES:
        raise StateError(f"foreground {mode!r}: expected one of {', '.join(FOREGROUND_MODES)}")
    if mode == "off":
        return None, "off: as configured"
    if mode == "auto":
        why = plain_background([to_input_pixels(img, pack.input) for img in images])
        if why is not None:
            return None, f"off: {why}"
    pixels = [to_input_pixels(v, pack.input) for views in view_images for v in views]
    return Foreground.from_references(pixels), "on"


def encode_frames(pack: Pack, extractor: FeatureExtractor, frames: list[np.ndarray], mask: Foreground | None
                  ) -> tuple[np.ndarray, np.ndarray | None]:
    """Features and patch weights of frames as the station's scorer takes them: with a foreground `mask`,
    the background painted over and only the part's patches weighted; without one, weights None."""
    if mask is None:
        return extractor.patch_features_batched(frames), None
    painted, weights = mask.prepare(frames, lambda f: to_input_pixels(f, pack.input), pack.encoder.feature_shape[1:])
    return extractor.patch_features_batched(painted), weights


def build_few_shot_state(pack: Pack, images: list[np.ndarray], extractor: FeatureExtractor, seed: int = 0,
                         references: list[str] | None = None, quiet: bool = False,
                         target_false_reject: float = TARGET_FALSE_REJECT, views: str | None = None,
                         kind: str = FEW_SHOT_HEAD, foreground: str = "auto") -> StationState:
    """Few-shot enrollment: every shot's augmented views in the bank and the subspace head, the threshold
    from held-out views (quadrants of a single shot, or leave-one-shot-out) and synthetic defects.
    `foreground` auto | on | off: mask the background of parts on a plain background (edge.scoring.foreground;
    auto: where every shot is one)."""
    if views is None:
        square = pack.input.height == pack.input.width  # else quarter turns would squash the frames
        views = "none" if len(images) > FEW_SHOT_MAX_VIEWED_SHOTS else FEW_SHOT_VIEWS if square else SHAPE_KEEPING_VIEWS
    view_images = [few_shot_views(img, views) for img in images]
    mask, masking = foreground_for(foreground, images, view_images, pack)

    def encoded(frames):
        return encode_frames(pack, extractor, frames, mask)

    per_shot, shot_weights = [], []
    with progress_bar("extracting features of augmented views", len(images), quiet, unit="shot") as bar:
        for shot_views in view_images:
            f, w = encoded(shot_views)
            per_shot.append(f)
            shot_weights.append(w)
            bar.update(1)
    feats = np.concatenate(per_shot)
    if mask is None:
        shot_weights = all_weights = None
    else:
        all_weights = np.concatenate(shot_weights)
    head = fit_head(kind, views, feats, pack, seed, border=BORDER_OFFSETS and len(images) > 1, weights=all_weights)
    head.foreground = mask
    if kind == "subspace":
        # The subspace head scores without the bank; it is kept (a random sample, not a coreset, in the
        # head's own principal axes: no second decomposition) so the state stays a valid bank state.
        bank = sampled_bank(feats, pack.scorer, seed, head.subspace)
    else:
        bank = build_bank(feats, pack.scorer, seed, quiet=quiet)
    if len(images) == 1:
        jitter, jitter_weights = encoded(jittered_views(images[0], seed))
        weights = None if mask is None else np.concatenate([shot_weights[0], jitter_weights])
        normal = few_shot_quadrant_scores(pack, head, per_shot[0], images[0].shape[:2], seed, jitter, weights)
        source = "quadrants+jitter"
    else:
        normal = few_shot_loso_scores(pack, head, per_shot, seed, weights=shot_weights)
        source = "loso" if len(images) <= FEW_SHOT_MAX_FOLDS else f"{FEW_SHOT_MAX_FOLDS}-fold"
    per_image = -(-SYNTHETIC_DEFECTS // len(images))
    defects = [d for i, img in enumerate(images) for d in synthetic_defects(img, per_image, seed=seed * 1000 + i)]
    defect_features, defect_weights = encoded(defects)
    synthetic = head_image_scores(head, bank, defect_features, pack, defect_weights)
    # The cap corrects the held-out estimate of few viewed shots, which overstates; folds of many plain
    # shots need none. One shot's quadrants understate instead (parts of one part vary less than parts
    # do): four held-out units, whose largest score is the good side, uncapped.
    single = len(images) == 1
    calibration = calibrate_few_shot(normal, synthetic, source, target_false_reject=target_false_reject,
                                     cap=views != "none" and not single,
                                     held_out_units=QUADRANTS if single else None)
    return StationState(
        pack_model_id=pack.model_id, pack_encoder_sha256=pack.encoder_sha256, bank=bank, calibration=calibration,
        references=list(references or []), head=head,
        info={"shots": len(images), "augmented_views": len(feats), "seed": seed, "bank_patches": len(bank),
              "candidate_patches": int(np.prod(feats.shape[:3])), "head": kind, "views": views,
              "subspace_dims": head.subspace.dims, "synthetic_defects": len(defects),
              "foreground": masking, "foreground_mode": foreground},
    )
