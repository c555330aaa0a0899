"""`anomaly-edge demo`: the synthetic line end to end on a pack.

Enrolls good synthetic parts (automatic threshold), scores a seeded stream of parts one frame at a
time, prints a line per part, writes heatmap overlays for flagged and missed parts, and ends with a
summary: parts, flagged, detection rate, false alarms, frames/s.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import cv2
import numpy as np

from edge.scoring import visual
from edge.pack import load_pack
from edge.scoring.factory import build_scorer
from edge.station.enrollment import build_state
from edge.line.synthetic import SyntheticLine


def run_demo(pack_dir: str | Path, out: str | Path, parts: int = 60, shots: int = 16, seed: int = 0) -> int:
    pack = load_pack(pack_dir)
    out = Path(out)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    line = SyntheticLine(seed=seed, defect_rate=0.25)
    print(f"pack {pack.model_id}; enrolling {shots} good synthetic parts ...", file=sys.stderr)
    state = build_state(pack, line.good(shots), seed=seed)
    state.save(out / "state")
    c = state.calibration
    print(f"bank {len(state.bank)} patches, automatic threshold {c.threshold:.3f} "
          f"(held-out normal scores: median {c.median:.3f}, robust sd {c.spread:.3f}, max {c.max:.3f})")
    scorer = build_scorer(pack, state)  # the few-shot head or the bank, as enrolled
    scorer.score_one(line.good(1)[0])  # warm-up: first ONNX Runtime call allocates
    counts = {"parts": 0, "defective": 0, "detected": 0, "false_alarms": 0, "located": 0}
    latencies = []
    t_start = time.perf_counter()
    print(f"{'part':12s} {'truth':14s} {'score':>8s} {'verdict':10s} {'regions':>7s} {'latency':>9s}")
    for part in line.parts(parts):
        r = scorer.score_one(part.image)
        latencies.append(r.latency_ms)
        counts["parts"] += 1
        truth = part.defect or "good"
        if part.defect:
            counts["defective"] += 1
            counts["detected"] += r.anomalous
            # Located: the predicted mask overlaps the true defect.
            counts["located"] += bool(r.anomalous and (r.mask_at_frame() & part.mask).any())
        else:
            counts["false_alarms"] += r.anomalous
        mark = "" if r.anomalous == bool(part.defect) else "  <- " + ("missed" if part.defect else "false alarm")
        print(f"{part.part_id:12s} {truth:14s} {r.score:8.3f} {r.verdict.upper():10s} {len(r.regions):7d} "
              f"{r.latency_ms:7.1f} ms{mark}")
        if r.anomalous or part.defect:
            overlay = visual.result_overlay(part.image, r, truth=part.mask if part.defect else None)
            for reg in r.regions:
                cv2.rectangle(overlay, (reg.x, reg.y), (reg.x + reg.width, reg.y + reg.height), (255, 255, 255), 1)
            cv2.imwrite(str(out / "overlays" / f"{part.part_id}_{truth}.png"), overlay)
    wall = time.perf_counter() - t_start
    good = counts["parts"] - counts["defective"]
    detection = counts["detected"] / counts["defective"] if counts["defective"] else float("nan")
    print()
    print(f"parts {counts['parts']}  flagged {counts['detected'] + counts['false_alarms']}  "
          f"defective {counts['defective']}  detected {counts['detected']} (rate {detection:.2f}, "
          f"located {counts['located']})  false alarms {counts['false_alarms']}/{good}")
    print(f"scoring {len(latencies) / (sum(latencies) / 1000):.1f} frames/s (p50 {np.percentile(latencies, 50):.1f} ms, "
          f"p99 {np.percentile(latencies, 99):.1f} ms); wall {counts['parts'] / wall:.1f} parts/s incl. printing "
          f"and overlays")
    print(f"overlays in {out / 'overlays'}, station state in {out / 'state'}")
    return 0
