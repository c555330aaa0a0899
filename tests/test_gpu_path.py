"""The GPU path without a GPU, and with one.

CPU tests (run in `make test`): the device executor's threading; TensorRT 10 and 11 engine builds and
the runtime backend against tests/fake_gpu.py, a stand-in of the tensorrt and pycuda bindings' API
surface (per-thread CUDA contexts included). That tests OUR code's version branches, I/O checks,
bindings and threading, not TensorRT: the fake engine runs the ONNX graph with ONNX Runtime on the CPU.
Also: calibration that follows the engine, the install's ONNX Runtime providers, and `export engine`
without torch. The `gpu`-marked tests need a CUDA GPU with tensorrt and pycuda and are skipped, with
the reason, elsewhere (bench/gpu_check.sh runs them).
"""
from __future__ import annotations

import gc
import importlib.metadata
import os
import shutil
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import numpy as np
import pytest
import yaml

import fake_gpu
from edge.inference.device import DeviceClosed, DeviceExecutor
from edge.errors import EdgeError, StateError

ROOT = Path(__file__).resolve().parents[1]
VERSIONS = ["10.13.3", "11.1.0"]


# -- the device executor --------------------------------------------------------------------------

class ThreadBoundContext:
    """A CPU stand-in for a CUDA context: usable only on the thread that opened it."""

    def __init__(self):
        self.owner = None
        self.closed_on = None

    def open(self):
        self.owner = threading.current_thread()
        return self.close

    def close(self):
        self.closed_on = threading.current_thread()

    def use(self, value):
        if threading.current_thread() is not self.owner:
            raise RuntimeError("invalid device context")
        return value * 2


def test_device_executor_runs_every_call_on_its_own_thread_and_returns_or_raises():
    ctx = ThreadBoundContext()
    device = DeviceExecutor(ctx.open, name="test-device")
    try:
        with pytest.raises(RuntimeError, match="invalid device context"):
            ctx.use(1)  # the caller's thread has no context
        results, errors = [], []

        def worker(i):
            try:
                results.append(device.call(ctx.use, i))
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors and sorted(results) == [2 * i for i in range(8)]
        assert device.call(lambda: device.call(ctx.use, 5)) == 10  # a device call calling another: no deadlock
        with pytest.raises(ZeroDivisionError):
            device.call(lambda: 1 / 0)
        assert device.call(ctx.use, 3) == 6  # an exception does not end the thread
    finally:
        device.close()
    assert ctx.closed_on is device.thread and not device.thread.is_alive()
    with pytest.raises(DeviceClosed, match="closed"):
        device.call(ctx.use, 1)


def test_device_executor_reports_a_context_that_cannot_open():
    def no_device():
        raise EdgeError("no CUDA device 0: CUDA_ERROR_NO_DEVICE")

    with pytest.raises(EdgeError, match="CUDA_ERROR_NO_DEVICE"):
        DeviceExecutor(no_device)


def test_device_executor_releases_objects_on_its_thread():
    ctx = ThreadBoundContext()
    device = DeviceExecutor(ctx.open)
    dropped_on = []

    class DeviceMemory:
        def __del__(self):
            dropped_on.append(threading.current_thread())

    holder = type("Holder", (), {})()
    holder.memory = DeviceMemory()
    device.release(holder.__dict__, "memory")
    device.call(lambda: None)  # after the release
    device.close()
    assert dropped_on == [device.thread] and "memory" not in holder.__dict__


# -- TensorRT 10 and 11 against the bindings' API surface ------------------------------------------

@pytest.fixture
def gpu_stand_in(monkeypatch):
    """`install(version)`: fake tensorrt + pycuda in sys.modules; the process's device thread and
    kernels singleton are fresh for the test and closed after it."""
    from edge.inference import device
    from edge.inference.cuda import CudaKernels

    device.close_cuda_executor()
    monkeypatch.setattr(CudaKernels, "_instance", None)
    fake_gpu.OFF_CONTEXT_FREES.clear()
    yield lambda version="10.13.3", pycuda=True: fake_gpu.install(monkeypatch, version, pycuda)
    gc.collect()
    device.close_cuda_executor()


