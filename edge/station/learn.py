"""Learn mode: a station's bank and threshold from unlabeled production parts, assuming only that most of
them are good.

A line integrator often has no curated good parts for a new product, but has the first N parts off the
line. Each of them is scored against all the others by mutual scoring (the idea MuSc uses zero-shot):
every patch of part i is matched with its nearest patch in each other part j, and its score is a low
quantile of those N-1 distances, not the minimum, so a defect that a few other parts share (the same
scratch on two parts) still stands out, while normal texture finds close matches in most parts. Parts
whose score is a robust outlier (median + z * MAD-sigma of all parts' scores) are set aside as suspect;
the rest are enrolled as good references (`edge.station.enrollment.enroll`: bank and automatic threshold from their
own held-out scores). What was set aside is reported with its scores, so a person can look at it.
`refine` does the same for a station that already has a state from a few good references: the kept
parts join those references (one good sample to start, the line's own parts to sharpen it).

    result = learn(pack, paths, "station/state")
    result.kept, result.suspects, result.scores, result.state.calibration.threshold
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge.scoring.decide import image_score
from edge.errors import StateError
from edge.pack import Pack
from edge.inference.preprocess import read_images
from edge.inference.features import FeatureExtractor
from edge.scoring.scorer import pack_maps

MIN_PARTS = 8
PATCH_QUANTILE = 0.3     # of a patch's distances to the other parts
SUSPECT_Z = 3.0          # robust z-score above which a part is set aside
PROJECTION_DIMS = 64     # mutual scoring compares patches in their top principal components


@dataclass
class LearnResult:
    state: object                       # the enrolled edge.station.state.StationState
    kept: list[Path]
    suspects: list[Path]
    scores: dict[str, float]            # file name -> mutual score
    cutoff: float
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {"parts": len(self.kept) + len(self.suspects), "kept": len(self.kept),
                "suspects": [{"file": p.name, "score": round(self.scores[p.name], 4)} for p in self.suspects],
                "cutoff": round(self.cutoff, 4), "skipped": self.skipped}


def mutual_scores(pack: Pack, features: np.ndarray, quantile: float = PATCH_QUANTILE,
                  dims: int = PROJECTION_DIMS, seed: int = 0) -> np.ndarray:
    """N x h x w x C patch features -> each part's image score against all the other parts."""
    n, h, w, c = features.shape
    if n < 3:
        raise StateError(f"mutual scoring needs at least 3 parts, got {n}")
    flat = features.reshape(n, h * w, c).astype(np.float32)
    sample = flat.reshape(-1, c)
    rows = np.random.default_rng(seed).choice(len(sample), min(len(sample), 20_000), replace=False)
    mean = sample[rows].mean(0)
    k = min(dims, c)
    _, _, vt = np.linalg.svd(sample[rows] - mean, full_matrices=False)
    x = (flat - mean) @ vt[:k].T                                  # n x P x k
    norms = (x * x).sum(-1)                                       # n x P
    scores = np.empty(n)
    for i in range(n):
        # nearest squared distance of each of part i's patches within each other part: P x n
        nearest = np.empty((h * w, n), np.float32)
        for j in range(n):
            if j == i:
                nearest[:, j] = np.inf
                continue
            d = norms[i][:, None] + norms[j][None, :] - 2.0 * (x[i] @ x[j].T)
            nearest[:, j] = np.maximum(d.min(1), 0.0)
        others = np.delete(nearest, i, axis=1)
        patch = np.quantile(others, quantile, axis=1)
        m = pack_maps(patch.astype(np.float32), 1, (h, w), pack)[0]
        scores[i] = image_score(m, pack.scorer.top_fraction)
    return scores


def suspect_cutoff(scores: np.ndarray, z: float = SUSPECT_Z) -> float:
    """median + z * 1.4826 * MAD: robust to the suspects themselves."""
    med = float(np.median(scores))
    mad = float(np.median(np.abs(scores - med))) * 1.4826
    return med + z * max(mad, 1e-6 * max(abs(med), 1e-6))


@dataclass
class Screening:
    """Unlabeled parts after mutual scoring: which look usual (kept) and which were set aside."""
    kept: list[Path]
    suspects: list[Path]
    scores: dict[str, float]            # file name -> mutual score
    cutoff: float
    skipped: list[str]


