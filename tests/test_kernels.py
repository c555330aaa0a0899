"""CUDA kernels: every .cu compiles for Jetson Orin (sm_87) and H100 (sm_90); the NumPy references agree
with the CPU runtime they stand for; on a GPU, each kernel matches its reference."""
import shutil

import cv2
import numpy as np
import pytest

from edge.bank import MemoryBank
from kernels import SOURCES
from kernels import reference as R

NVCC = shutil.which("nvcc")


def cuda_or_skip():
    from edge.cuda import CudaKernels, CudaUnavailable

    try:
        return CudaKernels.get()
    except CudaUnavailable as e:
        pytest.skip(f"no usable CUDA GPU here: {e}")


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed (CUDA toolkit)")
@pytest.mark.parametrize("arch", ["sm_87", "sm_90"])
@pytest.mark.parametrize("name", sorted(SOURCES))
def test_kernel_compiles(name, arch, tmp_path):
    from edge.cuda import compile_cubin

    cubin = compile_cubin(name, arch, cache=tmp_path)
    assert cubin.stat().st_size > 1000 and compile_cubin(name, arch, cache=tmp_path) == cubin  # cached


def test_preprocess_reference_matches_the_cpu_path(default_pack):
    from edge.preprocess import to_batch

    spec = default_pack.input
    rng = np.random.default_rng(0)
    for shape in [(301, 257, 3), (2048, 2448, 3), (100, 90), (180, 300, 3)]:
        frame = rng.integers(0, 256, shape, np.uint8)
        frame = cv2.GaussianBlur(frame, (0, 0), 2)
        cpu = to_batch([frame], spec)[0]
        ref = R.preprocess(frame, spec.height, spec.width, spec.colour, spec.channels,
                           spec.normalization.mean, spec.normalization.std)
        # OpenCV rounds resized pixels to whole grey levels (and enlarges with 11-bit fixed-point
        # weights); the kernel keeps them exact: within one grey level of each other.
        assert np.abs(cpu - ref).max() * max(spec.normalization.std) <= 1.0, shape


def test_nn_reference_matches_the_memory_bank():
    rng = np.random.default_rng(1)
    bank = rng.standard_normal((5000, 96)).astype(np.float32)
    queries = rng.standard_normal((784, 96)).astype(np.float32)
    np.testing.assert_allclose(MemoryBank(bank).nearest_sqdist(queries), R.nn_min_sqdist(queries, bank),
                               rtol=1e-4, atol=1e-3)


def test_map_reference_matches_opencv():
    grid = np.random.default_rng(2).random((28, 28)).astype(np.float32)
    cpu = cv2.GaussianBlur(cv2.resize(grid, (224, 224), interpolation=cv2.INTER_LINEAR), (0, 0), 8)
    ref, top = R.map_post(grid, 224, 224, 8)
    np.testing.assert_allclose(ref, cpu, atol=1e-5)
    assert top == pytest.approx(float(cpu.max()), abs=1e-5)


def test_without_cuda_the_bank_stays_on_the_cpu_and_says_why(caplog):
    from edge.cuda import CudaKernels, CudaUnavailable, gpu_bank

    try:
        CudaKernels.get()
        pytest.skip("a CUDA GPU is present")
    except CudaUnavailable:
        pass
    bank = MemoryBank(np.ones((4, 8), np.float32))
    with caplog.at_level("INFO", logger="edge.cuda"):
        assert gpu_bank(bank) is bank
    assert "nearest-neighbour search on the CPU" in caplog.text


@pytest.mark.gpu
def test_gpu_nn_matches_reference_and_bank():
    kernels = cuda_or_skip()
    from edge.cuda import GpuMemoryBank

    rng = np.random.default_rng(3)
    feats = rng.standard_normal((50000, 272)).astype(np.float32)
    queries = rng.standard_normal((784, 272)).astype(np.float32)
    for bank in (MemoryBank(feats[:8192]), MemoryBank(feats, groups=4), MemoryBank.with_pca(feats[:8192], 128)):
        np.testing.assert_allclose(GpuMemoryBank(bank, kernels).nearest_sqdist(queries), bank.nearest_sqdist(queries),
                                   rtol=1e-4, atol=1e-2)


