"""Station state: the memory bank of normal patches and the calibrated threshold, beside the pack.

`enroll` builds it from good reference images: patch features -> coreset-subsampled bank, and a
threshold calibrated on k-fold held-out scores of the references themselves. With at most
FEW_SHOT_MAX_SHOTS references enrollment is few-shot instead: augmented views of every shot, the
subspace head of `edge.scoring.fewshot` (saved as `head-<sha>.npz`), and a threshold from held-out views
(capped below synthetic-defect scores from 2 up to FEW_SHOT_MAX_VIEWED_SHOTS shots; at 1 shot the
largest held-out quadrant score). Enrolling more images later rebuilds all of it from the references
kept in the state's `good/` folder.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import yaml
from tqdm import tqdm

from edge.scoring.bank import MemoryBank, greedy_coreset
from edge.scoring.calibration import TARGET_FALSE_REJECT, Calibration, calibrate, calibrate_few_shot, check_target_false_reject
from edge.scoring.decide import image_score
from edge.station import engine_calibration
from edge.errors import StateError
from edge.scoring.fewshot import (PADDING_RING, FewShotHead, SubspaceHead, border_offsets, few_shot_views, jittered_views,
                      synthetic_defects)
from edge.pack import Pack, ScorerSpec
from edge.inference.preprocess import choose_shots, read_image, read_images
from edge.scoring.scorer import FeatureExtractor, grid_maps, image_scores, pack_maps
from edge.scoring.student import StudentSpec

if TYPE_CHECKING:  # tiling imports this module
    from edge.scoring.tiling import Layout

STATE_SCHEMA_VERSION = 1
STATE_FILE = "state.yaml"
GOOD_DIR = "good"
ROI_REFERENCE = "roi-reference.png"
MAX_CALIBRATION_IMAGES = 120
POOL_FACTOR = 64
# Up to this many references, enrollment scores with the subspace head and the held-out +
# synthetic-defect threshold; above it, with the nearest-neighbour bank and its k-fold hold-out. On
# magnetic_tile the head measured better than the bank up to 64 references and level at 128; the
# bank wins at 256 and at all 752 (docs/evaluation.md, "Few shots").
FEW_SHOT_MAX_SHOTS = 64
# Augmented views of every shot up to this many shots: they lift image AUROC at 1-16 shots and cost
# it at 48 (more real parts show more than turned copies of them).
FEW_SHOT_MAX_VIEWED_SHOTS = 16
FEW_SHOT_VIEWS = "rot8+shift"
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
MAX_SIZE_RATIO = 16.0  # largest / smallest reference area enrollment accepts


@dataclass
class StationState:
    pack_model_id: str
    pack_encoder_sha256: str
    bank: MemoryBank
    calibration: Calibration
    references: list[str] = field(default_factory=list)  # file names under good/ (may be empty in memory)
    info: dict = field(default_factory=dict)
    tile_banks: list[MemoryBank] = field(default_factory=list)  # per-tile banks of positions 1.. (bank is 0)
    layout: Layout | None = None  # the tiling enrolled with (None: whole-frame scoring)
    student: StudentSpec | None = None  # the learned scorer, when trained (enroll --scorer student)
    head: FewShotHead | None = None  # the few-shot patch scorer (None: nearest-neighbour bank only)
    root: Path | None = None  # the folder it was loaded from or saved to

    @property
    def banks(self) -> list[MemoryBank]:
        return [self.bank, *self.tile_banks]

    @property
    def tiling_spec(self):
        """The TilingSpec enrolled with, or None for whole-frame scoring."""
        return self.layout.spec if self.layout is not None else None

    def save(self, root: str | Path) -> Path:
        """Write the bank under a content-addressed name, then point state.yaml at it (replaced last),
        then drop older banks: a crash at any step leaves the previous, consistent state readable."""
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        digest = bank_digest(self.bank)
        bank_name = f"bank-{digest[:16]}.npz"
        _atomic_write(root / bank_name, lambda f: np.savez(f, **bank_arrays(self.bank)))
        keep = {bank_name}
        if self.student is not None:
            keep.add(self.student.file)
        tiling = None
        if self.layout is not None:
            tiling = self.layout.to_dict()
            tiling["tile_banks"] = []
            for b in self.tile_banks:
                d = bank_digest(b)
                name = f"bank-{d[:16]}.npz"
                _atomic_write(root / name, lambda f, b=b: np.savez(f, **bank_arrays(b)))
                tiling["tile_banks"].append({"file": name, "sha256": d})
                keep.add(name)
            if self.layout.reference is not None:
                ok, png = cv2.imencode(".png", self.layout.reference)
                _atomic_write(root / ROI_REFERENCE, lambda f: f.write(png.tobytes()))
                tiling["reference"] = ROI_REFERENCE
        doc = {
            "schema_version": STATE_SCHEMA_VERSION,
            "pack": {"model_id": self.pack_model_id, "encoder_sha256": self.pack_encoder_sha256},
            "updated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "bank": {"file": bank_name, "patches": len(self.bank), "channels": self.bank.channels,
                     "dims": int(self.bank.features.shape[1]), "sha256": digest},
            "calibration": self.calibration.to_dict(),
            "references": self.references,
            "info": self.info,
        }
        if tiling is not None:
            doc["tiling"] = tiling
        if self.student is not None:
            self.student.check_file(root)
            doc["student"] = self.student.to_dict()
        if self.head is not None:
            arrays = self.head.arrays()
            digest = _arrays_digest(arrays)
            name = f"head-{digest[:16]}.npz"
            _atomic_write(root / name, lambda f: np.savez(f, **arrays))
            keep.add(name)
            doc["head"] = {**self.head.to_dict(), "file": name, "sha256": digest}
        _atomic_write(root / STATE_FILE, lambda f: f.write(yaml.safe_dump(doc, sort_keys=False).encode()))
        for old in [*root.glob("bank-*.npz"), *root.glob("student-*.onnx"), *root.glob("head-*.npz")]:
            if old.name not in keep:
                old.unlink(missing_ok=True)
        self.root = root
        return root


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".part")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def bank_arrays(bank: MemoryBank) -> dict[str, np.ndarray]:
    arrays = {"features": bank.features}
    if bank.components is not None:
        arrays.update(mean=bank.mean, components=bank.components)
    if bank.groups > 1:
        arrays["groups"] = np.array(bank.groups)
    return arrays


def bank_digest(bank: MemoryBank) -> str:
    return _arrays_digest(bank_arrays(bank))


def _arrays_digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name, array in arrays.items():
        h.update(name.encode())
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def _load_head(root: Path, entry: dict, path: Path) -> FewShotHead:
    head_path = root / entry["file"]
    with np.load(head_path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    if _arrays_digest(arrays) != entry.get("sha256"):
        raise StateError(f"{head_path}: few-shot head does not match the sha256 in {path}")
    return FewShotHead.from_parts(entry, arrays)


def load_state(root: str | Path, pack: Pack | None = None) -> StationState:
    root = Path(root)
    path = root / STATE_FILE
    if not path.is_file():
        if (root / "pack.yaml").is_file():
            # A pack folder given as the state: the state lives beside the pack, never inside it.
            raise StateError(f"{root} is a model pack, not a station state; enroll good parts into a folder of "
                             f"their own: anomaly-edge enroll --pack {root} --good DIR --out station (and pass "
                             "that folder as --state)")
        raise StateError(f"{path}: missing (enroll good parts first: anomaly-edge enroll --pack P --good DIR --out {root})")
    try:
        doc = yaml.safe_load(path.read_text())
        if not isinstance(doc, dict) or doc.get("schema_version") != STATE_SCHEMA_VERSION:
            version = doc.get("schema_version") if isinstance(doc, dict) else None
            raise StateError(f"{path}: schema_version {version!r} not supported ({STATE_SCHEMA_VERSION})")
        bank = _load_bank(root, doc["bank"], path)
        tiling = doc.get("tiling")
        layout, tile_banks = None, []
        if tiling is not None:
            from pydantic import ValidationError

            from edge.scoring.frozen_spec import problems
            from edge.scoring.tiling import Layout, TilingSpec

            tile_banks = [_load_bank(root, b, path) for b in tiling.get("tile_banks") or []]
            reference = read_image(root / tiling["reference"]) if tiling.get("reference") else None
            try:
                spec = TilingSpec.model_validate({k: v for k, v in tiling.items()
                                                  if k not in ("tile_banks", "reference", "roi_size")})
            except ValidationError as e:
                raise StateError(f"{path}: {problems(e, 'tiling')}") from None
            layout = Layout(spec, tuple(int(v) for v in tiling["roi_size"]), reference)
        state = StationState(str(doc["pack"]["model_id"]), str(doc["pack"]["encoder_sha256"]), bank,
                             Calibration.from_dict(doc["calibration"]), list(doc.get("references") or []),
                             dict(doc.get("info") or {}), tile_banks, layout, root=root)
        if doc.get("student") is not None:
            state.student = StudentSpec.from_dict(doc["student"])
            state.student.check_file(root)
        if doc.get("head") is not None:  # absent in states written before few-shot enrollment
            state.head = _load_head(root, doc["head"], path)
    except StateError:
        raise
    except Exception as e:
        raise StateError(f"{path}: unreadable station state: {type(e).__name__}: {e}") from None
    if pack is not None:
        check_state_matches_pack(state, pack, path)
    return state


def _load_bank(root: Path, entry: dict, path: Path) -> MemoryBank:
    bank_path = root / entry["file"]
    with np.load(bank_path, allow_pickle=False) as arrays:
        groups = int(arrays["groups"]) if "groups" in arrays else 1
        bank = MemoryBank(arrays["features"], arrays.get("mean"), arrays.get("components"), groups)
    if bank_digest(bank) != entry.get("sha256"):
        raise StateError(f"{bank_path}: memory bank does not match the sha256 in {path}")
    return bank


def check_state_matches_pack(state: StationState, pack: Pack, where) -> None:
    encoder_sha = pack.encoder_sha256
    if state.pack_encoder_sha256 != encoder_sha:
        raise StateError(f"{where}: enrolled with pack {state.pack_model_id} (encoder {state.pack_encoder_sha256[:12]}), "
                         f"not with {pack.model_id} (encoder {encoder_sha[:12]}): enroll again for this pack")
    if state.bank.channels != pack.encoder.feature_shape[0]:
        raise StateError(f"{where}: bank has {state.bank.channels} channels, pack features have {pack.encoder.feature_shape[0]}")


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


def _progress(desc: str, total: int, quiet: bool, unit: str = "patch"):
    return tqdm(total=total, desc=desc, unit=unit, disable=quiet, leave=False, dynamic_ncols=True)


def build_bank(features: np.ndarray, scorer: ScorerSpec, seed: int, desc: str = "coreset",
               quiet: bool = False, images: np.ndarray | None = None) -> MemoryBank:
    """Coreset-subsampled bank of at most `scorer.max_bank_patches` rows, PCA-projected as the pack says.

    `features` is N x h x w x C (or rows x C); `images`, a boolean mask over N, restricts the bank to
    those images without copying their features (full-shot enrollment holds ~1 GB of them).
    """
    flat = features.reshape(-1, features.shape[-1])
    rows = np.arange(len(flat))
    if images is not None:
        per_image = len(flat) // len(features)
        rows = (np.flatnonzero(images)[:, None] * per_image + np.arange(per_image)).ravel()
    cap = scorer.max_bank_patches
    if len(rows) > cap:
        if len(rows) > POOL_FACTOR * cap:
            # Greedy selection costs O(pool x cap): draw a random pool first so full-shot enrollment
            # stays in minutes; the greedy step still picks the outlying patches within it.
            rows = rows[np.sort(np.random.default_rng(seed).choice(len(rows), POOL_FACTOR * cap, replace=False))]
        with _progress(f"{desc} {cap}/{len(rows)} patches", cap, quiet) as bar:
            rows = greedy_coreset(flat, cap, seed=seed, progress=bar.update, rows=rows)
    chosen = flat[rows]
    if scorer.projection_dim:
        return MemoryBank.with_pca(chosen, scorer.projection_dim)
    return MemoryBank(chosen, groups=scorer.bank_groups)


def sampled_bank(features: np.ndarray, scorer: ScorerSpec, seed: int, subspace: SubspaceHead) -> MemoryBank:
    """At most `scorer.max_bank_patches` rows drawn at random (no coreset), projected onto the leading
    `scorer.projection_dim` axes of `subspace` (the references' principal axes) when the pack projects."""
    flat = features.reshape(-1, features.shape[-1])
    if len(flat) > scorer.max_bank_patches:
        flat = flat[np.sort(np.random.default_rng(seed).choice(len(flat), scorer.max_bank_patches, replace=False))]
    if scorer.projection_dim:
        axes = subspace.basis[:, : scorer.projection_dim]
        return MemoryBank((flat - subspace.mean) @ axes, subspace.mean, axes)
    return MemoryBank(flat, groups=scorer.bank_groups)


def holdout_scores(pack: Pack, features: np.ndarray, seed: int, quiet: bool = False) -> np.ndarray:
    """Image scores of reference images, each scored against a bank built without it (k-fold)."""
    n = len(features)
    if n < 2:
        raise StateError("calibration needs at least two reference images")
    order = np.random.default_rng(seed).permutation(n)
    n_folds = min(5, n)
    per_fold = max(1, MAX_CALIBRATION_IMAGES // n_folds)
    scores = []
    for f in range(n_folds):
        held = order[f::n_folds]
        rest = np.ones(n, bool)
        rest[held] = False
        bank = build_bank(features, pack.scorer, seed + 1 + f, desc=f"calibration fold {f + 1}/{n_folds}",
                          quiet=quiet, images=rest)
        scores.append(image_scores(bank, features[np.sort(held[:per_fold])], pack))
    return np.concatenate(scores)


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


def enrolls_few_shot(pack: Pack, n_references: int) -> bool:
    """Whether `n_references` enroll with the few-shot head (else the bank). AnomalyGPT packs score their
    few-shot branch with the bank itself: they keep the bank path."""
    return n_references <= FEW_SHOT_MAX_SHOTS and pack.scorer.kind == "memory_bank"


def build_state(pack: Pack, images: list[np.ndarray], extractor: FeatureExtractor | None = None, seed: int = 0,
                references: list[str] | None = None, quiet: bool = False,
                target_false_reject: float = TARGET_FALSE_REJECT, few_shot: bool | None = None) -> StationState:
    """Memory bank + calibrated threshold from good reference frames (in memory).

    `few_shot` (default: at most FEW_SHOT_MAX_SHOTS references) enrolls augmented views of every
    shot, adds the subspace head and calibrates with held-out views and synthetic defects."""
    if not images:
        raise StateError("no good reference images to enroll (need at least 1)")
    check_reference_sizes(images, references)
    extractor = extractor or FeatureExtractor(pack)
    if few_shot is None:
        few_shot = enrolls_few_shot(pack, len(images))
    if few_shot:
        state = build_few_shot_state(pack, images, extractor, seed, references, quiet, target_false_reject)
        engine_calibration.stamp(state, extractor.backend)
        return state
    single = len(images) == 1
    frames = augmented_views(images[0]) if single else images
    with _progress("extracting features", len(frames), quiet, unit="img") as bar:
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
    engine_calibration.stamp(state, extractor.backend)
    return state


def fit_head(kind: str, views: str, feats: np.ndarray, pack: Pack, seed: int, border: bool = False) -> FewShotHead:
    """The few-shot head fitted to N x h x w x C (or rows x C) reference features; `border` (N x h x w x C
    of several shots only): the padding ring's offsets are taken off first (edge.scoring.fewshot.border_offsets)."""
    # (the subspace head only: the nn+subspace head's bank holds the features as they come)
    offsets = border_offsets(feats) if border and kind == "subspace" and feats.ndim == 4 else None
    if offsets is not None:
        feats = feats - offsets
    rows = feats.reshape(-1, feats.shape[-1])
    subspace = SubspaceHead.fit(rows, seed=seed)
    sample = rows[:: max(1, len(rows) // 20000)]
    scale = float(np.median(subspace.residual(sample))) or 1.0
    nn_scale = _nn_scale(feats, pack, seed) if kind == "nn+subspace" else None
    head = FewShotHead(kind, views, subspace, scale, nn_scale, offsets)
    if offsets is not None and BORDER_SCALES:
        head.border_scales = _border_scales(head.flat_scores(rows).reshape(feats.shape[:3]))
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


def head_image_scores(head: FewShotHead, bank: MemoryBank, feats: np.ndarray, pack: Pack) -> np.ndarray:
    maps = grid_maps(head.patch_scores(feats, bank), pack)
    return np.array([image_score(m, pack.scorer.top_fraction) for m in maps])


def few_shot_quadrant_scores(pack: Pack, head: FewShotHead, view_features: np.ndarray, frame_shape: tuple[int, int],
                             seed: int, jitter_features: np.ndarray | None = None) -> np.ndarray:
    """One shot's held-out scores: every view's patches from one quadrant of the part scored by a head
    fitted to all views' patches from the other three (as `single_reference_scores` does for the bank).
    `jitter_features` (untransformed geometry, re-lit / blurred / noisy copies of the shot) are scored
    the same way, against the enrolled views only: they stand in for the part-to-part variation one
    shot cannot show."""
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
    scores = []
    for region in range(QUADRANTS):
        others = view_features[:fitted_on][grids[:fitted_on] != region]
        part_head = fit_head(head.kind, head.views, others, pack, seed + region)
        part_bank = _head_bank(part_head, others, pack, seed + region)
        for v in range(len(view_features)):
            own = grids[v] == region
            if not own.any():
                continue
            patch = np.empty((gh, gw), np.float32)
            patch[own] = part_head.flat_scores(view_features[v][own], part_bank)
            patch[~own] = np.median(patch[own])  # only the held-out quadrant is scored
            scores.append(image_score(grid_maps(patch[None], pack)[0], pack.scorer.top_fraction))
    return np.asarray(scores)


def few_shot_loso_scores(pack: Pack, head: FewShotHead, per_shot: list[np.ndarray], seed: int,
                         max_folds: int = FEW_SHOT_MAX_FOLDS) -> np.ndarray:
    """Held-out scores of the shots: each shot's views scored by a head (and bank) fitted to the views of
    the shots outside its fold. Up to `max_folds` shots that is leave-one-shot-out; above, the shots are
    dealt into `max_folds` folds (shot i into fold i mod max_folds)."""
    n_folds = min(len(per_shot), max_folds)
    scores = []
    for f in range(n_folds):
        held = [i for i in range(len(per_shot)) if i % n_folds == f]
        others = np.concatenate([x for i, x in enumerate(per_shot) if i % n_folds != f])
        part_head = fit_head(head.kind, head.views, others, pack, seed + 1 + f, border=BORDER_OFFSETS)
        part_bank = _head_bank(part_head, others, pack, seed + 1 + f)
        scores.append(head_image_scores(part_head, part_bank, np.concatenate([per_shot[i] for i in held]), pack))
    return np.concatenate(scores)


def build_few_shot_state(pack: Pack, images: list[np.ndarray], extractor: FeatureExtractor, seed: int = 0,
                         references: list[str] | None = None, quiet: bool = False,
                         target_false_reject: float = TARGET_FALSE_REJECT, views: str | None = None,
                         kind: str = FEW_SHOT_HEAD) -> StationState:
    """Few-shot enrollment: every shot's augmented views in the bank and the subspace head, the threshold
    from held-out views (quadrants of a single shot, or leave-one-shot-out) and synthetic defects."""
    if views is None:
        views = FEW_SHOT_VIEWS if len(images) <= FEW_SHOT_MAX_VIEWED_SHOTS else "none"
    per_shot = []
    with _progress("extracting features of augmented views", len(images), quiet, unit="shot") as bar:
        for img in images:
            per_shot.append(extractor.patch_features_batched(few_shot_views(img, views)))
            bar.update(1)
    feats = np.concatenate(per_shot)
    head = fit_head(kind, views, feats, pack, seed, border=BORDER_OFFSETS and len(images) > 1)
    if kind == "subspace":
        # The subspace head scores without the bank; it is kept (a random sample, not a coreset, in the
        # head's own principal axes: no second decomposition) so the state stays a valid bank state.
        bank = sampled_bank(feats, pack.scorer, seed, head.subspace)
    else:
        bank = build_bank(feats, pack.scorer, seed, quiet=quiet)
    if len(images) == 1:
        jitter = extractor.patch_features_batched(jittered_views(images[0], seed))
        normal = few_shot_quadrant_scores(pack, head, per_shot[0], images[0].shape[:2], seed, jitter)
        source = "quadrants+jitter"
    else:
        normal = few_shot_loso_scores(pack, head, per_shot, seed)
        source = "loso" if len(images) <= FEW_SHOT_MAX_FOLDS else f"{FEW_SHOT_MAX_FOLDS}-fold"
    per_image = -(-SYNTHETIC_DEFECTS // len(images))
    defects = [d for i, img in enumerate(images) for d in synthetic_defects(img, per_image, seed=seed * 1000 + i)]
    synthetic = head_image_scores(head, bank, extractor.patch_features_batched(defects), pack)
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
              "subspace_dims": head.subspace.dims, "synthetic_defects": len(defects)},
    )


def enroll(pack: Pack, good: list[Path], out: str | Path, shots: int | None = None, seed: int = 0,
           extractor: FeatureExtractor | None = None, quiet: bool = False, log=print, tiling=None,
           train_student=None, target_false_reject: float | None = None) -> StationState:
    """Enroll good images from files into the state folder `out`, adding to what it already holds.

    Unreadable files are reported and skipped; the rest are enrolled. References are copied into
    `out/good/` so later enrollments (and audits) see every image the bank was built from. With
    `tiling` (a TilingSpec) the bank and threshold are built from tiles as `TiledScorer` cuts them.
    `train_student(images, out)`, when given (export.student: needs torch), trains the learned
    scorer on all references, writes its graph into `out` and returns its StudentSpec.
    `target_false_reject` (default: what the state was calibrated for, else TARGET_FALSE_REJECT) is the
    false-reject rate the threshold aims at.
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
                                target_false_reject=target_false_reject)
        else:
            from edge.scoring.tiling import build_tiled_state

            state = build_tiled_state(pack, all_images, tiling, extractor, seed=seed, references=all_names,
                                      quiet=quiet)
        state.info["skipped"] = skipped
        engine_calibration.stamp(state, extractor.backend)  # the threshold holds for these numerics only
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
