"""What refining a station from the line costs the line: score latency while the refine job runs.

A station's score thread and its maintenance thread share the CPU. This runs the same two things in one
process: a thread scoring synthetic frames one at a time with a one-part state (as the score thread
does), and, after a quiet stretch, `edge.station.learn.refine` on N kept parts (as the maintenance thread
does when learn.refine has collected them). It prints the refine job's seconds and the score latency
(p50 / p99, frames/s) before, during and after it, as a markdown table for docs/benchmarks.md.

    python bench/bench_refine.py --pack packs/default --parts 50
"""
from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_scoring import cpu_name  # noqa: E402
from edge.line.synthetic import SyntheticLine  # noqa: E402
from edge.pack import load_pack  # noqa: E402
from edge.scoring.factory import build_scorer  # noqa: E402
from edge.station.enrollment import enroll  # noqa: E402
from edge.station.learn import refine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pack", required=True)
    ap.add_argument("--parts", type=int, default=50)
    ap.add_argument("--quiet-s", type=float, default=10.0, help="scoring alone before and after the job")
    args = ap.parse_args()
    pack = load_pack(args.pack)
    line = SyntheticLine(seed=7, defect_rate=0.1)
    work = Path(tempfile.mkdtemp(prefix="bench-refine."))
    (work / "kept").mkdir()
    shot = work / "shot.png"
    cv2.imwrite(str(shot), line.good(1)[0])
    for p in line.parts(args.parts, start=100):
        cv2.imwrite(str(work / "kept" / f"{p.part_id}.png"), p.image)
    state = enroll(pack, [shot], work / "state", quiet=True, log=lambda m: None)
    scorer = build_scorer(pack, state)
    frames = [p.image for p in line.parts(64, start=1000)]
    scorer.score_one(frames[0])
    marks: list[tuple[float, float]] = []  # (end time, ms)
    stop = threading.Event()

    def score_loop() -> None:
        i = 0
        while not stop.is_set():
            t0 = time.perf_counter()
            scorer.score_one(frames[i % len(frames)])
            marks.append((time.perf_counter(), (time.perf_counter() - t0) * 1000))
            i += 1

    scoring = threading.Thread(target=score_loop, daemon=True)
    scoring.start()
    time.sleep(args.quiet_s)
    t_start = time.perf_counter()
    print(f"refining with {args.parts} parts ...", file=sys.stderr)
    result = refine(pack, sorted((work / "kept").glob("*.png")), work / "state", quiet=True, log=lambda m: None)
    t_end = time.perf_counter()
    time.sleep(args.quiet_s)
    stop.set()
    scoring.join()

    def row(name: str, lo: float, hi: float) -> str:
        ms = np.array([m for t, m in marks if lo <= t < hi])
        return (f"| {name} | {len(ms) / (hi - lo):.1f} | {np.percentile(ms, 50):.1f} | {np.percentile(ms, 99):.1f} |"
                if len(ms) else f"| {name} | – | – | – |")

    print(f"\nDate {dt.date.today()}, {cpu_name()}, {platform.machine()}; `python bench/bench_refine.py "
          f"--pack {args.pack} --parts {args.parts}`. The refine job took {t_end - t_start:.1f} s "
          f"({len(result.kept)} kept, {len(result.suspects)} set aside; references "
          f"{len(state.references)} -> {len(result.state.references)}).\n")
    print("| score thread | frames/s | p50 ms | p99 ms |\n|---|---|---|---|")
    print(row("before (alone)", t_start - args.quiet_s, t_start))
    print(row("while the refine job runs", t_start, t_end))
    print(row("after", t_end, t_end + args.quiet_s))


if __name__ == "__main__":
    main()
