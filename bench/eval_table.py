"""The evaluation table of docs/evaluation.md: `anomaly-edge eval` for several K and seeds, aggregated.

    python bench/eval_table.py --pack packs/default --data ../shared/data/magnetic_tile \
        --shots 1,4,16,all --seeds 0,1,2 --out out/eval-magnetic_tile [--scorer student]

Small K is averaged over the seeds; 'all' runs once (seed 0). Each run's JSON and report folder
(ROC plot, overlays) stays under --out; the markdown table is printed and written to --out/table.md.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

KEYS = ["image_auroc", "pixel_auroc", "aupro", "balanced_accuracy", "oracle_balanced_accuracy", "f1",
        "false_reject_rate", "frames_per_second", "enroll_seconds"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pack", default="packs/default")
    ap.add_argument("--data", required=True)
    ap.add_argument("--shots", default="1,4,16,all")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", required=True)
    ap.add_argument("--scorer", choices=["bank", "student"], default="bank")
    ap.add_argument("--time-budget", help="student training budget in seconds (eval's default otherwise)")
    args = ap.parse_args()
    out = Path(args.out)
    exe = Path(sys.executable).parent / "anomaly-edge"
    rows = []
    for k in args.shots.split(","):
        seeds = [0] if k == "all" else [int(s) for s in args.seeds.split(",")]
        runs = []
        for seed in seeds:
            path = out / f"k{k}_seed{seed}.json"
            if not path.is_file():
                print(f"== eval shots={k} seed={seed}", file=sys.stderr, flush=True)
                subprocess.run([str(exe), "eval", "--pack", args.pack, "--data", args.data, "--shots", k,
                                "--seed", str(seed), "--json", str(path), "--scorer", args.scorer,
                                *(["--time-budget", args.time_budget] if args.time_budget else [])],
                               check=True, stdout=subprocess.DEVNULL)
            runs.append(json.loads(path.read_text()))
        rows.append((k, len(seeds), {key: float(np.mean([r[key] for r in runs])) for key in KEYS},
                     {key: float(np.std([r[key] for r in runs])) for key in KEYS}))
    lines = ["| K | seeds | image AUROC | pixel AUROC | AUPRO | bal. acc. (auto) | bal. acc. (oracle) | F1 | "
             "false-reject | frames/s | enroll s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for k, n, mean, std in rows:
        def cell(key, fmt="{:.3f}"):
            return fmt.format(mean[key]) + (f" ± {std[key]:.3f}" if n > 1 and key != "frames_per_second" else "")
        lines.append(f"| {k} | {n} | {cell('image_auroc')} | {cell('pixel_auroc')} | {cell('aupro')} | "
                     f"{cell('balanced_accuracy')} | {cell('oracle_balanced_accuracy')} | {cell('f1')} | "
                     f"{cell('false_reject_rate')} | {mean['frames_per_second']:.1f} | {mean['enroll_seconds']:.1f} |")
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
