"""Enrollment: good reference images -> a station state (bank and calibrated threshold), into its folder.

`enroll` builds it from files, adding to what the folder already holds (the references are kept in its
`good/` folder, so enrolling more later rebuilds all of it from every one). `build_state` builds it in
memory: patch features -> coreset-subsampled bank, and a threshold calibrated on k-fold held-out scores of
the references themselves (one reference: each quadrant against the rest of it). With at most
FEW_SHOT_MAX_SHOTS references enrollment is few-shot instead (edge.station.few_shot_enrollment); with a
tiling, tiled (edge.station.tiled_enrollment). The state's files are edge.station.state's.
"""
from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np

from edge.errors import StateError
from edge.inference.preprocess import choose_shots, read_image, read_images
from edge.pack import Pack
from edge.scoring.calibration import TARGET_FALSE_REJECT, calibrate, check_target_false_reject
from edge.scoring.decide import image_score
from edge.scoring import numerics
from edge.inference.features import FeatureExtractor
from edge.scoring.scorer import image_scores, pack_maps
from edge.station.few_shot_enrollment import build_few_shot_state, enrolls_few_shot
from edge.station.input_size import station_input_size
from edge.station.reference_banks import build_bank, kfold_holdout_scores, progress_bar
from edge.station.state import GOOD_DIR, STATE_FILE, StationState, load_state
from edge.station.tiled_enrollment import build_tiled_state

MAX_SIZE_RATIO = 16.0  # largest / smallest reference area enrollment accepts


def augmented_views(image: np.ndarray, interpolation: int = cv2.INTER_LINEAR) -> list[np.ndarray]:
    """The 8 flips/rotations of a frame plus two small shifts (reflect-padded)."""
    views = []
    for flipped in (image, cv2.flip(image, 1)):
        for k in range(4):
            views.append(np.ascontiguousarray(np.rot90(flipped, k)))
    h, w = image.shape[:2]
    for dx, dy in ((0.04, 0.03), (-0.03, -0.04)):
        m = np.float32([[1, 0, dx * w], [0, 1, dy * h]])
        views.append(cv2.warpAffine(image, m, (w, h), flags=interpolation, borderMode=cv2.BORDER_REFLECT))
    return views