def _copy_pack(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _engine_pack(default_pack_dir, tmp_path, version, install, **build):
    from export.tensorrt import add_engine

    trt = install(version)
    pack_dir = _copy_pack(default_pack_dir, tmp_path / "pack")
    built = add_engine(pack_dir, **build)
    return trt, pack_dir, built


@pytest.mark.parametrize("version", VERSIONS)
def test_engine_build_follows_the_tensorrt_version(version, default_pack_dir, tmp_path, gpu_stand_in):
    from edge.pack import load_pack

    trt, pack_dir, built = _engine_pack(default_pack_dir, tmp_path, version, gpu_stand_in, workspace_mb=256)
    record = trt.BUILT[-1]
    assert record["pools"] == {"WORKSPACE": 256 << 20}
    assert record["input_types"] == [1]  # float32 input, as pack.yaml declares, on both
    if version.startswith("10."):
        assert record["flags"] == ["FP16"] and not record["strongly_typed"] and record["float16_casts"] == 0
    else:  # no BuilderFlag.FP16 on 11: a strongly typed network of the float16 graph
        assert not hasattr(trt.BuilderFlag, "FP16")
        assert record["flags"] == [] and record["strongly_typed"] and record["float16_casts"] > 0
    provenance = load_pack(pack_dir).manifest.provenance["tensorrt"]
    assert provenance["precision"] == "fp16" and provenance["workspace_mb"] == 256
    assert provenance["typing"] == ("weak" if version.startswith("10.") else "strong")
    assert not list(pack_dir.glob("*.fp16.onnx")) and not list(pack_dir.glob("*.tmp"))


@pytest.mark.parametrize("version", VERSIONS)
def test_trtexec_command_follows_its_tensorrt_version(version, default_pack_dir, tmp_path, monkeypatch):
    from export.tensorrt import build_engine

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # no Python bindings: trtexec is used
    code = int(version.split(".")[0]) * 10000 + int(version.split(".")[1]) * 100
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    args_file = tmp_path / "args.txt"
    script = bin_dir / "trtexec"
    script.write_text(f"""#!/bin/sh
if [ "$1" = "--help" ]; then echo "&&&& RUNNING TensorRT.trtexec [TensorRT v{code}] # trtexec --help"; exit 0; fi
printf '%s\\n' "$@" > {args_file}
for a in "$@"; do case "$a" in --saveEngine=*) echo engine > "${{a#--saveEngine=}}";; esac; done
""")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    onnx_path = default_pack_dir / "encoder.onnx"
    built = build_engine(onnx_path, tmp_path / "e.plan", {"image": (3, 224, 224)}, workspace_mb=300)
    args = args_file.read_text().split()
    assert "--memPoolSize=workspace:300M" in args
    if version.startswith("10."):
        assert "--fp16" in args and f"--onnx={onnx_path}" in args and built["typing"] == "weak"
    else:
        assert "--fp16" not in args and built["typing"] == "strong"
        converted = next(a for a in args if a.startswith("--onnx=")).split("=", 1)[1]
        assert converted.endswith(".fp16.onnx") and not Path(converted).exists()  # built from it, then removed
    assert built["precision"] == "fp16" and built["workspace_mb"] == 300


def test_an_unsupported_tensorrt_version_is_named(default_pack_dir, tmp_path, gpu_stand_in):
    from export.common import ExportError
    from export.tensorrt import add_engine

    gpu_stand_in("9.2.0")
    pack_dir = _copy_pack(default_pack_dir, tmp_path / "pack")
    with pytest.raises(ExportError, match=r"TensorRT 9\.2\.0: supported are 10, 11"):
        add_engine(pack_dir)


def test_the_float16_graph_for_tensorrt_11_keeps_float32_io_and_the_features(default_pack, tmp_path):
    """export.fp16 on the default pack's encoder, run by ONNX Runtime on the CPU: float32 in and out,
    float16 inside, features within float16 rounding of the float32 graph's."""
    import onnx
    import onnxruntime as ort

    from export.fp16 import write_float16

    path = write_float16(default_pack.file(default_pack.encoder.file), tmp_path / "encoder.fp16.onnx")
    model = onnx.load(str(path))
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [onnx.TensorProto.FLOAT]
    assert [o.type.tensor_type.elem_type for o in model.graph.output] == [onnx.TensorProto.FLOAT]
    weights = [t for t in model.graph.initializer if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    batch = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    half = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": batch})[0]
    full = _onnx_features(default_pack, batch)
    assert half.dtype == np.float32 and half.shape == full.shape
    assert np.abs(half - full).max() <= 1e-2 * np.abs(full).max()
    cos = (half * full).sum(1) / (np.linalg.norm(half, axis=1) * np.linalg.norm(full, axis=1))
    assert cos.min() > 0.999


def _onnx_features(pack, batch):
    from edge.inference.backend import OnnxRuntimeBackend

    return OnnxRuntimeBackend(pack, providers=["CPUExecutionProvider"]).run(batch)


@pytest.mark.parametrize("version", VERSIONS)
def test_an_engine_made_on_one_thread_runs_from_others(version, default_pack_dir, tmp_path, gpu_stand_in):
    from edge.inference.backend import TensorRtBackend, create_backend
    from edge.pack import load_pack

    _, pack_dir, _ = _engine_pack(default_pack_dir, tmp_path, version, gpu_stand_in)
    pack = load_pack(pack_dir)
    backend = create_backend(pack)  # this thread: the engine and its buffers go to the device thread
    assert isinstance(backend, TensorRtBackend) and backend.numerics == "tensorrt fp16"
    assert fake_gpu._stack() == []  # no context was made current here
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((n, 3, 224, 224)).astype(np.float32) for n in (1, 10)]  # 10 > profile max 8
    got, errors = {}, []

    def score(i):  # as the score and maintenance threads do
        try:
            got[i] = backend.run(batches[i])
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=score, args=(i,), name=f"score-{i}") for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    # 10.x built the float32 graph (the fake has no FP16 kernels); 11.x the float16 one.
    tol = dict(atol=1e-4) if version.startswith("10.") else dict(rtol=0, atol=0.1)
    for i, batch in enumerate(batches):
        np.testing.assert_allclose(got[i], _onnx_features(pack, batch), **tol)
    with pytest.raises(fake_gpu.LogicError, match="invalid device context"):
        backend._run_here(batches[0], ["features"])  # the same code off the device thread: what the executor prevents
    threading.Thread(target=lambda: backend.close()).start()  # dropped on another thread (a reload)
    del backend
    gc.collect()
    from edge.inference.device import cuda_executor

    cuda_executor().call(lambda: None)  # the release has run
    assert fake_gpu.OFF_CONTEXT_FREES == []


