"""The station graph (edge.scoring.station_graph, one ONNX graph from pixels to map and score) against the
NumPy path (encoder in ONNX Runtime, then edge.scoring.bank search and OpenCV maps) on the same bank and
frames, side by side in one run: frames/s at batch 1 and 8, interleaved rounds so that a noisy
machine slows both alike, and the largest map and score differences.

    python bench/bench_station_graph.py --pack packs/default [--references 32] [--frames 64] [--rounds 5]
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_scoring import cpu_name  # noqa: E402
from edge.pack import load_pack  # noqa: E402
from edge.inference.features import FeatureExtractor  # noqa: E402
from edge.scoring.scorer import Scorer  # noqa: E402
from edge.station.enrollment import build_state  # noqa: E402
from edge.scoring.station_graph import StationGraphScorer  # noqa: E402
from edge.line.synthetic import SyntheticLine  # noqa: E402


def fps(scorer, frames, batch: int) -> float:
    t0 = time.perf_counter()
    n = 0
    for i in range(0, len(frames) - batch + 1, batch):
        scorer.score(frames[i:i + batch])
        n += batch
    return n / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pack", default="packs/default")
    ap.add_argument("--references", type=int, default=32)
    ap.add_argument("--frames", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    pack = load_pack(args.pack)
    line = SyntheticLine(seed=1)
    extractor = FeatureExtractor(pack)
    state = build_state(pack, line.good(args.references), extractor, seed=0, quiet=True, few_shot=False)
    scorers = {"numpy path": Scorer(pack, state.bank, state.calibration.threshold, extractor),
               "station graph": StationGraphScorer(pack, state.bank, state.calibration.threshold)}
    frames = [np.ascontiguousarray(p.image[:pack.input.height, :pack.input.width]) for p in line.parts(args.frames)]
    ref = scorers["numpy path"]
    ref_maps = ref.anomaly_maps(extractor.patch_features(frames[:16]))
    maps, scores = scorers["station graph"].maps_and_scores(frames[:16])
    ref_scores = np.array([r.score for r in ref.score(frames[:16])])
    for s in scorers.values():
        for b in (1, 8):
            fps(s, frames[:16], b)  # warm-up
    runs = {(name, b): [] for name in scorers for b in (1, 8)}
    for _ in range(args.rounds):
        for b in (1, 8):
            for name, s in scorers.items():
                runs[(name, b)].append(fps(s, frames, b))
    print(f"command: python bench/bench_station_graph.py --pack {args.pack} --references {args.references} "
          f"--frames {args.frames} --rounds {args.rounds}")
    print(f"date: {dt.date.today()}  machine: {cpu_name()}, {os.cpu_count()} cores, bank {len(state.bank)} x "
          f"{state.bank.features.shape[1]}, load average (1 min) at the end {os.getloadavg()[0]:.2f}")
    print(f"max abs difference, station graph vs NumPy path: maps {np.abs(maps - ref_maps).max():.2e} "
          f"(map max {ref_maps.max():.2f}), image scores {np.abs(scores - ref_scores).max():.2e}")
    print("\n| path | batch | frames/s (median of rounds) | min | max |\n|---|---|---|---|---|")
    for (name, b), v in runs.items():
        print(f"| {name} | {b} | {statistics.median(v):.1f} | {min(v):.1f} | {max(v):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
