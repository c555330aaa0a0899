"""The encoder's cost per frame, two packs side by side in one process (alternating rounds), at batch 1:
for instance a pack exported with a fixed 224x224 input against one with dynamic height and width, and the
dynamic one also at a wide size of the same area.

    python bench/encoder_sizes.py --packs packs/fixed,packs/default --sizes 224x224,128x352 [--rounds 5 --runs 100]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge.inference.backend import OnnxRuntimeBackend  # noqa: E402
from edge.pack import load_pack  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--packs", required=True, help="comma-separated pack folders")
    ap.add_argument("--sizes", default="224x224", help="comma-separated HxW; a size other than a pack's own is "
                                                       "run only on packs that take it (input.size_multiple)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=100)
    args = ap.parse_args()
    cases = []
    for root in args.packs.split(","):
        pack = load_pack(root)
        for hw in args.sizes.split(","):
            h, w = (int(v) for v in hw.split("x"))
            if (h, w) != (pack.input.height, pack.input.width) and pack.input.size_multiple is None:
                continue
            sized = pack.at_input_size(h, w)
            cases.append((f"{root} at {h}x{w}", OnnxRuntimeBackend(sized), np.zeros((1, 3, h, w), np.float32)))
    times = {name: [] for name, _, _ in cases}
    for name, backend, batch in cases:  # warm-up
        for _ in range(10):
            backend.run(batch)
    for _ in range(args.rounds):
        for name, backend, batch in cases:
            t0 = time.perf_counter()
            for _ in range(args.runs):
                backend.run(batch)
            times[name].append((time.perf_counter() - t0) * 1000 / args.runs)
    print(f"| encoder | ms/frame, median of {args.rounds} rounds of {args.runs} (min-max) |\n|---|---|")
    for name, t in times.items():
        print(f"| {name} | {np.median(t):.2f} ({min(t):.2f}-{max(t):.2f}) |")


if __name__ == "__main__":
    main()
