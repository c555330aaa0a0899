"""The CUDA kernels (kernels/*.cu) on a GPU: compiled once per architecture with nvcc, cached on disk,
loaded with pycuda on the process's device thread (edge.inference.device), which owns the CUDA context: the
kernels' module, the bank's device arrays and every launch live there, whichever thread asks.
Everything imports lazily; without pycuda, nvcc or a device, `CudaUnavailable` says which is missing
and the CPU path is used.

    kernels = CudaKernels.get()                  # None-free: raises CudaUnavailable with the reason
    bank = GpuMemoryBank(memory_bank, kernels)   # same nearest_sqdist() as edge.scoring.bank.MemoryBank
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np

from edge.inference.device import CudaUnavailable, DeviceExecutor, cuda_executor

__all__ = ["CACHE", "CudaKernels", "CudaUnavailable", "GpuMemoryBank", "compile_cubin", "gpu_bank", "nvcc"]
log = logging.getLogger(__name__)
CACHE = Path(os.environ.get("ANOMALY_EDGE_CACHE", Path.home() / ".cache" / "anomaly-edge")) / "kernels"


def kernel_sources() -> dict[str, Path]:
    from kernels import SOURCES

    return SOURCES


def nvcc() -> str:
    path = shutil.which("nvcc") or next((p for p in ("/usr/local/cuda/bin/nvcc",) if Path(p).exists()), None)
    if path is None:
        raise CudaUnavailable("nvcc not found (install the CUDA toolkit or put nvcc on PATH)")
    return path


def compile_cubin(name: str, arch: str, cache: Path = CACHE) -> Path:
    """kernels/<name>.cu compiled for `arch` (e.g. "sm_87"), cached by source, arch and nvcc version."""
    source = kernel_sources()[name]
    compiler = nvcc()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(source.read_bytes() + arch.encode() + version.encode()).hexdigest()[:16]
    out = cache / f"{name}-{arch}-{key}.cubin"
    if out.is_file():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    proc = subprocess.run([compiler, "-cubin", f"-arch={arch}", "-O3", "-o", str(tmp), str(source)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise CudaUnavailable(f"nvcc could not compile {source} for {arch}:\n{proc.stderr[-2000:]}")
    tmp.replace(out)
    return out


class CudaKernels:
    """The loaded kernel functions on the device thread's context (one per process, see `get`)."""

    _instance: "CudaKernels | None" = None
    _lock = threading.Lock()

    def __init__(self, device: DeviceExecutor | None = None):
        try:
            import pycuda.driver  # noqa: F401
        except ImportError as e:
            raise CudaUnavailable(f"pycuda is not installed (pip install 'anomaly-edge[gpu]'): {e}") from None
        self.device = device or cuda_executor()
        self.device.call(self._load)

    def _load(self) -> None:  # on the device thread
        import pycuda.driver as cuda

        self.cuda = cuda
        major, minor = cuda.Context.get_device().compute_capability()
        self.arch = f"sm_{major}{minor}"
        self.functions = {name: cuda.module_from_file(str(compile_cubin(name, self.arch))) for name in kernel_sources()}
        self.stream = cuda.Stream()

    @classmethod
    def get(cls) -> "CudaKernels":
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def function(self, module: str, name: str):
        return self.device.call(lambda: self.functions[module].get_function(name))


class GpuMemoryBank:
    """A MemoryBank searched on the GPU with nn_min.cu: the bank's rows stay on the device; queries are
    projected on the host (a small GEMM) and searched per channel group. Created, searched and freed
    on the kernels' device thread, from whichever thread calls."""

    def __init__(self, bank, kernels: CudaKernels):
        self.bank, self.kernels = bank, kernels
        self.device = kernels.device
        self.groups = bank.groups
        self._dims = bank.features.shape[1] // self.groups
        self._device_arrays = self.device.call(self._upload)

    def _upload(self) -> dict:  # on the device thread
        import pycuda.gpuarray as gpuarray

        rows = np.ascontiguousarray(self.bank.features, np.float32)
        return {"rows": gpuarray.to_gpu(rows),
                "sq": [gpuarray.to_gpu(np.einsum("ij,ij->i", g, g).astype(np.float32))
                       for g in np.split(rows, self.groups, axis=1)],
                "fn": self.kernels.functions["nn_min"].get_function("nn_min_sqdist")}

    def __len__(self) -> int:
        return len(self.bank)

    @property
    def channels(self) -> int:
        return self.bank.channels

    def nearest_sqdist(self, queries: np.ndarray) -> np.ndarray:
        queries = np.ascontiguousarray(self.bank.project(np.asarray(queries, np.float32)), np.float32)
        return self.device.call(self._search, queries)

    def _search(self, queries: np.ndarray) -> np.ndarray:  # on the device thread
        import pycuda.gpuarray as gpuarray

        arrays, stream = self._device_arrays, self.kernels.stream
        n, width = queries.shape
        q = gpuarray.to_gpu_async(queries, stream=stream)
        out = gpuarray.empty(n, np.float32)
        total = np.zeros(n, np.float32)
        m = np.int32(len(self.bank))
        for g in range(self.groups):
            off = g * self._dims * 4  # bytes into each row
            arrays["fn"](np.intp(int(q.gpudata) + off), np.int32(n), np.int32(width),
                         np.intp(int(arrays["rows"].gpudata) + off), arrays["sq"][g].gpudata, m, np.int32(width),
                         np.int32(self._dims), out.gpudata, block=(32, 32, 1), grid=((n + 31) // 32, 1),
                         stream=stream)
            stream.synchronize()
            total += out.get()
        return total / self.groups if self.groups > 1 else total

    def __del__(self):
        # The device arrays are freed on the device thread (where their context is current), whichever
        # thread drops the bank (a reload swaps it in the maintenance thread).
        device = self.__dict__.get("device")
        if device is not None:
            device.release(self.__dict__, "_device_arrays")


def gpu_bank(bank):
    """The bank on the GPU when CUDA is usable (and ANOMALY_EDGE_GPU is not 0), else the bank as is."""
    if os.environ.get("ANOMALY_EDGE_GPU", "1") == "0":
        return bank
    try:
        gpu = GpuMemoryBank(bank, CudaKernels.get())
    except CudaUnavailable as e:
        # On a machine with an NVIDIA device the CPU fallback is news; on a CPU box it is the normal case.
        (log.warning if gpu_device_present() else log.debug)("nearest-neighbour search on the CPU: %s", e)
        return bank
    log.debug("nearest-neighbour search on the GPU (%s, nn_min.cu)", gpu.kernels.arch)
    return gpu


def gpu_device_present() -> bool:
    """An NVIDIA device node exists here: /dev/nvidia<N> (desktop/server driver), /dev/nvhost-* or
    /dev/nvgpu (Jetson)."""
    return any(any(Path("/dev").glob(pattern)) for pattern in ("nvidia[0-9]*", "nvhost-*", "nvgpu*"))