def single_reference_scores(pack: Pack, view_features: np.ndarray, frame_shape: tuple[int, int]) -> np.ndarray:
    """Held-out normal scores from one reference: each quadrant of the part against the rest of it.

    Augmented views of one image are near-copies of each other, so scoring a view against the
    others says nothing about normal variation. Instead every patch is traced back to the quadrant
    of the original image it shows (by pushing a quadrant-label image through the same flips,
    rotations and shifts), and each view's patches from quadrant r are scored against a bank of
    all views' patches from the *other* quadrants: how far one place on a good part is from the
    rest of that good part.
    """
    h, w = frame_shape
    labels = np.zeros((h, w), np.uint8)
    labels[: h // 2, w // 2:] = 1
    labels[h // 2:, : w // 2] = 2
    labels[h // 2:, w // 2:] = 3
    gh, gw = pack.encoder.feature_shape[1:]
    grids = np.stack([cv2.resize(v, (gw, gh), interpolation=cv2.INTER_NEAREST)
                      for v in augmented_views(labels, cv2.INTER_NEAREST)])
    scores = []
    for region in range(4):
        others = view_features[grids != region]
        bank = build_bank(others, pack.scorer, seed=region, quiet=True)
        for v in range(len(view_features)):
            own = grids[v] == region
            if not own.any():
                continue
            sqdist = np.empty((gh, gw), np.float32)
            sqdist[own] = bank.nearest_sqdist(view_features[v][own])
            # Patches outside the held-out quadrant are not scored: give them the quadrant's median.
            sqdist[~own] = np.median(sqdist[own])
            m = pack_maps(sqdist.ravel(), 1, (gh, gw), pack)[0]
            scores.append(image_score(m, pack.scorer.top_fraction))
    return np.asarray(scores)


def holdout_scores(pack: Pack, features: np.ndarray, seed: int, quiet: bool = False) -> np.ndarray:
    """Image scores of reference images, each scored against a bank built without it (k-fold)."""
    def score_fold(f, n_folds, rest, held):
        bank = build_bank(features, pack.scorer, seed + 1 + f, desc=f"calibration fold {f + 1}/{n_folds}",
                          quiet=quiet, images=rest)
        return image_scores(bank, features[held], pack)
    return kfold_holdout_scores(len(features), seed, score_fold)


def check_reference_sizes(images: list[np.ndarray], names: list[str] | None = None) -> None:
    """Refuse references whose sizes differ wildly (more than MAX_SIZE_RATIO in area): one station sees
    one kind of part, and a mix of crops and whole frames would make a meaningless bank."""
    areas = [img.shape[0] * img.shape[1] for img in images]
    big, small = int(np.argmax(areas)), int(np.argmin(areas))
    if areas[big] > MAX_SIZE_RATIO * areas[small]:
        label = (lambda i: names[i]) if names and len(names) == len(images) else (lambda i: f"image {i}")
        raise StateError(f"reference sizes differ too much: {label(big)} is {images[big].shape[1]}x{images[big].shape[0]} px, "
                         f"{label(small)} is {images[small].shape[1]}x{images[small].shape[0]} px (more than "
                         f"{MAX_SIZE_RATIO:g}x the area); enroll one kind of frame per station")


def build_state(pack: Pack, images: list[np.ndarray], extractor: FeatureExtractor | None = None, seed: int = 0,
                references: list[str] | None = None, quiet: bool = False,
                target_false_reject: float = TARGET_FALSE_REJECT, few_shot: bool | None = None,
                foreground: str = "auto", aspect: str = "auto") -> StationState:
    """Memory bank + calibrated threshold from good reference frames (in memory).

    `few_shot` (default: at most FEW_SHOT_MAX_SHOTS references) enrolls augmented views of every
    shot, adds the subspace head and calibrates with held-out views and synthetic defects;
    `foreground` (auto | on | off) is whether that head masks the background of parts on a plain one;
    `aspect` (auto | keep | squash) whether frames far from the pack's shape keep their aspect ratio
    (edge.station.input_size)."""
    if not images:
        raise StateError("no good reference images to enroll (need at least 1)")
    check_reference_sizes(images, references)
    input_size, input_words = station_input_size(pack, images, aspect)
    if input_size is not None:
        pack = pack.at_input_size(*input_size)
        extractor = FeatureExtractor(pack, extractor.backend if extractor is not None else None)
    state = _build_state(pack, images, extractor or FeatureExtractor(pack), seed, references, quiet,
                         target_false_reject, few_shot, foreground)
    state.input_size = input_size
    state.info["input"] = input_words
    state.info["aspect_mode"] = aspect
    return state


def _build_state(pack: Pack, images: list[np.ndarray], extractor: FeatureExtractor, seed: int,
                 references: list[str] | None, quiet: bool, target_false_reject: float, few_shot: bool | None,
                 foreground: str) -> StationState:
    if few_shot is None:
        few_shot = enrolls_few_shot(pack, len(images))
    if few_shot:
        state = build_few_shot_state(pack, images, extractor, seed, references, quiet, target_false_reject,
                                     foreground=foreground)
        numerics.stamp(state, extractor.backend)
        return state
    single = len(images) == 1
    frames = augmented_views(images[0]) if single else images
    with progress_bar("extracting features", len(frames), quiet, unit="img") as bar:
        feats = extractor.patch_features_batched(frames, progress=bar.update)
    if single:
        normal_scores, source = single_reference_scores(pack, feats, images[0].shape[:2]), "quadrants"
    else:
        normal_scores, source = holdout_scores(pack, feats, seed, quiet=quiet), "holdout"
    calibration = calibrate(normal_scores, target_false_reject, source=source)
    bank = build_bank(feats, pack.scorer, seed, quiet=quiet)
    state = StationState(
        pack_model_id=pack.model_id,
        pack_encoder_sha256=pack.encoder_sha256,
        bank=bank, calibration=calibration, references=list(references or []),
        info={"shots": len(images), "augmented_views": len(frames) if single else 0, "seed": seed,
              "bank_patches": len(bank), "candidate_patches": int(feats.shape[0] * feats.shape[1] * feats.shape[2])},
    )
    numerics.stamp(state, extractor.backend)
    return state


def enroll(pack: Pack, good: list[Path], out: str | Path, shots: int | None = None, seed: int = 0,
           extractor: FeatureExtractor | None = None, quiet: bool = False, log=print, tiling=None,
           train_student=None, target_false_reject: float | None = None, foreground: str | None = None,
           aspect: str | None = None) -> StationState:
    """Enroll good images from files into the state folder `out`, adding to what it already holds.

    Unreadable files are reported and skipped; the rest are enrolled. References are copied into
    `out/good/` so later enrollments (and audits) see every image the bank was built from. With
    `tiling` (a TilingSpec) the bank and threshold are built from tiles as `TiledScorer` cuts them.
    `train_student(images, out)`, when given (export.student: needs torch), trains the learned
    scorer on all references, writes its graph into `out` and returns its StudentSpec.
    `target_false_reject` (default: what the state was calibrated for, else TARGET_FALSE_REJECT) is the
    false-reject rate the threshold aims at. `foreground` (auto | on | off; default: what the state was
    enrolled with, else auto): whether the few-shot head masks the background of parts on a plain one.
    `aspect` (auto | keep | squash; default the same way): whether frames far from the pack's shape keep
    their aspect ratio (edge.station.input_size); a learned student is trained at the pack's size (squash).
    """
    out = Path(out)
    if shots is not None and shots < 1:
        raise StateError(f"shots {shots}: enrollment needs at least 1 good image")
    if tiling is not None and train_student is not None:
        raise StateError("the learned scorer scores whole frames: enroll a tiled station with --scorer bank")
    existing: list[str] = []
    previous = None
    if (out / STATE_FILE).is_file():
        previous = load_state(out)
        existing = previous.references
        if not existing:
            # Rebuilding from the new images alone would silently throw the old bank away.
            raise StateError(f"{out}: this state holds no reference images ({GOOD_DIR}/ is empty), so it cannot "
                             "be extended; enroll all good images into a new folder")
        if previous.pack_encoder_sha256 != pack.encoder_sha256:
            log(f"{out}: was enrolled with pack {previous.pack_model_id}; rebuilding its {len(existing)} references "
                f"for {pack.model_id}")
    if target_false_reject is None:
        target_false_reject = previous.calibration.target_false_reject if previous is not None else TARGET_FALSE_REJECT
    if foreground is None:
        foreground = previous.info.get("foreground_mode", "auto") if previous is not None else "auto"
    if aspect is None:
        aspect = previous.info.get("aspect_mode", "auto") if previous is not None else "auto"
    if train_student is not None or (previous is not None and previous.student is not None):
        if aspect == "keep":
            raise StateError("aspect keep: the learned scorer (student) is trained at the pack's input size; "
                             "enroll with aspect squash, or with --scorer bank into a new folder")
        aspect = "squash"
    try:
        target_false_reject = check_target_false_reject(target_false_reject)
    except ValueError as e:
        raise StateError(str(e)) from None
    new_images, new_paths, skipped = read_images(choose_shots(list(good), shots, seed), log)
    new_names = [p.name for p in new_paths]
    if not new_images and not existing:
        raise StateError("no readable good images to enroll" + (f" ({len(skipped)} skipped)" if skipped else ""))
    # Stage the new references next to the old ones; names made unique, content-addressed.
    staging = Path(tempfile.mkdtemp(prefix=".enroll.", dir=out.parent if out.parent.exists() else None))
    try:
        names = []
        for img, name in zip(new_images, new_names):
            digest = hashlib.sha256(img.tobytes()).hexdigest()[:12]
            stem = f"{Path(name).stem}-{digest}.png"
            if stem in existing or stem in names:
                continue
            if not cv2.imwrite(str(staging / stem), img):
                raise StateError(f"{staging / stem}: could not write reference copy")
            names.append(stem)
        all_names = existing + names
        all_images = [read_image(out / GOOD_DIR / n) for n in existing] + [read_image(staging / n) for n in names]
        log(f"enrolling {len(all_images)} good images ({len(names)} new, {len(existing)} already enrolled)")
        extractor = extractor or FeatureExtractor(pack)
        if tiling is None:
            state = build_state(pack, all_images, extractor, seed=seed, references=all_names, quiet=quiet,
                                target_false_reject=target_false_reject, foreground=foreground, aspect=aspect)
        else:
            state = build_tiled_state(pack, all_images, tiling, extractor, seed=seed, references=all_names,
                                      quiet=quiet)
        state.info["skipped"] = skipped
        for key in ("learn", "refined"):  # where the references came from stays with them
            if previous is not None and key in previous.info:
                state.info[key] = previous.info[key]
        numerics.stamp(state, extractor.backend)  # the threshold holds for these numerics only
        out.mkdir(parents=True, exist_ok=True)
        if train_student is not None:
            state.student = train_student(all_images, out)
        elif previous is not None and previous.student is not None:
            state.student = previous.student
            log(f"{out}: kept the student trained on {previous.student.info.get('shots')} references; "
                "train again with --scorer student to include the new ones")
        (out / GOOD_DIR).mkdir(parents=True, exist_ok=True)
        for n in names:
            shutil.move(str(staging / n), out / GOOD_DIR / n)
        state.save(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return state
