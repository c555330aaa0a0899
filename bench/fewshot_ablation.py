"""Few-shot lever ablation on an MVTec-layout category: which scorer changes lift image AUROC at K shots.

Test features are extracted once (cached as float16 under --cache); every variant then enrolls K
references (seeds as eval draws them) and scores the same test split, image AUROC only (eval gives
the full metrics for the chosen configuration). Variants, one lever at a time:

  views      none | rot8 (flips/rot90) | rot8+shift | rot8+shift+photo (brightness/contrast jitter)
  features   raw | l2 (each patch vector L2-normalised) | centred (each image's mean feature subtracted)
  head       nn (nearest-neighbour bank) | pca (SubspaceAD residual, --variance of it) | nn+pca (each
             divided by its median on the references, summed) | ppca (probabilistic PCA: whitened
             in-subspace distance + residual / mean discarded variance) | mahal (full Mahalanobis,
             covariance shrunk by 1% of its mean eigenvalue) | pca-std (pca on channels scaled to unit
             variance on the references)
  top        image score = mean of the top fraction of the map (0.05 | 0.01)
  score      top | top-med (minus the map's median) | top/med (over it)

Views beyond edge.scoring.fewshot's modes, for this ablation only: flip4+shift (the 4 flips, no 90-degree turns:
a part with a direction, e.g. ground streaks), flip4+shift12 (and 8 larger shifts), rot8+shift+more
(rot8+shift, 8 larger shifts and 0.9x / 1.1x zoom).

    python bench/fewshot_ablation.py --pack P --data ../shared/data/magnetic_tile --shots 1,4,16 --seeds 0,1,2
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge.evaluation import metrics  # noqa: E402
from edge.evaluation.dataset import open_dataset  # noqa: E402
from edge.scoring.decide import image_score  # noqa: E402
from edge.scoring.fewshot import SHIFTS, SubspaceHead, few_shot_views, l2_normalise, shifted  # noqa: E402
from edge.pack import load_pack  # noqa: E402
from edge.inference.preprocess import choose_shots, read_image  # noqa: E402
from edge.inference.features import FeatureExtractor  # noqa: E402
from edge.scoring.scorer import grid_maps  # noqa: E402
from edge.station.reference_banks import build_bank  # noqa: E402


def test_features(pack, category, extractor, cache: Path):
    path = cache / f"{category.root.name}-test-{pack.encoder_sha256[:12]}.npy"
    labels = np.array([int(s.anomalous) for s in category.test])
    if path.is_file():
        return np.load(path, mmap_mode="r"), labels
    imgs = [read_image(s.path) for s in category.test]
    feats = extractor.patch_features_batched(imgs).astype(np.float16)
    cache.mkdir(parents=True, exist_ok=True)
    np.save(path, feats)
    return feats, labels


def image_scores_from_patch(patch: np.ndarray, pack, top: float, mode: str = "top") -> np.ndarray:
    """mode: top (mean of the top fraction) | top-med (minus the map's median) | top/med (over it)."""
    maps = grid_maps(patch.astype(np.float32), pack)
    tops = np.array([image_score(m, top) for m in maps])
    if mode == "top":
        return tops
    med = np.array([float(np.median(m)) for m in maps])
    if mode == "top-med":
        return tops - med
    if mode == "top/med":
        return tops / (med + 1e-9)
    raise SystemExit(f"unknown --scores mode {mode!r}")


LARGER_SHIFTS = ((0.08, 0.0), (-0.08, 0.0), (0.0, 0.08), (0.0, -0.08), (0.06, 0.06), (-0.06, -0.06),
                 (0.06, -0.06), (-0.06, 0.06))


def _zoom(image: np.ndarray, factor: float) -> np.ndarray:
    import cv2

    h, w = image.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), 0, factor)
    return cv2.warpAffine(image, m, (w, h), borderMode=cv2.BORDER_REFLECT)


