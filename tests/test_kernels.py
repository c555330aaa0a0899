"""CUDA kernels: every .cu is launched by the runtime and compiles for Jetson Orin (sm_87) and H100
(sm_90); the NumPy reference agrees with the CPU runtime it stands for; on a GPU, the kernel matches it."""
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from edge.scoring.bank import MemoryBank
from kernels import SOURCES
from kernels import reference as R

NVCC = shutil.which("nvcc")


def cuda_or_skip():
    from edge.inference.cuda import CudaKernels, CudaUnavailable

    try:
        return CudaKernels.get()
    except CudaUnavailable as e:
        pytest.skip(f"no usable CUDA GPU here: {e}")


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed (CUDA toolkit)")
@pytest.mark.parametrize("arch", ["sm_87", "sm_90"])
@pytest.mark.parametrize("name", sorted(SOURCES))
def test_kernel_compiles(name, arch, tmp_path):
    from edge.inference.cuda import compile_cubin

    cubin = compile_cubin(name, arch, cache=tmp_path)
    assert cubin.stat().st_size > 1000 and compile_cubin(name, arch, cache=tmp_path) == cubin  # cached


def test_every_kernel_is_launched_by_the_runtime():
    """A kernel no runtime code launches is dead weight to compile on every GPU: remove it instead."""
    runtime = "\n".join(p.read_text() for p in (Path(__file__).resolve().parents[1] / "edge").rglob("*.py"))
    for name, source in SOURCES.items():
        entries = re.findall(r'extern "C" __global__ void (\w+)', source.read_text())
        assert entries, f"{source}: no kernel entry point"
        for entry in entries:
            assert re.search(rf'functions\["{name}"\]\.get_function\("{entry}"\)|function\("{name}", "{entry}"\)',
                             runtime), f"{source.name}: {entry} is launched by nothing in edge/"


def test_nn_reference_matches_the_memory_bank():
    rng = np.random.default_rng(1)
    bank = rng.standard_normal((5000, 96)).astype(np.float32)
    queries = rng.standard_normal((784, 96)).astype(np.float32)
    np.testing.assert_allclose(MemoryBank(bank).nearest_sqdist(queries), R.nn_min_sqdist(queries, bank),
                               rtol=1e-4, atol=1e-3)


def test_without_cuda_the_bank_stays_on_the_cpu_and_says_why(caplog):
    """Why is a warning where an NVIDIA device exists (CUDA was expected) and a debug line on a CPU box,
    whose start log says once that it scores on the CPU (tests/test_runtime.py)."""
    from edge.inference.cuda import CudaKernels, CudaUnavailable, gpu_bank, gpu_device_present

    try:
        CudaKernels.get()
        pytest.skip("a CUDA GPU is present")
    except CudaUnavailable:
        pass
    bank = MemoryBank(np.ones((4, 8), np.float32))
    with caplog.at_level("DEBUG", logger="edge.inference.cuda"):
        assert gpu_bank(bank) is bank
    said = [r for r in caplog.records if "nearest-neighbour search on the CPU" in r.getMessage()]
    assert len(said) == 1
    assert said[0].levelname == ("WARNING" if gpu_device_present() else "DEBUG")


@pytest.mark.gpu
def test_gpu_nn_matches_reference_and_bank():
    kernels = cuda_or_skip()
    from edge.inference.cuda import GpuMemoryBank

    rng = np.random.default_rng(3)
    feats = rng.standard_normal((50000, 272)).astype(np.float32)
    queries = rng.standard_normal((784, 272)).astype(np.float32)
    for bank in (MemoryBank(feats[:8192]), MemoryBank(feats, groups=4), MemoryBank.with_pca(feats[:8192], 128)):
        np.testing.assert_allclose(GpuMemoryBank(bank, kernels).nearest_sqdist(queries), bank.nearest_sqdist(queries),
                                   rtol=1e-4, atol=1e-2)


def test_a_pack_engine_that_cannot_run_here_falls_back_to_onnx_runtime(default_pack_dir, tmp_path, caplog):
    import shutil as sh

    import yaml

    from edge.inference.backend import OnnxRuntimeBackend, create_backend
    from edge.pack import load_pack, sha256_file

    pack_dir = tmp_path / "pack"
    sh.copytree(default_pack_dir, pack_dir, symlinks=True)
    (pack_dir / "encoder.plan").write_bytes(b"not an engine for this machine")
    manifest = yaml.safe_load((pack_dir / "pack.yaml").read_text())
    manifest["files"]["encoder_engine"] = {"path": "encoder.plan", "sha256": sha256_file(pack_dir / "encoder.plan")}
    (pack_dir / "pack.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    with caplog.at_level("WARNING", logger="edge.inference.backend"):
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
