"""Few-shot threshold diagnosis: per K and seed, the held-out good scores, the synthetic-defect scores,
the threshold few-shot enrollment chose and the test split's good / defective scores, as JSON.

The state is built as `eval` builds it (`edge.station.few_shot_enrollment.build_few_shot_state`); the test features are
extracted once per category and cached as float16 under --cache (bench/fewshot_ablation.py's
`test_features`, the same files), so re-running with other seeds or rules costs only enrollment.

    python bench/fewshot_threshold.py --pack P --data ../shared/data/magnetic_tile --shots 1 --seeds 0,1,2 --json out.json

`--score top-med` scores every map (held-out views, synthetic defects, test parts alike) as its top
fraction's mean minus the map's median, instead of the top fraction's mean (`top`, what stations run).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.fewshot_ablation import test_features  # noqa: E402
from edge.evaluation import metrics  # noqa: E402
from edge.evaluation.dataset import open_dataset  # noqa: E402
from edge.pack import load_pack  # noqa: E402
from edge.inference.preprocess import choose_shots, read_image  # noqa: E402
from edge.inference.features import FeatureExtractor  # noqa: E402
from edge.scoring.decide import image_score  # noqa: E402
from edge.station import few_shot_enrollment  # noqa: E402
from edge.station.few_shot_enrollment import build_few_shot_state, encode_frames, head_image_scores  # noqa: E402


def relative_image_score(anomaly_map: np.ndarray, top_fraction: float) -> float:
    """The top fraction's mean over the map's own median: a part's general level taken off."""
    return image_score(anomaly_map, top_fraction) - float(np.median(anomaly_map))


def test_scores(state, pack, extractor, category, cached: np.ndarray) -> np.ndarray:
    """The test split's image scores under `state`: from the cached features, or, where the state masks the
    background (parts on a plain background), from the test images painted with its mask, as stations score."""
    mask = state.head.foreground
    if mask is None:
        return np.concatenate([head_image_scores(state.head, state.bank, np.asarray(cached[b:b + 32], np.float32), pack)
                               for b in range(0, len(cached), 32)])
    scores = []
    for b in range(0, len(category.test), 32):
        frames = [read_image(s.path) for s in category.test[b:b + 32]]
        feats, weights = encode_frames(pack, extractor, frames, mask)
        scores.append(head_image_scores(state.head, state.bank, feats, pack, weights))
    return np.concatenate(scores)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("--pack", "--data", "--json"):
        ap.add_argument(name, required=True)
    ap.add_argument("--shots", default="1", help="comma list of K")
    ap.add_argument("--seeds", default="0,1,2", help="comma list of seeds")
    ap.add_argument("--cache", default="/tmp/fewshot-cache", help="test-feature cache folder")
    ap.add_argument("--score", choices=("top", "top-med"), default="top", help="image score of every map")
    args = ap.parse_args()
    if args.score == "top-med":  # enrollment's held-out, synthetic and the test scores all go through it
        few_shot_enrollment.image_score = relative_image_score
    pack = load_pack(args.pack)
    category = open_dataset(args.data)
    extractor = FeatureExtractor(pack)
    test, labels = test_features(pack, category, extractor, Path(args.cache))
    rows = []
    for k in map(int, args.shots.split(",")):
        for seed in map(int, args.seeds.split(",")):
            t0 = time.perf_counter()
            refs = [read_image(p) for p in choose_shots(category.train_good, k, seed)]
            state = build_few_shot_state(pack, refs, extractor, seed=seed, quiet=True)
            scores = test_scores(state, pack, extractor, category, test)
            cal = state.calibration
            tm = metrics.threshold_metrics(scores, labels, cal.threshold)
            _, oracle = metrics.best_threshold(scores, labels)
            row = dict(data=category.root.name, k=k, seed=seed, threshold=cal.threshold, method=cal.method,
                       source=cal.source, normal=cal.normal_scores, synthetic=cal.synthetic_scores,
                       good=scores[labels == 0].tolist(), defective=scores[labels == 1].tolist(),
                       image_auroc=metrics.auroc(scores, labels), balanced_accuracy=tm["balanced_accuracy"],
                       false_reject_rate=tm["false_reject_rate"], oracle_balanced_accuracy=float(oracle),
                       seconds=time.perf_counter() - t0)
            rows.append(row)
            q = lambda a, p: float(np.quantile(a, p))  # noqa: E731
            print(f"{row['data']} k={k} seed={seed} thr={cal.threshold:.2f} normal med/max {q(cal.normal_scores, .5):.2f}/"
                  f"{max(cal.normal_scores):.2f} synth med {q(cal.synthetic_scores, .5):.2f} | good med/p90 "
                  f"{q(row['good'], .5):.2f}/{q(row['good'], .9):.2f} defect p10/med {q(row['defective'], .1):.2f}/"
                  f"{q(row['defective'], .5):.2f} | auroc {row['image_auroc']:.3f} bacc {tm['balanced_accuracy']:.3f} "
                  f"(oracle {oracle:.3f}) frr {tm['false_reject_rate']:.3f} [{row['seconds']:.0f} s]", flush=True)
            Path(args.json).write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