def test_an_engine_whose_io_differs_from_pack_yaml_is_refused_by_name(default_pack_dir, tmp_path, gpu_stand_in):
    from edge.inference.backend import EngineMismatch, create_backend
    from edge.pack import load_pack

    _, pack_dir, _ = _engine_pack(default_pack_dir, tmp_path, "10.13.3", gpu_stand_in)
    manifest = yaml.safe_load((pack_dir / "pack.yaml").read_text())
    manifest["encoder"]["output"] = "patch_features"
    (pack_dir / "pack.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    with pytest.raises(EngineMismatch, match=r"engine has no output 'patch_features' that pack.yaml declares "
                                             r"\(outputs: \['features'\]\)"):
        create_backend(load_pack(pack_dir))  # an error, not a silent fallback to ONNX Runtime


def test_a_shape_the_engine_refuses_is_an_error(default_pack_dir, tmp_path, gpu_stand_in):
    from edge.inference.backend import TensorRtBackend
    from edge.pack import load_pack

    _, pack_dir, _ = _engine_pack(default_pack_dir, tmp_path, "10.13.3", gpu_stand_in)
    backend = TensorRtBackend(load_pack(pack_dir))
    backend.max_batch = 64  # as if the profile allowed more than it does (8)
    with pytest.raises(EdgeError, match=r"shape \(10, 3, 224, 224\) is outside the engine's optimization profile"):
        backend.run(np.zeros((10, 3, 224, 224), np.float32))