def bench_views(image: np.ndarray, mode: str) -> list[np.ndarray]:
    """edge.scoring.fewshot's view modes plus the ablation-only ones (module docstring)."""
    import cv2

    flips = [image, cv2.flip(image, 1), cv2.flip(image, 0), cv2.flip(image, -1)]
    shifts = [shifted(image, dx, dy) for dx, dy in SHIFTS]
    larger = [shifted(image, dx, dy) for dx, dy in LARGER_SHIFTS]
    if mode == "flip4+shift":
        return flips + shifts
    if mode == "flip4+shift12":
        return flips + shifts + larger
    if mode == "rot8+shift+more":
        return few_shot_views(image, "rot8+shift") + larger + [_zoom(image, f) for f in (0.9, 1.1)]
    return few_shot_views(image, mode)


class GaussianHead:
    """ppca / mahal / pca-std heads over the references' patch rows (see the module docstring)."""

    def __init__(self, rows: np.ndarray, mode: str, variance: float):
        self.mode = mode
        self.scale = rows.std(0) + 1e-3 * rows.std(0).mean() if mode == "pca-std" else None
        x = rows / self.scale if self.scale is not None else rows
        self.mean = x.mean(0)
        xc = x - self.mean
        eigval, eigvec = np.linalg.eigh((xc.T @ xc).astype(np.float64) / (len(x) - 1))
        eigval, eigvec = eigval[::-1].clip(1e-9), eigvec[:, ::-1]
        k = min(int(np.searchsorted(np.cumsum(eigval) / eigval.sum(), variance) + 1), len(eigval) - 1)
        self.basis, self.eig = eigvec[:, :k].astype(np.float32), eigval[:k].astype(np.float32)
        self.all_basis, self.all_eig = eigvec.astype(np.float32), eigval.astype(np.float32)
        self.discarded = float(eigval[k:].mean())

    def __call__(self, q: np.ndarray) -> np.ndarray:
        x = (q / self.scale if self.scale is not None else q) - self.mean
        z = x @ self.basis
        residual = np.maximum((x * x).sum(1) - (z * z).sum(1), 0)
        if self.mode == "pca-std":
            return residual
        if self.mode == "ppca":
            return (z * z / self.eig).sum(1) + residual / self.discarded
        zz = x @ self.all_basis  # mahal
        return (zz * zz / (self.all_eig + 0.01 * self.all_eig.mean())).sum(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pack", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--shots", default="1,4,16")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--views", default="none,rot8,rot8+shift,rot8+shift+photo")
    ap.add_argument("--features", default="raw,l2")
    ap.add_argument("--heads", default="nn,pca,pca-layers,nn+pca")
    ap.add_argument("--tops", default="0.05,0.01")
    ap.add_argument("--scores", default="top", help="image score: top, top-med, top/med (comma list)")
    ap.add_argument("--variance", type=float, default=0.99, help="variance the subspace heads keep")
    ap.add_argument("--cache", default="/tmp/fewshot-cache")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    pack = load_pack(args.pack)
    category = open_dataset(args.data)
    extractor = FeatureExtractor(pack)
    t0 = time.perf_counter()
    test, labels = test_features(pack, category, extractor, Path(args.cache))
    print(f"test features {test.shape} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    n, h, w, c = test.shape
    rows = []
    for k, seed in itertools.product(map(int, args.shots.split(",")), map(int, args.seeds.split(","))):
        refs = [read_image(p) for p in choose_shots(category.train_good, k, seed)]
        for views in args.views.split(","):
            frames = [v for r in refs for v in bench_views(r, views)]
            ref_feats = extractor.patch_features_batched(frames)
            for feat_mode in args.features.split(","):
                rf = transform(ref_feats, feat_mode)
                flat = rf.reshape(-1, c)
                heads = args.heads.split(",")
                patch = {}
                if any("nn" in hd for hd in heads):
                    bank = build_bank(rf, pack.scorer, seed, quiet=True)
                    patch["nn"] = score_test(test, feat_mode, lambda q: np.sqrt(bank.nearest_sqdist(q)))
                if any(hd in ("pca", "nn+pca") for hd in heads):
                    head = SubspaceHead.fit(flat, variance=args.variance)
                    patch["pca"] = score_test(test, feat_mode, head.residual)
                for hd in set(heads) & {"ppca", "mahal", "pca-std"}:
                    patch[hd] = score_test(test, feat_mode, GaussianHead(flat.astype(np.float32), hd, args.variance))
                if "pca-layers" in heads:
                    layer_heads = LayerSubspaces.fit(rf, [layer.channels for layer in pack.encoder.layers])
                    patch["pca-layers"] = score_test(test, feat_mode, layer_heads.score)
                if "nn+pca" in heads:
                    nn_scale, pca_scale = reference_scales(rf, pack, seed)
                    patch["nn+pca"] = patch["nn"] / nn_scale + patch["pca"] / pca_scale
                for hd in heads:
                    for top, mode in itertools.product(map(float, args.tops.split(",")), args.scores.split(",")):
                        s = image_scores_from_patch(patch[hd], pack, top, mode)
                        auc = metrics.auroc(s, labels)
                        row = dict(k=k, seed=seed, views=views, features=feat_mode, head=hd, top=top,
                                   score=mode, variance=args.variance, image_auroc=auc, bank_frames=len(frames))
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    summarise(rows)


def transform(feats: np.ndarray, mode: str) -> np.ndarray:
    """raw | l2 (unit patch vectors) | centred (each image's mean patch feature subtracted)."""
    if mode == "l2":
        return l2_normalise(feats)
    if mode == "centred":
        return feats - feats.mean(axis=(1, 2), keepdims=True)
    return feats


def score_test(test, feat_mode, fn) -> np.ndarray:
    n, h, w, c = test.shape
    out = np.empty((n, h * w), np.float32)
    for b0 in range(0, n, 32):
        q = transform(np.asarray(test[b0:b0 + 32], np.float32), feat_mode).reshape(-1, c)
        out[b0:b0 + 32] = fn(q).reshape(-1, h * w)
    return out.reshape(n, h, w)


class LayerSubspaces:
    """One subspace per encoder layer's channel block; score = mean over layers of residual / its
    median on the references' own patches."""

    def __init__(self, bounds, heads, scales):
        self.bounds, self.heads, self.scales = bounds, heads, scales

    @classmethod
    def fit(cls, feats, channels):
        flat = feats.reshape(-1, feats.shape[-1])
        bounds = np.cumsum([0, *channels])
        heads, scales = [], []
        for a, b in zip(bounds[:-1], bounds[1:]):
            hd = SubspaceHead.fit(flat[:, a:b])
            heads.append(hd)
            scales.append(float(np.median(hd.residual(flat[::7, a:b]))) + 1e-9)
        return cls(bounds, heads, scales)

    def score(self, q):
        return sum(hd.residual(q[:, a:b]) / s for hd, s, a, b in
                   zip(self.heads, self.scales, self.bounds[:-1], self.bounds[1:])) / len(self.heads)


def reference_scales(ref_feats: np.ndarray, pack, seed: int) -> tuple[float, float]:
    """Median nn distance and subspace residual of one half of the references' patches against a
    bank / subspace of the other half (halves split by image, or by the top/bottom of one view)."""
    m = len(ref_feats)
    if m >= 2:
        a, b = ref_feats[: m // 2], ref_feats[m // 2:]
    else:
        hh = ref_feats.shape[1] // 2
        a, b = ref_feats[:, :hh], ref_feats[:, hh:]
    bank = build_bank(a, pack.scorer, seed, quiet=True)
    q = b.reshape(-1, b.shape[-1])
    return (float(np.median(np.sqrt(bank.nearest_sqdist(q)))),
            float(np.median(SubspaceHead.fit(a).residual(q))))


def summarise(rows: list[dict]) -> None:
    def key_of(r):
        return (r["k"], r["views"], r["features"], r["head"], r["top"], r.get("score", "top"))
    print("\n| K | views | features | head | top | score | image AUROC (mean over seeds) | seeds |\n|---|---|---|---|---|---|---|---|")
    for key in sorted({key_of(r) for r in rows}):
        vals = [r["image_auroc"] for r in rows if key_of(r) == key]
        print("| " + " | ".join(map(str, key)) + f" | {np.mean(vals):.3f} ± {np.std(vals):.3f} | {len(vals)} |")


if __name__ == "__main__":
    main()
