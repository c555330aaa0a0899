"""Background masking (edge.scoring.foreground) on and off, side by side in one run.

    python bench/foreground_ablation.py --pack packs/default [--lines 1-8] [--shots 1] [--hazelnut ../shared/data/hazelnut_toy]

For each synthetic line seed: one station enrolled from the line's first good part(s) with the head's
background masking off and on (the same references), then the line's next 80 parts (half defective)
scored by both: false-reject and miss rate at the automatic threshold. With --hazelnut: the one good
hazelnut enrolled both ways, each defective image's score over the threshold and the pixel AUROC on its
mask, and a picture (frame, map without, map with masking) written to --image.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge.evaluation import metrics  # noqa: E402
from edge.evaluation.dataset import open_dataset, read_mask  # noqa: E402
from edge.inference.features import FeatureExtractor  # noqa: E402
from edge.inference.preprocess import read_image  # noqa: E402
from edge.line.synthetic import SyntheticLine  # noqa: E402
from edge.pack import load_pack  # noqa: E402
from edge.scoring.factory import build_scorer  # noqa: E402
from edge.station.enrollment import build_state  # noqa: E402

MODES = ("off", "on")


def seeds(text: str) -> list[int]:
    a, _, b = text.partition("-")
    return list(range(int(a), int(b or a) + 1))


def lines(pack, extractor, line_seeds: list[int], shots: int) -> None:
    totals = {m: np.zeros(4, int) for m in MODES}
    print("| line seed | false-reject off | false-reject on | miss off | miss on |\n|---|---|---|---|---|")
    for seed in line_seeds:
        line = SyntheticLine(seed=seed, defect_rate=0.5)
        parts = list(line.parts(80, start=shots))
        row = {}
        for mode in MODES:
            state = build_state(pack, line.good(shots), extractor, seed=0, quiet=True, foreground=mode)
            results = build_scorer(pack, state, extractor=extractor).score([p.image for p in parts])
            good = [r.anomalous for r, p in zip(results, parts) if p.defect is None]
            bad = [not r.anomalous for r, p in zip(results, parts) if p.defect is not None]
            row[mode] = (sum(good), len(good), sum(bad), len(bad))
            totals[mode] += row[mode]
        print(f"| {seed} | {row['off'][0]}/{row['off'][1]} | {row['on'][0]}/{row['on'][1]} | "
              f"{row['off'][2]}/{row['off'][3]} | {row['on'][2]}/{row['on'][3]} |", flush=True)
    for mode in MODES:
        fr, ng, miss, nd = totals[mode]
        print(f"masking {mode}: false-reject {fr / ng:.3f} ({fr}/{ng}), miss rate {miss / nd:.3f} ({miss}/{nd}), "
              f"balanced accuracy {1 - (fr / ng + miss / nd) / 2:.3f}")


def hazelnut(pack, extractor, folder: str, image: str | None) -> None:
    category = open_dataset(folder)
    ref = [read_image(p) for p in category.train_good[:1]]
    tests = [(img, read_mask(s, img.shape[:2])) for s in category.test if s.anomalous for img in [read_image(s.path)]]
    rows, panels, top = [], [], []  # top: each image's map maximum without masking (both maps' colour scale)
    for mode in MODES:
        state = build_state(pack, ref, extractor, seed=0, quiet=True, foreground=mode)
        scorer = build_scorer(pack, state, extractor=extractor)
        for i, (img, mask) in enumerate(tests):
            r = scorer.score_one(img)
            m = r.map_at_frame()
            rows.append((mode, i, r.score / r.threshold, metrics.pixel_auroc(m[None], mask[None])))
            if mode == "off":
                panels.append([img])
            if mode == "off":
                top.append(float(m.max()))
            heat = cv2.applyColorMap(np.clip(255 * m / max(1e-6, top[i]), 0, 255).astype(np.uint8), cv2.COLORMAP_JET)
            panels[i].append(cv2.addWeighted(img, 0.5, heat, 0.5, 0))
    print("| masking | image | score / threshold | pixel AUROC |\n|---|---|---|---|")
    for mode, i, ratio, pix in rows:
        print(f"| {mode} | {i} | {ratio:.2f} | {pix:.3f} |")
    if image:
        Path(image).parent.mkdir(parents=True, exist_ok=True)
        strip = np.vstack([np.hstack([cv2.resize(p, (256, 256)) for p in row]) for row in panels])
        cv2.imwrite(image, strip)
        print(f"picture (frame | map, masking off | map, masking on; colour scale 0 to the unmasked map's maximum): {image}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pack", default="packs/default")
    ap.add_argument("--lines", default="1-8", help="synthetic line seeds, e.g. 1-8")
    ap.add_argument("--shots", type=int, default=1)
    ap.add_argument("--hazelnut", help="an MVTec-layout folder with one good train image (hazelnut_toy)")
    ap.add_argument("--image", default="out/foreground-hazelnut.png",
                    help="where the picture goes (it shows the dataset's photos: keep it out of the project)")
    args = ap.parse_args()
    pack = load_pack(args.pack)
    extractor = FeatureExtractor(pack)
    lines(pack, extractor, seeds(args.lines), args.shots)
    if args.hazelnut:
        hazelnut(pack, extractor, args.hazelnut, args.image)


if __name__ == "__main__":
    main()
