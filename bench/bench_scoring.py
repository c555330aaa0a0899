"""Scoring speed and memory on this machine: frames/s, p50/p99 latency at batch 1 and 8, peak RSS.

    python bench/bench_scoring.py --pack packs/default [--references 752] [--frames 300] [--scorer student]

Enrolls `--references` synthetic good parts (the bank is coreset-capped as the pack says), then
scores synthetic frames at the pack's input size, timing encoder, search and decide separately.
Prints a markdown table for docs/benchmarks.md. With `--scorer student` it trains a student for a
few steps on `--references` synthetic parts (speed does not depend on how well it is trained; needs
torch) and times its fused teacher+student graph instead ("encoder" = the whole graph, "search+map"
= upsampling and smoothing only).
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge.pack import load_pack  # noqa: E402
from edge.inference.features import FeatureExtractor  # noqa: E402
from edge.scoring.scorer import Scorer  # noqa: E402
from edge.station.enrollment import build_state  # noqa: E402
from edge.line.synthetic import SyntheticLine  # noqa: E402


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def time_batches(scorer: Scorer, frames: list[np.ndarray], batch: int) -> dict:
    stages = {"encoder": [], "search+map": [], "decide": []}
    per_frame = []
    for i in range(0, len(frames) - batch + 1, batch):
        chunk = frames[i:i + batch]
        t0 = time.perf_counter()
        # (background masking: finding the mask and painting the frame count as the encoder's stage)
        encoded, weights = scorer.prepare(chunk) if hasattr(scorer, "prepare") else (chunk, None)
        feats = scorer.extractor.patch_features(encoded)
        t1 = time.perf_counter()
        maps = scorer.anomaly_maps(feats) if weights is None else scorer.anomaly_maps(feats, weights)
        t2 = time.perf_counter()
        for m, f in zip(maps, chunk):
            scorer.decide(m, f.shape[:2])
        t3 = time.perf_counter()
        stages["encoder"].append((t1 - t0) / batch)
        stages["search+map"].append((t2 - t1) / batch)
        stages["decide"].append((t3 - t2) / batch)
        per_frame.append((t3 - t0) * 1000)  # latency of the batch call
    lat = np.asarray(per_frame)
    n_frames = len(per_frame) * batch
    return {
        "batch": batch, "fps": n_frames / (lat.sum() / 1000), "p50": float(np.percentile(lat, 50)),
        "p99": float(np.percentile(lat, 99)),
        **{k: float(np.mean(v) * 1000) for k, v in stages.items()},
    }


def scoring_process_rss(pack, state, frames, graph_dir: Path | None = None) -> float:
    """Peak RSS of a fresh process that only loads pack + state and scores frames (the runtime's footprint)."""
    import subprocess
    import tempfile

    import shutil

    with tempfile.TemporaryDirectory() as tmp:
        if state.student is not None:
            (Path(tmp) / "state").mkdir()
            shutil.copy(graph_dir / state.student.file, Path(tmp) / "state")
        state.save(Path(tmp) / "state")
        np.save(Path(tmp) / "frames.npy", np.stack(frames))
        code = (
            "import sys, numpy as np\n"
            f"sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})\n"
            "from edge.pack import load_pack\nfrom edge.station.state import load_state\nfrom edge.scoring.factory import build_scorer\n"
            f"pack = load_pack({str(pack.root)!r})\n"
            f"scorer = build_scorer(pack, load_state({str(Path(tmp) / 'state')!r}, pack))\n"
            f"for f in np.load({str(Path(tmp) / 'frames.npy')!r}): scorer.score_one(f)\n"
            # VmHWM belongs to this exec'd image; ru_maxrss would carry the parent's high-water mark.
            "print([int(l.split()[1]) / 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0])\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        return float(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pack", default="packs/default")
    ap.add_argument("--references", type=int, default=752)
    ap.add_argument("--frames", type=int, default=320)
    ap.add_argument("--bank", type=int, default=None, help="override the pack's bank cap (patches)")
    ap.add_argument("--scorer", choices=["bank", "student"], default="bank")
    ap.add_argument("--foreground", choices=["auto", "on", "off"], default="auto",
                    help="few-shot states: background masking (auto: on for the synthetic parts)")
    ap.add_argument("--student-steps", type=int, default=5)
    args = ap.parse_args()
    pack = load_pack(args.pack)
    if args.bank:
        pack.manifest = pack.manifest.model_copy(update={"scorer": pack.scorer.model_copy(update={"max_bank_patches": args.bank})})
    line = SyntheticLine(seed=1)
    t = time.perf_counter()
    extractor = FeatureExtractor(pack)
    state = build_state(pack, line.good(args.references), extractor, seed=0, foreground=args.foreground)
    enroll_s = time.perf_counter() - t
    # With <= 16 references the state is few-shot (subspace head, no search); the p-value is computed
    # for every frame, as the runtime does.
    scorer = Scorer(pack, state.bank, state.calibration.threshold, extractor, head=state.head,
                    calibration=state.calibration)
    graph_dir = None
    if args.scorer == "student":
        import tempfile

        from edge.scoring.student import StudentScorer
        from export.student import TrainConfig, train_student

        graph_dir = Path(tempfile.mkdtemp(prefix="bench-student."))
        state.student = train_student(pack, line.good(args.references), graph_dir,
                                      TrainConfig(steps=args.student_steps, threads=2))
        scorer = StudentScorer.from_spec(pack, graph_dir, state.student)
        extractor = scorer.extractor
    # Frames already at the pack's input size, so resize costs what a matched camera ROI would.
    frames = [np.ascontiguousarray(p.image[:pack.input.height, :pack.input.width]) for p in line.parts(args.frames)]
    for b in (1, 8):
        time_batches(scorer, frames[:16], b)  # warm-up
    rows = [time_batches(scorer, frames, b) for b in (1, 8)]
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    runtime_rss_mb = scoring_process_rss(pack, state, frames[:50], graph_dir)
    print(f"command: python bench/bench_scoring.py --pack {args.pack} --references {args.references} "
          f"--frames {args.frames}" + (f" --bank {args.bank}" if args.bank else "")
          + (f" --scorer student --student-steps {args.student_steps}" if args.scorer == "student" else "")
          + (f" --foreground {args.foreground}" if args.foreground != "auto" else ""))
    print(f"date: {dt.date.today()}  machine: {cpu_name()}, {os.cpu_count()} cores, backend {extractor.backend.name}, "
          f"load average (1 min) at the end {os.getloadavg()[0]:.2f}, scorer {args.scorer}")
    head = (f", few-shot head {state.head.kind} ({state.head.subspace.dims} dims, background masking "
            f"{state.info.get('foreground', 'off')})" if state.head is not None else "")
    print(f"pack {pack.model_id}, input {pack.input.height}x{pack.input.width}, bank {len(state.bank)} patches "
          f"x {state.bank.channels} ch from {args.references} references (enrollment {enroll_s:.1f} s){head}")
    print()
    print("| batch | frames/s | p50 ms/call | p99 ms/call | encoder ms/frame | search+map ms/frame | decide ms/frame |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['fps']:.1f} | {r['p50']:.1f} | {r['p99']:.1f} | {r['encoder']:.1f} | "
              f"{r['search+map']:.1f} | {r['decide']:.2f} |")
    print()
    print(f"peak RSS: {runtime_rss_mb:.0f} MB for a process that loads the pack and station state and scores "
          f"frames; {rss_mb:.0f} MB for this benchmark process, which also enrolled {args.references} references")
    return 0


if __name__ == "__main__":
    sys.exit(main())
