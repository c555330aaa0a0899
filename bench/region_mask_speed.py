"""How long the decide stage's region extraction takes per map, on the synthetic line's own maps.

    python bench/region_mask_speed.py --pack packs/default [--parts 80] [--references 16]

Enrolls `--references` synthetic good parts, scores `--parts` parts of SyntheticLine(seed=0,
defect_rate=0.5) and times `edge.scoring.decide.region_mask` on each map (20 repeats), split by verdict.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge.inference.features import FeatureExtractor  # noqa: E402
from edge.line.synthetic import SyntheticLine  # noqa: E402
from edge.pack import load_pack  # noqa: E402
from edge.scoring.decide import region_mask  # noqa: E402
from edge.scoring.factory import build_scorer  # noqa: E402
from edge.station.enrollment import build_state  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pack", default="packs/default")
    ap.add_argument("--parts", type=int, default=80)
    ap.add_argument("--references", type=int, default=16)
    args = ap.parse_args()
    pack = load_pack(args.pack)
    state = build_state(pack, SyntheticLine(seed=1).good(args.references), FeatureExtractor(pack), seed=0, quiet=True)
    scorer = build_scorer(pack, state)
    results = [scorer.score_one(p.image) for p in SyntheticLine(seed=0, defect_rate=0.5).parts(args.parts)]
    for verdict in ("anomalous", "normal"):
        chosen = [r for r in results if r.verdict == verdict]
        if not chosen:
            continue
        t0 = time.perf_counter()
        for _ in range(20):
            for r in chosen:
                region_mask(r.anomaly_map, r.score, r.threshold)
        ms = (time.perf_counter() - t0) * 1000 / (20 * len(chosen))
        print(f"{verdict}: {len(chosen)} maps of {chosen[0].anomaly_map.shape}, region_mask {ms:.2f} ms per map")
    return 0


if __name__ == "__main__":
    sys.exit(main())
