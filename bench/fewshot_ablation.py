"""Few-shot lever ablation on an MVTec-layout category: which scorer changes lift image AUROC at K shots.

Test features are extracted once (cached as float16 under --cache); every variant then enrolls K
references (seeds as eval draws them) and scores the same test split, image AUROC only (eval gives
the full metrics for the chosen configuration). Variants, one lever at a time:

  views      none | rot8 (flips/rot90) | rot8+shift | rot8+shift+photo (brightness/contrast jitter)
  features   raw | l2 (each patch vector L2-normalised) | centred (each image's mean feature subtracted)
  head       nn (nearest-neighbour bank) | pca (SubspaceAD residual, 99% variance) | nn+pca (each
             divided by its median on the references, summed)
  top        image score = mean of the top fraction of the map (0.05 | 0.01)

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

from edge import metrics  # noqa: E402
from edge.dataset import open_dataset  # noqa: E402
from edge.decide import image_score  # noqa: E402
from edge.fewshot import SubspaceHead, few_shot_views, l2_normalise  # noqa: E402
from edge.pack import load_pack  # noqa: E402
from edge.preprocess import choose_shots, read_image  # noqa: E402
from edge.scorer import FeatureExtractor, grid_maps  # noqa: E402
from edge.state import build_bank  # noqa: E402


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


def image_scores_from_patch(patch: np.ndarray, pack, top: float) -> np.ndarray:
    maps = grid_maps(patch.astype(np.float32), pack)
    return np.array([image_score(m, top) for m in maps])


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
            frames = [v for r in refs for v in few_shot_views(r, views)]
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
                    head = SubspaceHead.fit(flat)
                    patch["pca"] = score_test(test, feat_mode, head.residual)
                if "pca-layers" in heads:
                    layer_heads = LayerSubspaces.fit(rf, [layer.channels for layer in pack.encoder.layers])
                    patch["pca-layers"] = score_test(test, feat_mode, layer_heads.score)
                if "nn+pca" in heads:
                    nn_scale, pca_scale = reference_scales(rf, pack, seed)
                    patch["nn+pca"] = patch["nn"] / nn_scale + patch["pca"] / pca_scale
                for hd in heads:
                    for top in map(float, args.tops.split(",")):
                        s = image_scores_from_patch(patch[hd], pack, top)
                        auc = metrics.auroc(s, labels)
                        row = dict(k=k, seed=seed, views=views, features=feat_mode, head=hd, top=top,
                                   image_auroc=auc, bank_frames=len(frames))
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
    keys = sorted({(r["k"], r["views"], r["features"], r["head"], r["top"]) for r in rows})
    print("\n| K | views | features | head | top | image AUROC (mean over seeds) | seeds |\n|---|---|---|---|---|---|---|")
    for key in keys:
        vals = [r["image_auroc"] for r in rows if (r["k"], r["views"], r["features"], r["head"], r["top"]) == key]
        print(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {key[4]} | {np.mean(vals):.3f} ± {np.std(vals):.3f} | {len(vals)} |")


if __name__ == "__main__":
    main()
