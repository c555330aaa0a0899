"""The pack's encoder on every backend this machine has, against ONNX Runtime on the CPU: the largest
absolute difference of features, anomaly maps and image scores, and frames/s at batch 1 and 8.

    python bench/gpu_compare.py --pack packs/default [--references 32] [--frames 64] [--json out.json]

Backends: onnxruntime-cpu (always, the reference), onnxruntime-cuda (CUDAExecutionProvider, where
onnxruntime-gpu is installed), onnxruntime-tensorrt (its TensorRT provider, engine cache and FP16 on)
and tensorrt (the pack's engine, `anomaly-edge export engine`, through edge.inference.backend.TensorRtBackend on
the device thread). The bank is built once on the CPU from synthetic good parts; GPU backends search it
with nn_min.cu (edge.inference.cuda) where CUDA is usable. A backend that cannot run here is reported with why.
Bench side of bench/gpu_check.sh; runs (CPU only) anywhere.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge.inference.backend import GpuOptions, OnnxRuntimeBackend, TensorRtBackend  # noqa: E402
from edge.errors import EdgeError  # noqa: E402
from edge.pack import load_pack  # noqa: E402
from edge.inference.features import FeatureExtractor  # noqa: E402
from edge.scoring.scorer import Scorer  # noqa: E402
from edge.station.enrollment import build_state  # noqa: E402
from edge.line.synthetic import SyntheticLine  # noqa: E402


def make_backend(kind: str, pack):
    import onnxruntime as ort

    available = ort.get_available_providers()
    if kind == "onnxruntime-cpu":
        return OnnxRuntimeBackend(pack, providers=["CPUExecutionProvider"])
    if kind == "onnxruntime-cuda":
        if "CUDAExecutionProvider" not in available:
            raise EdgeError(f"no CUDAExecutionProvider (providers: {available})")
        return OnnxRuntimeBackend(pack, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    if kind == "onnxruntime-tensorrt":
        if "TensorrtExecutionProvider" not in available:
            raise EdgeError(f"no TensorrtExecutionProvider (providers: {available})")
        return OnnxRuntimeBackend(pack, gpu=GpuOptions())
    return TensorRtBackend(pack)


def frames_per_second(scorer: Scorer, frames: list, batch: int, seconds: float) -> float:
    scorer.score(frames[:batch])  # warm-up (engine, allocations)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for i in range(0, len(frames) - batch + 1, batch):
            scorer.score(frames[i:i + batch])
            n += batch
    return n / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pack", default="packs/default")
    ap.add_argument("--references", type=int, default=32)
    ap.add_argument("--frames", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=5.0, help="timing per backend and batch size")
    ap.add_argument("--backends", default="onnxruntime-cpu,onnxruntime-cuda,onnxruntime-tensorrt,tensorrt")
    ap.add_argument("--json", help="write the result here too")
    args = ap.parse_args()
    pack = load_pack(args.pack)
    line = SyntheticLine(seed=1)
    frames = [np.ascontiguousarray(p.image[:pack.input.height, :pack.input.width]) for p in line.parts(args.frames)]
    out = {"command": " ".join(["python", *sys.argv]), "date": dt.date.today().isoformat(), "pack": pack.model_id,
           "backends": {}}
    reference = None
    for kind in args.backends.split(","):
        entry = out["backends"][kind] = {}
        try:
            backend = make_backend(kind, pack)
        except Exception as e:  # each backend's own reason (ImportError, EdgeError, ORT's errors)
            entry["not_run"] = f"{type(e).__name__}: {e}"
            continue
        entry["name"], entry["numerics"] = backend.name, backend.numerics
        extractor = FeatureExtractor(pack, backend)
        if reference is None:  # the CPU reference: the bank is built once, from its features
            os.environ["ANOMALY_EDGE_GPU"] = "0"
            state = build_state(pack, line.good(args.references), extractor, seed=0, quiet=True, few_shot=False)
            cpu_scorer = Scorer(pack, state.bank, state.calibration.threshold, extractor)
            reference = {"features": extractor.patch_features(frames[:16])}
            reference["maps"] = cpu_scorer.anomaly_maps(reference["features"])
            reference["scores"] = np.array([r.score for r in cpu_scorer.score(frames[:16])])
            scorer = cpu_scorer
            os.environ.pop("ANOMALY_EDGE_GPU")
        else:
            from edge.inference.cuda import gpu_bank

            bank = gpu_bank(state.bank)
            entry["bank_search"] = "gpu (nn_min.cu)" if bank is not state.bank else "cpu"
            scorer = Scorer(pack, bank, state.calibration.threshold, extractor)
            feats = extractor.patch_features(frames[:16])
            maps = scorer.anomaly_maps(feats)
            scores = np.array([r.score for r in scorer.score(frames[:16])])
            entry["max_abs_diff"] = {"features": float(np.abs(feats - reference["features"]).max()),
                                     "maps": float(np.abs(maps - reference["maps"]).max()),
                                     "image_scores": float(np.abs(scores - reference["scores"]).max())}
            entry["reference_max"] = {"features": float(np.abs(reference["features"]).max()),
                                      "maps": float(reference["maps"].max())}
        entry["frames_per_second"] = {f"batch_{b}": round(frames_per_second(scorer, frames, b, args.seconds), 1)
                                      for b in (1, 8)}
        print(kind, json.dumps(entry), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
