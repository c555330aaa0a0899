"""Quality of the reported regions (issue 17): are the boxes on the defect, how large are they against it,
how many touch the frame border, and the pixel F1/IoU of the mask. The rule of the code under test
(edge.scoring.decide.decide) is put beside the two before it (every connected component of `map >= the image
threshold` is a region; those components cut at half height, without the split into basins) on the same maps,
so the image scores and verdicts are the same in every column.

    python bench/region_quality.py PACK --state STATE [--line N] [--data MVTEC_DIR --shots K --every E]

--state: a synthetic-line state (`anomaly-edge enroll --pack PACK --synthetic 16 --out STATE`, as `make run`);
its line is SyntheticLine(seed=0, defect_rate=0.2), N parts. --data: an MVTec-layout category (ground_truth/
masks), enrolled here on K good train images (seed 0), every E-th test image scored.

A region is "on the defect" when its box holds a truth pixel; a true defect (8-connected component of the
truth mask) is found when a region's box holds one of its pixels; box IoU and size are those of the region
box on each found defect with the best IoU against that defect's own box."""
from __future__ import annotations

import argparse
import sys

import cv2
import numpy as np

from edge.evaluation.dataset import open_dataset, read_mask
from edge.inference.preprocess import choose_shots, read_image
from edge.line.synthetic import SyntheticLine
from edge.pack import load_pack
from edge.scoring.decide import REGION_HALF_HEIGHT, decide, find_regions
from edge.scoring.factory import build_scorer
from edge.station.enrollment import build_state
from edge.station.state import load_state


def threshold_components(anomaly_map, score, threshold, frame_size):
    """The old rule: the mask is the map at or above the image threshold, each component a region."""
    mask = anomaly_map >= threshold
    return mask, (find_regions(anomaly_map, mask, frame_size) if score >= threshold else [])


def half_height_components(anomaly_map, score, threshold, frame_size):
    """The rule before basins (commit 32a0bb3): components of `map >= threshold` whose peak reaches the image
    score, each cut half-way between the map's median and its peak; no split where the map dips."""
    n, labels = cv2.connectedComponents((anomaly_map >= threshold).astype(np.uint8), connectivity=8)
    peaks = np.full(n, -np.inf)
    np.maximum.at(peaks, labels.ravel(), anomaly_map.ravel().astype(np.float64))
    peaks[0] = -np.inf
    background = float(np.median(anomaly_map))
    level = np.maximum(threshold, background + REGION_HALF_HEIGHT * (peaks - background))
    mask = (peaks >= min(score, peaks.max()))[labels] & (anomaly_map >= level[labels])
    return mask, (find_regions(anomaly_map, mask, frame_size) if score >= threshold else [])


def current_rule(anomaly_map, score, threshold, frame_size):
    r = decide(anomaly_map, score, threshold, frame_size)
    return r.mask, r.regions


RULES = {"map >= threshold": threshold_components, "half-height components": half_height_components,
         "basins (decide)": current_rule}


def scored(scorer, images, truths):
    """(map, score, threshold, frame_size, truth) for each image, scored in small batches."""
    out = []
    for i in range(0, len(images), 8):
        for r, truth in zip(scorer.score(images[i:i + 8]), truths[i:i + 8]):
            out.append((r.anomaly_map, r.score, r.threshold, r.frame_size, truth, r.anomalous))
    return out