def _tiny_anomalygpt_pack(root: Path) -> Path:
    """A pack with AnomalyGPT's vision I/O (three outputs) on a 32 x 32 input, small enough to build here."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edge.pack import sha256_file

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((16, 3, 8, 8)).astype(np.float32) * 0.1, "w")
    e = numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "e")
    nodes = [helper.make_node("Conv", ["image", "w"], ["tokens_raw"], strides=[8, 8]),
             helper.make_node("LpNormalization", ["tokens_raw"], ["patch_tokens"], axis=1, p=2),
             helper.make_node("ReduceMean", ["image"], ["grey"], axes=[1], keepdims=1),
             helper.make_node("Concat", ["grey", "grey"], ["two"], axis=1),
             helper.make_node("Sigmoid", ["two"], ["anomaly_maps"]),
             helper.make_node("ReduceMean", ["tokens_raw"], ["pooled"], axes=[2, 3], keepdims=0),
             helper.make_node("MatMul", ["pooled", "e"], ["image_embedding"])]
    graph = helper.make_graph(nodes, "vision", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 32, 32])],
                              [helper.make_tensor_value_info("anomaly_maps", TensorProto.FLOAT, ["N", 2, 32, 32]),
                               helper.make_tensor_value_info("image_embedding", TensorProto.FLOAT, ["N", 8]),
                               helper.make_tensor_value_info("patch_tokens", TensorProto.FLOAT, ["N", 16, 4, 4])],
                              [w, e])
    root.mkdir(parents=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(root / "vision.onnx"))
    manifest = {
        "schema_version": 1, "model_id": "tiny-anomalygpt-io", "description": "three-output vision I/O",
        "created": "2026-12-01T00:00:00+00:00",
        "input": {"name": "image", "height": 32, "width": 32, "colour": "rgb", "channels": 3,
                  "normalization": {"mean": [127.0], "std": [128.0]}},
        "files": {"vision": {"path": "vision.onnx", "sha256": sha256_file(root / "vision.onnx")}},
        "encoder": {"file": "vision", "output": "patch_tokens", "feature_shape": [16, 4, 4], "stride": 8,
                    "layers": [{"name": "conv", "stride": 8, "channels": 16}]},
        "scorer": {"kind": "anomalygpt", "metric": "cosine", "projection_dim": None, "upsample": "linear_align_corners",
                   "zero_shot": {"classes": ["a", "b"], "embedding_dim": 8}},
    }
    (root / "pack.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return root


def test_a_three_output_engine_binds_every_output(tmp_path, gpu_stand_in):
    from edge.scoring.anomalygpt import AnomalyGptExtractor
    from edge.inference.backend import OnnxRuntimeBackend, TensorRtBackend
    from edge.pack import load_pack
    from export.tensorrt import add_engine

    gpu_stand_in("10.13.3")
    pack_dir = _tiny_anomalygpt_pack(tmp_path / "agpt")
    add_engine(pack_dir, fp16=False)
    pack = load_pack(pack_dir)
    images = [np.random.default_rng(i).integers(0, 256, (40, 48, 3), np.uint8) for i in range(3)]
    on_gpu = AnomalyGptExtractor(pack, TensorRtBackend(pack)).run(images)
    on_cpu = AnomalyGptExtractor(pack, OnnxRuntimeBackend(pack, providers=["CPUExecutionProvider"])).run(images)
    for field in ("patch_tokens", "zero_shot_maps", "image_embeddings"):
        np.testing.assert_allclose(getattr(on_gpu, field), getattr(on_cpu, field), atol=1e-5, err_msg=field)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed: the bank's kernel cannot be compiled")
def test_a_gpu_bank_made_on_one_thread_searches_from_another(gpu_stand_in):
    from edge.scoring.bank import MemoryBank
    from edge.inference.cuda import gpu_bank

    gpu_stand_in(None)  # pycuda only
    rng = np.random.default_rng(3)
    feats = rng.standard_normal((3000, 96)).astype(np.float32)
    queries = rng.standard_normal((200, 96)).astype(np.float32)
    for bank in (MemoryBank(feats), MemoryBank(feats, groups=4), MemoryBank.with_pca(feats, 32)):
        on_gpu = gpu_bank(bank)
        assert on_gpu is not bank and fake_gpu._stack() == []
        out = {}
        t = threading.Thread(target=lambda: out.update(d=on_gpu.nearest_sqdist(queries)))
        t.start()
        t.join()
        np.testing.assert_allclose(out["d"], bank.nearest_sqdist(queries), rtol=1e-4, atol=1e-3)
        threading.Thread(target=lambda: None).start()
        del on_gpu
    gc.collect()
    from edge.inference.device import cuda_executor

    cuda_executor().call(lambda: None)
    assert fake_gpu.OFF_CONTEXT_FREES == []


# -- calibration follows the engine ---------------------------------------------------------------

def test_a_state_calibrated_on_onnx_runtime_is_refused_by_an_fp16_engine_or_recalibrated(
        default_pack, default_pack_dir, tmp_path, gpu_stand_in, caplog):
    from edge.inference.backend import TensorRtBackend
    from edge.station.engine_calibration import follow_engine
    from edge.pack import load_pack
    from edge.inference.features import FeatureExtractor
    from edge.station.enrollment import enroll
    from edge.station.state import load_state
    from edge.line.synthetic import write_good_parts
    from edge.scoring.factory import build_scorer

    state_dir = tmp_path / "state"
    enroll(default_pack, write_good_parts(tmp_path / "good", 6), state_dir, quiet=True, log=lambda m: None)
    doc = yaml.safe_load((state_dir / "state.yaml").read_text())
    assert (doc["calibration"]["backend"], doc["calibration"]["precision"]) == ("onnxruntime", "fp32")

    _, pack_dir, _ = _engine_pack(default_pack_dir, tmp_path, "10.13.3", gpu_stand_in)
    pack = load_pack(pack_dir)
    engine = TensorRtBackend(pack)
    state = load_state(state_dir, pack)
    with pytest.raises(StateError, match=r"calibrated with onnxruntime fp32, and this station scores with "
                                         r"tensorrt fp16 .*recalibrate \(re-enrolls its 6 stored references"):
        build_scorer(pack, state, None, backend=engine, kind="bank")
    with pytest.raises(StateError, match="calibrated with onnxruntime fp32"):
        follow_engine(pack, state, FeatureExtractor(pack, engine), "refuse")
    with caplog.at_level("WARNING", logger="edge.station.engine_calibration"):
        new = follow_engine(pack, state, FeatureExtractor(pack, engine), "recalibrate")
    assert "recalibrating from its 6 stored references with tensorrt fp16" in caplog.text
    assert (new.calibration.backend, new.calibration.precision) == ("tensorrt", "fp16")
    reloaded = load_state(state_dir, pack)
    assert (reloaded.calibration.backend, reloaded.calibration.precision) == ("tensorrt", "fp16")
    assert build_scorer(pack, reloaded, None, backend=engine, kind="bank").threshold == pytest.approx(
        new.calibration.threshold)


def test_states_from_before_the_record_count_as_onnx_runtime_fp32():
    from edge.scoring.calibration import Calibration, calibrate

    d = calibrate([1.0, 1.1, 0.9, 1.05]).to_dict()
    del d["backend"], d["precision"]
    c = Calibration.from_dict(d)
    assert (c.backend, c.precision) == ("onnxruntime", "fp32")


# -- install ---------------------------------------------------------------------------------------

def test_the_gpu_extra_replaces_onnxruntime_with_onnxruntime_gpu():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = lambda reqs: {r.split(">")[0].split("=")[0].split("<")[0].split("[")[0].strip() for r in reqs}  # noqa: E731
    extras = project["optional-dependencies"]
    # The two wheels install the same `onnxruntime` package: never both from one install.
    assert "onnxruntime" not in names(project["dependencies"])
    assert "onnxruntime" in names(extras["cpu"]) and "onnxruntime-gpu" not in names(extras["cpu"])
    assert "onnxruntime-gpu" in names(extras["gpu"]) and "onnxruntime" not in names(extras["gpu"])
    trt = next(r for r in extras["gpu"] if r.startswith("tensorrt"))
    assert "<12" in trt  # the versions export/tensorrt.py knows (10, 11)


def test_the_installed_onnxruntime_has_the_providers_its_wheel_promises():
    import onnxruntime as ort

    installed = set()
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            importlib.metadata.version(dist)
            installed.add(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    assert len(installed) == 1, f"exactly one ONNX Runtime wheel must be installed, found {sorted(installed)}"
    providers = ort.get_available_providers()
    assert "CPUExecutionProvider" in providers
    if installed == {"onnxruntime-gpu"}:
        assert "CUDAExecutionProvider" in providers, providers


def test_export_engine_imports_no_torch(default_pack_dir, tmp_path):
    """`export engine` with torch made unimportable (and a TensorRT 11 stand-in): it builds."""
    shim = tmp_path / "shim"
    (shim / "tensorrt").mkdir(parents=True)
    (shim / "sitecustomize.py").write_text(
        "import sys\n"
        "class NoTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch is not installed on the target (test)')\n"
        "sys.meta_path.insert(0, NoTorch())\n")
    (shim / "tensorrt" / "__init__.py").write_text(
        "import sys, fake_gpu\nsys.modules['tensorrt'] = fake_gpu._tensorrt_module('11.1.0')\n")
    pack_dir = _copy_pack(default_pack_dir, tmp_path / "pack")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shim), str(ROOT / "tests"), str(ROOT)])}
    probe = ("import sys, runpy; sys.argv = ['anomaly-edge', 'export', 'engine', '--pack', sys.argv[1]]\n"
             "from edge.cli.main import main\n"
             "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\nelse:\n    code = 0\n"
             "print('TORCH_LOADED' if 'torch' in sys.modules else 'NO_TORCH', code)\n")
    proc = subprocess.run([sys.executable, "-c", probe, str(pack_dir)], capture_output=True, text=True, env=env,
                          timeout=300, cwd=tmp_path)
    assert "NO_TORCH 0" in proc.stdout, proc.stdout + proc.stderr
    assert "TensorRT engine encoder.plan built with tensorrt 11.1.0" in proc.stdout


# -- on a GPU ---------------------------------------------------------------------------------------

def _real_gpu_or_skip():
    try:
        import pycuda.driver  # noqa: F401
    except ImportError as e:
        pytest.skip(f"pycuda is needed: {e}")
    from edge.inference.device import CudaUnavailable, cuda_executor

    try:
        cuda_executor()
    except CudaUnavailable as e:
        pytest.skip(f"no usable CUDA GPU here: {e}")


@pytest.fixture
def gpu_pack_dir(request, tmp_path):
    """A writable copy of ANOMALY_EDGE_GPU_PACK (bench/gpu_check.sh: a pack carried to the GPU machine,
    which may have no torch to export one), else of the default pack exported here."""
    src = os.environ.get("ANOMALY_EDGE_GPU_PACK")
    return _copy_pack(Path(src) if src else request.getfixturevalue("default_pack_dir"), tmp_path / "pack")


@pytest.mark.gpu
def test_gpu_tensorrt_backend_created_in_one_thread_runs_in_another(gpu_pack_dir):
    _real_gpu_or_skip()
    try:
        import tensorrt  # noqa: F401
    except ImportError as e:
        pytest.skip(f"tensorrt is needed: {e}")
    from edge.inference.backend import TensorRtBackend
    from edge.pack import load_pack
    from export.tensorrt import add_engine

    add_engine(gpu_pack_dir, fp16=False)
    pack = load_pack(gpu_pack_dir)
    made = {}
    t = threading.Thread(target=lambda: made.update(backend=TensorRtBackend(pack)), name="maker")
    t.start()
    t.join()
    batch = np.random.default_rng(0).standard_normal((10, 3, pack.input.height, pack.input.width)).astype(np.float32)
    out = {}
    t = threading.Thread(target=lambda: out.update(features=made["backend"].run(batch)), name="user")
    t.start()
    t.join()
    cpu = _onnx_features(pack, batch)
    assert np.abs(out["features"] - cpu).max() <= 1e-2 * np.abs(cpu).max()  # TF32 tactics on fp32


@pytest.mark.gpu
def test_gpu_bank_created_in_one_thread_searches_in_another():
    _real_gpu_or_skip()
    from edge.scoring.bank import MemoryBank
    from edge.inference.cuda import GpuMemoryBank, gpu_bank

    rng = np.random.default_rng(3)
    bank = MemoryBank(rng.standard_normal((20000, 272)).astype(np.float32), groups=4)
    queries = rng.standard_normal((784, 272)).astype(np.float32)
    made, out = {}, {}
    t = threading.Thread(target=lambda: made.update(bank=gpu_bank(bank)))
    t.start()
    t.join()
    assert isinstance(made["bank"], GpuMemoryBank)
    t = threading.Thread(target=lambda: out.update(d=made["bank"].nearest_sqdist(queries)))
    t.start()
    t.join()
    np.testing.assert_allclose(out["d"], bank.nearest_sqdist(queries), rtol=1e-4, atol=1e-2)


@pytest.mark.gpu
def test_gpu_onnxruntime_cuda_provider_matches_the_cpu(gpu_pack_dir):
    import onnxruntime as ort

    from edge.inference.backend import OnnxRuntimeBackend
    from edge.pack import load_pack

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(f"onnxruntime-gpu is not installed here (providers: {ort.get_available_providers()})")
    pack = load_pack(gpu_pack_dir)
    backend = OnnxRuntimeBackend(pack, providers=["CUDAExecutionProvider"])
    assert backend.session.get_providers()[0] == "CUDAExecutionProvider" and backend.numerics == "onnxruntime fp32"
    batch = np.random.default_rng(1).standard_normal((8, 3, pack.input.height, pack.input.width)).astype(np.float32)
    cpu = _onnx_features(pack, batch)
    assert np.abs(backend.run(batch) - cpu).max() <= 1e-3 * np.abs(cpu).max()


def test_a_station_on_a_tensorrt_engine_scores_and_reloads_across_its_threads(
        default_pack_dir, enrolled_state, tmp_path, gpu_stand_in, caplog):
    """The line runtime with gpu.backend tensorrt: the engine is made in the constructing thread, scores
    in the score thread, and a reload (another thread) rebuilds the scorer; the state calibrated on ONNX
    Runtime is recalibrated for the engine first (gpu.on_calibration_mismatch: recalibrate)."""
    from station_helpers import finish, start, write_config

    from edge.inference.backend import TensorRtBackend

    _, pack_dir, _ = _engine_pack(default_pack_dir, tmp_path, "10.13.3", gpu_stand_in)
    cfg = write_config(tmp_path, pack_dir, enrolled_state, 1, {"kind": "synthetic", "seed": 0, "count": 12},
                       mqtt={"enabled": False}, api={"enabled": False}, explain={"enabled": False},
                       gpu={"backend": "tensorrt", "on_calibration_mismatch": "recalibrate"})
    with caplog.at_level("WARNING", logger="edge.station.engine_calibration"):
        rt = start(cfg)
    try:
        assert isinstance(rt.backend, TensorRtBackend) and rt.scorer.extractor.backend is rt.backend
        assert "recalibrating from its 16 stored references with tensorrt fp16" in caplog.text
        assert (rt.state.calibration.backend, rt.state.calibration.precision) == ("tensorrt", "fp16")
        finish_reload = {}
        t = threading.Thread(target=lambda: finish_reload.update(r=rt.reload()), name="edge-maintenance-test")
        t.start()
        t.join()
        assert "threshold" in finish_reload["r"]
    finally:
        finish(rt)
    assert rt.counts["parts"] == 12 and rt.counts.get("errors", 0) == 0, dict(rt.counts)
    gc.collect()
    from edge.inference.device import cuda_executor

    cuda_executor().call(lambda: None)
    assert fake_gpu.OFF_CONTEXT_FREES == []


def test_a_gpu_backend_keeps_the_bank_path_whatever_cpu_scoring_says(default_pack_dir, tmp_path, gpu_stand_in):
    """cpu_scoring: station_graph is for ONNX Runtime on the CPU; a TensorRT station scores with its engine."""
    from edge.inference.backend import TensorRtBackend
    from edge.pack import load_pack
    from edge.inference.features import FeatureExtractor
    from edge.scoring.scorer import Scorer
    from edge.station.enrollment import build_state
    from edge.scoring.station_graph import StationGraphScorer
    from edge.line.synthetic import SyntheticLine
    from edge.scoring.factory import build_scorer

    _, pack_dir, _ = _engine_pack(default_pack_dir, tmp_path, "10.13.3", gpu_stand_in)
    pack = load_pack(pack_dir)
    engine = TensorRtBackend(pack)
    state = build_state(pack, SyntheticLine(seed=1).good(18), FeatureExtractor(pack, engine), quiet=True,
                        few_shot=False)
    assert (state.calibration.backend, state.calibration.precision) == ("tensorrt", "fp16")
    scorer = build_scorer(pack, state, None, backend=engine, kind="bank", cpu_scoring="station_graph")
    assert type(scorer) is Scorer and not isinstance(scorer, StationGraphScorer)
    assert scorer.extractor.backend is engine
