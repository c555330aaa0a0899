"""The CUDA kernel (nn_min.cu) against the CPU path it replaces, at realistic sizes.

    python bench/bench_kernels.py [--repeats 20]

nn:         784 query patches x a 50,000-patch bank x 272 channels (and the default pack's 8,192 x 128)
The CPU side always runs; the GPU side needs pycuda, nvcc and a CUDA device, and says why it did not run.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_scoring import cpu_name  # noqa: E402
from edge.scoring.bank import MemoryBank  # noqa: E402
from edge.inference.cuda import CudaKernels, CudaUnavailable, GpuMemoryBank  # noqa: E402
from kernels import reference as R  # noqa: E402


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return round(statistics.median(times), 3)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((784, 272)).astype(np.float32)
    banks = {"50000x272": MemoryBank(rng.standard_normal((50000, 272)).astype(np.float32)),
             "8192x128 (default pack)": MemoryBank(rng.standard_normal((8192, 128)).astype(np.float32))}
    out = {"machine": f"{cpu_name()}, Python {platform.python_version()}", "date": time.strftime("%Y-%m-%d"),
           "cpu_ms": {}, "gpu_ms": {}}
    for name, bank in banks.items():
        q = queries[:, :bank.channels]
        out["cpu_ms"][f"nn {name}"] = timed(lambda: bank.nearest_sqdist(q), max(3, args.repeats // 4))
    try:
        kernels = CudaKernels.get()
    except CudaUnavailable as e:
        out["gpu_ms"] = f"not run: {e}"
        print(json.dumps(out, indent=1))
        return 0
    out["gpu"] = kernels.arch
    for name, bank in banks.items():
        gpu = GpuMemoryBank(bank, kernels)
        q = queries[:, :bank.channels]
        got = gpu.nearest_sqdist(q)
        out[f"nn {name} max abs error vs reference"] = float(np.abs(got - R.nn_min_sqdist(q, bank.features)).max())
        out["gpu_ms"][f"nn {name} (incl. copies)"] = timed(lambda: gpu.nearest_sqdist(q), args.repeats)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