@pytest.mark.gpu
def test_gpu_preprocess_matches_reference(default_pack):
    kernels = cuda_or_skip()
    import pycuda.gpuarray as gpuarray

    spec = default_pack.input
    frame = np.random.default_rng(4).integers(0, 256, (2048, 2448, 3), np.uint8)
    src = gpuarray.to_gpu(frame)
    out = gpuarray.empty((3, spec.height, spec.width), np.float32)
    m, s = spec.normalization.mean, spec.normalization.std
    kernels.function("preprocess", "preprocess_f32")(
        src.gpudata, np.int32(frame.shape[0]), np.int32(frame.shape[1]), np.int32(3), np.int32(frame.shape[1] * 3),
        out.gpudata, np.int32(spec.height), np.int32(spec.width), np.int32(0), np.int32(3),
        *[np.float32(v) for v in m], *[np.float32(1 / v) for v in s], block=(16, 16, 1),
        grid=((spec.width + 15) // 16, (spec.height + 15) // 16))
    ref = R.preprocess(frame, spec.height, spec.width, "rgb", 3, m, s)
    np.testing.assert_allclose(out.get(), ref, atol=1e-4)


@pytest.mark.gpu
def test_gpu_map_post_matches_reference():
    kernels = cuda_or_skip()
    import pycuda.gpuarray as gpuarray

    grid = np.random.default_rng(5).random((2, 28, 28)).astype(np.float32)
    g = gpuarray.to_gpu(grid)
    up = gpuarray.empty((2, 224, 224), np.float32)
    tmp = gpuarray.empty_like(up)
    launch = dict(block=(16, 16, 1), grid=(14, 14, 2))
    kernels.function("map_post", "upsample_bilinear")(g.gpudata, np.int32(28), np.int32(28), up.gpudata,
                                                     np.int32(224), np.int32(224), **launch)
    w = gpuarray.to_gpu(R.gaussian_weights(8.0))
    r = np.int32(len(R.gaussian_weights(8.0)) // 2)
    blur = kernels.function("map_post", "gaussian_1d")
    blur(up.gpudata, tmp.gpudata, np.int32(224), np.int32(224), w.gpudata, r, np.int32(0), **launch)
    blur(tmp.gpudata, up.gpudata, np.int32(224), np.int32(224), w.gpudata, r, np.int32(1), **launch)
    best = gpuarray.zeros(2, np.uint32)
    kernels.function("map_post", "map_max")(up.gpudata, np.int32(224 * 224), best.gpudata, block=(256, 1, 1),
                                           grid=(64, 2))
    for i in range(2):
        ref, top = R.map_post(grid[i], 224, 224, 8.0)
        np.testing.assert_allclose(up.get()[i], ref, atol=1e-5)
        bits = best.get()[i]
        bits = bits & 0x7FFFFFFF if bits & 0x80000000 else ~bits & 0xFFFFFFFF
        assert np.uint32(bits).view(np.float32) == pytest.approx(top, abs=1e-6)


def test_a_pack_engine_that_cannot_run_here_falls_back_to_onnx_runtime(default_pack_dir, tmp_path, caplog):
    import shutil as sh

    import yaml

    from edge.backend import OnnxRuntimeBackend, create_backend
    from edge.pack import load_pack, sha256_file

    pack_dir = tmp_path / "pack"
    sh.copytree(default_pack_dir, pack_dir, symlinks=True)
    (pack_dir / "encoder.plan").write_bytes(b"not an engine for this machine")
    manifest = yaml.safe_load((pack_dir / "pack.yaml").read_text())
    manifest["files"]["encoder_engine"] = {"path": "encoder.plan", "sha256": sha256_file(pack_dir / "encoder.plan")}
    (pack_dir / "pack.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    with caplog.at_level("WARNING", logger="edge.backend"):
        backend = create_backend(load_pack(pack_dir))
    assert isinstance(backend, OnnxRuntimeBackend)
    assert "TensorRT engine not used, falling back to ONNX Runtime" in caplog.text


def test_export_engine_without_tensorrt_says_why_and_leaves_the_pack_alone(default_pack_dir, tmp_path):
    import shutil as sh

    from conftest import run_cli

    pack_dir = tmp_path / "pack"
    sh.copytree(default_pack_dir, pack_dir, symlinks=True)
    before = (pack_dir / "pack.yaml").read_text()
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    if shutil.which("trtexec"):
        pytest.skip("trtexec is on PATH")
    proc = run_cli("export", "engine", "--pack", pack_dir, check=False)
    assert proc.returncode == 2 and "no TensorRT engine built" in proc.stderr and "tensorrt" in proc.stderr
    assert (pack_dir / "pack.yaml").read_text() == before and not list(pack_dir.glob("*.plan*"))