def screen(pack: Pack, parts: list[Path], seed: int = 0, z: float = SUSPECT_Z,
           extractor: FeatureExtractor | None = None, log=print) -> Screening:
    """Mutual scoring of unlabeled parts: the robust outliers among them are set aside as suspect."""
    images, paths, skipped = read_images(list(parts), log)
    if len(images) < MIN_PARTS:
        raise StateError(f"learn mode needs at least {MIN_PARTS} readable parts to tell the usual from the unusual, "
                         f"got {len(images)}" + (f" ({len(skipped)} unreadable)" if skipped else ""))
    extractor = extractor or FeatureExtractor(pack)
    feats = extractor.patch_features_batched(images)
    log(f"mutual scoring of {len(images)} parts")
    scores = mutual_scores(pack, feats, seed=seed)
    cutoff = suspect_cutoff(scores, z)
    suspect = scores > cutoff
    if suspect.sum() > len(images) // 2:
        raise StateError(f"learn mode: {int(suspect.sum())} of {len(images)} parts look unusual; it assumes most "
                         "parts are good. Enroll known good parts instead")
    kept = [p for p, s in zip(paths, suspect) if not s]
    suspects = [p for p, s in zip(paths, suspect) if s]
    log(f"set aside {len(suspects)} of {len(images)} parts as suspect (mutual score above {cutoff:.4f}); "
        f"enrolling the other {len(kept)}")
    return Screening(kept, suspects, {p.name: float(s) for p, s in zip(paths, scores)}, cutoff, skipped)


def learn(pack: Pack, parts: list[Path], out: str | Path, seed: int = 0, z: float = SUSPECT_Z,
          extractor: FeatureExtractor | None = None, quiet: bool = False, log=print, **enroll_kw) -> LearnResult:
    """Enroll the unlabeled `parts` into the state folder `out`, setting suspects aside."""
    out = Path(out)
    if (out / "state.yaml").is_file():
        raise StateError(f"{out}: already holds a station state; learn mode builds a new one (refine adds "
                         "unlabeled parts to it: anomaly-edge learn --refine; enroll adds confirmed good parts)")
    return _enroll_screened(pack, parts, out, seed, z, extractor, quiet, log, enroll_kw, "learn", {})


def refine(pack: Pack, parts: list[Path], state_dir: str | Path, seed: int = 0, z: float = SUSPECT_Z,
           extractor: FeatureExtractor | None = None, quiet: bool = False, log=print, **enroll_kw) -> LearnResult:
    """Sharpen a state enrolled from a few good references with unlabeled production parts: the parts that
    mutual scoring does not set aside join the references (which all stay), and the head and the
    automatic threshold are rebuilt from all of them. The state records it under info["refined"]."""
    from edge.station.state import load_state

    state_dir = Path(state_dir)
    if not (state_dir / "state.yaml").is_file():
        raise StateError(f"{state_dir}: no station state to refine; enroll a good part first, or learn a new one")
    before = load_state(state_dir)
    return _enroll_screened(pack, parts, state_dir, seed, z, extractor, quiet, log, enroll_kw, "refined",
                            {"references_before": len(before.references),
                             "threshold_before": float(before.calibration.threshold)})


def _enroll_screened(pack, parts, out: Path, seed, z, extractor, quiet, log, enroll_kw, key: str,
                     record: dict) -> LearnResult:
    """Screen `parts`, enroll the kept ones into `out` (new or extended) and record how under info[key]."""
    from edge.station.enrollment import enroll

    extractor = extractor or FeatureExtractor(pack)
    found = screen(pack, parts, seed, z, extractor, log)
    state = enroll(pack, found.kept, out, seed=seed, extractor=extractor, quiet=quiet, log=log, **enroll_kw)
    state.info[key] = {"parts": len(found.kept) + len(found.suspects), "kept": len(found.kept),
                       "suspects": [p.name for p in found.suspects], "cutoff": found.cutoff, **record}
    state.save(out)
    return LearnResult(state, found.kept, found.suspects, found.scores, found.cutoff, found.skipped)
