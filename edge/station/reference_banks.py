"""Banks from reference features, and the k-fold hold-out that calibrates a threshold on them.

`build_bank` subsamples reference patches into a coreset bank (PCA-projected as the pack says),
`sampled_bank` draws one at random for the few-shot head, `kfold_holdout_scores` is the one hold-out loop
of whole-frame and tiled enrollment (each reference scored against a bank built without it), and
`progress_bar` is enrollment's progress display. Owns no state and no files.
"""
from __future__ import annotations

import numpy as np
from tqdm import tqdm

from edge.errors import StateError
from edge.pack import ScorerSpec
from edge.scoring.bank import MemoryBank, greedy_coreset
from edge.scoring.fewshot import SubspaceHead

MAX_CALIBRATION_IMAGES = 120
POOL_FACTOR = 64
HOLDOUT_FOLDS = 5


def progress_bar(desc: str, total: int, quiet: bool, unit: str = "patch"):
    """A tqdm bar for enrollment's long steps (nothing shown when `quiet`)."""
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
        with progress_bar(f"{desc} {cap}/{len(rows)} patches", cap, quiet) as bar:
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


def kfold_holdout_scores(n: int, seed: int, score_fold, what: str = "calibration") -> np.ndarray:
    """Held-out scores of `n` references: dealt into at most HOLDOUT_FOLDS folds (in a seeded random
    order), at most MAX_CALIBRATION_IMAGES of them scored in all. `score_fold(fold, n_folds, rest, held)`
    scores the references at indices `held` against what it builds from `rest` (a boolean mask over the
    n, without the whole fold) and returns their scores."""
    if n < 2:
        raise StateError(f"{what} needs at least two reference images")
    order = np.random.default_rng(seed).permutation(n)
    n_folds = min(HOLDOUT_FOLDS, n)
    per_fold = max(1, MAX_CALIBRATION_IMAGES // n_folds)
    scores = []
    for f in range(n_folds):
        held = order[f::n_folds]
        rest = np.ones(n, bool)
        rest[held] = False
        scores.append(np.asarray(score_fold(f, n_folds, rest, np.sort(held[:per_fold]))))
    return np.concatenate(scores)
