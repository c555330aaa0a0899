"""Which scorer settings, measured: extract a pack's features for an MVTec-layout set once, then score
the test split under variants of bank size, PCA projection, map smoothing and image-score fraction.

    python bench/ablation.py --pack packs/default --data ../shared/data/magnetic_tile --cache out/ablation

Full-shot only (every train/good image enrolled); the bank is always a greedy coreset of the same
patches. Prints one markdown row per variant: image AUROC, pixel AUROC, oracle balanced accuracy.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge.evaluation import metrics  # noqa: E402
from edge.evaluation.dataset import open_mvtec, read_mask  # noqa: E402
from edge.scoring.decide import image_score  # noqa: E402
from edge.pack import load_pack  # noqa: E402
from edge.inference.preprocess import read_image  # noqa: E402
from edge.inference.features import FeatureExtractor  # noqa: E402
from edge.scoring.scorer import distances_to_maps  # noqa: E402
from edge.station.reference_banks import build_bank  # noqa: E402

STEP = 4  # pixel metrics on every 4th row/column


def cached_features(pack, category, cache: Path):
    path = cache / f"{category.root.name}-{pack.model_id}-{pack.encoder_sha256[:12]}.npz"
    if path.is_file():
        with np.load(path) as z:
            return z["train"].astype(np.float32), z["test"].astype(np.float32)
    ex = FeatureExtractor(pack)
    with tqdm(total=len(category.train_good) + len(category.test), desc="features", unit="img") as bar:
        train = ex.patch_features_batched([read_image(p) for p in category.train_good], progress=bar.update)
        test = ex.patch_features_batched([read_image(s.path) for s in category.test], progress=bar.update)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, train=train.astype(np.float16), test=test.astype(np.float16))
    return train, test


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pack", default="packs/default")
    ap.add_argument("--data", required=True)
    ap.add_argument("--cache", default="out/ablation")
    args = ap.parse_args()
    pack = load_pack(args.pack)
    category = open_mvtec(args.data)
    train, test = cached_features(pack, category, Path(args.cache))
    labels = np.array([s.anomalous for s in category.test], int)
    masks, shapes = [], []
    for s in category.test:
        img = read_image(s.path)
        masks.append(read_mask(s, img.shape[:2])[::STEP, ::STEP])
        shapes.append(img.shape[:2])
    grid = train.shape[1:3]
    size = (pack.input.height, pack.input.width)
    print(f"pack {pack.model_id}: {train.shape[-1]} channels ({', '.join(l.name for l in pack.encoder.layers)})")
    print("| bank | projection | sigma | top fraction | image AUROC | pixel AUROC | oracle bal. acc. |")
    print("|---|---|---|---|---|---|---|")
    base = pack.scorer
    for cap, dims in ((8192, None), (8192, 128), (16384, 128)):
        spec = base.model_copy(update={"max_bank_patches": cap, "projection_dim": dims})
        bank = build_bank(train, spec, seed=0, quiet=True)
        sqdist = bank.nearest_sqdist(test.reshape(-1, test.shape[-1]))
        for sigma in (4.0, 8.0):
            maps = distances_to_maps(sqdist, len(test), grid, size, sigma)
            full = [cv2.resize(m, (w, h))[::STEP, ::STEP] for m, (h, w) in zip(maps, shapes)]
            pix = metrics.pixel_auroc(full, masks)
            for top in (0.01, 0.05):
                scores = np.array([image_score(m, top) for m in maps])
                print(f"| {cap} | {dims or 'none'} | {sigma:g} | {top:g} | {metrics.auroc(scores, labels):.3f} | "
                      f"{pix:.3f} | {metrics.best_threshold(scores, labels)[1]:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