def box_iou(a, b):
    ax0, ay0, ax1, ay1 = a
    bx0, by0, bx1, by1 = b
    iw, ih = max(0, min(ax1, bx1) - max(ax0, bx0)), max(0, min(ay1, by1) - max(ay0, by0))
    inter = iw * ih
    return inter / ((ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter)


MID_PART_PX = 16  # a defect at least this far (frame pixels) from every edge of the frame is mid-part


def measure(records, rule) -> dict:
    regions_n = on_defect = border = border_off = flagged = mid_n = mid_border = 0
    defects = found = 0
    ious, ratios, linear = [], [], []
    tp = fp = fn = 0
    for amap, score, threshold, (h, w), truth, anomalous in records:
        mask, regions = rule(amap, score, threshold, (h, w))
        full = cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
        tp += int(np.count_nonzero(full & truth)); fp += int(np.count_nonzero(full & ~truth))
        fn += int(np.count_nonzero(~full & truth))
        flagged += anomalous
        boxes = [(g.x, g.y, g.x + g.width, g.y + g.height) for g in regions]
        ys, xs = np.nonzero(truth)
        mid_part = truth.any() and min(xs.min(), ys.min(), w - 1 - xs.max(), h - 1 - ys.max()) >= MID_PART_PX
        for x0, y0, x1, y1 in boxes:
            regions_n += 1
            hit = truth[y0:y1, x0:x1].any()
            edge = x0 <= 0 or y0 <= 0 or x1 >= w or y1 >= h
            on_defect += hit; border += edge; border_off += edge and not hit
            mid_n += mid_part; mid_border += mid_part and edge
        n, labels, stats, _ = cv2.connectedComponentsWithStats(truth.astype(np.uint8), connectivity=8)
        for i in range(1, n):
            defects += 1
            tx, ty, tw, th_, _ = stats[i]
            own = labels == i
            hits = [b for b in boxes if own[b[1]:b[3], b[0]:b[2]].any()]
            if not hits:
                continue
            found += 1
            tbox = (tx, ty, tx + tw, ty + th_)
            best = max(hits, key=lambda b: box_iou(b, tbox))
            ious.append(box_iou(best, tbox))
            ratios.append((best[2] - best[0]) * (best[3] - best[1]) / (tw * th_))
            linear.append(max((best[2] - best[0]) / tw, (best[3] - best[1]) / th_))
    return {
        "flagged images": flagged,
        "regions per flagged image": regions_n / max(flagged, 1),
        "region precision (box on a defect)": on_defect / max(regions_n, 1),
        "region recall (defects found)": found / max(defects, 1),
        "mean box IoU (found defects)": float(np.mean(ious)) if ious else float("nan"),
        "median box area / true box area": float(np.median(ratios)) if ratios else float("nan"),
        "median of box side / true side (the larger of x, y)": float(np.median(linear)) if linear else float("nan"),
        "found defects with box sides <= 2x true": float(np.mean(np.asarray(linear) <= 2)) if linear else float("nan"),
        "found defects with box area <= 2x true": float(np.mean(np.asarray(ratios) <= 2)) if ratios else float("nan"),
        "regions touching the border": f"{border} of {regions_n}",
        "off-defect regions on the border": border_off,
        f"regions of defects >= {MID_PART_PX} px from the edge touching it": f"{mid_border} of {mid_n}",
        "pixel F1 of the mask": 2 * tp / max(2 * tp + fp + fn, 1),
        "pixel IoU of the mask": tp / max(tp + fp + fn, 1),
    }


def table(title: str, records) -> str:
    cols = {name: measure(records, rule) for name, rule in RULES.items()}
    names = list(cols)
    lines = [f"\n{title}: {len(records)} images, {sum(t.any() for *_, t, _ in records)} with a defect",
             "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key in cols[names[0]]:
        vals = [cols[n][key] for n in names]
        lines.append(f"| {key} | " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in vals) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pack")
    ap.add_argument("--state", help="synthetic-line state folder")
    ap.add_argument("--line", type=int, default=300, help="parts of SyntheticLine(seed=0, defect_rate=0.2)")
    ap.add_argument("--data", help="MVTec-layout category with ground_truth/ masks")
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--every", type=int, default=1, help="score every E-th test image")
    args = ap.parse_args(argv)
    pack = load_pack(args.pack)
    if args.state:
        scorer = build_scorer(pack, load_state(args.state, pack), None)
        parts = list(SyntheticLine(seed=0, defect_rate=0.2).parts(args.line))
        print(table(f"synthetic line (threshold {scorer.threshold:.4f})",
                    scored(scorer, [p.image for p in parts], [p.mask for p in parts])))
    if args.data:
        category = open_dataset(args.data)
        train = choose_shots(category.train_good, args.shots, 0)  # the shots of `anomaly-edge eval --seed 0`
        scorer = build_scorer(pack, build_state(pack, [read_image(p) for p in train], seed=0, quiet=True), None)
        samples = category.test[::args.every]
        images = [read_image(s.path) for s in samples]
        truths = [read_mask(s, im.shape[:2]) for s, im in zip(samples, images)]
        print(table(f"{args.data} ({args.shots} shots, every {args.every}. test image, threshold "
                    f"{scorer.threshold:.4f})", scored(scorer, images, truths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
