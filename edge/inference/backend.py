"""Backends run the pack's encoder: `run(batch) -> features`. ONNX Runtime everywhere; TensorRT where
the pack carries an engine (`files.<encoder>_engine`) and tensorrt + pycuda import on a GPU, with all
its device work on the process's device thread (edge.inference.device). Each backend says which numerics it
computes with (`family`, `precision`), which a state's calibration must match (edge.station.engine_calibration).

The interface is deliberately small (OpenVINO model_api's adapter idea): a backend knows its input
and output shapes and turns an N x C x H x W float32 batch into the pack's feature tensor.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from edge.errors import EdgeError, PackError
from edge.pack import Pack

log = logging.getLogger(__name__)


class Backend(Protocol):
    name: str
    family: str  # onnxruntime, onnxruntime-tensorrt or tensorrt: what a calibrated threshold depends on,
    precision: str  # with this: fp32 or fp16 (edge.station.engine_calibration)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """N x C x H x W float32 -> N x C' x h x w float32 features."""
        ...

    def run_outputs(self, batch: np.ndarray, names: list[str]) -> list[np.ndarray]:
        """The named outputs of one run, for packs whose encoder has more than the features."""
        ...


def dim_matches(declared, expected: int) -> bool:
    # Symbolic (str) or unknown (None) dims accept anything; fixed ones must agree.
    return not isinstance(declared, int) or declared == expected


@dataclass(frozen=True)
class GpuOptions:
    """How GPU backends build and run (the station config's `gpu:` section): the TensorRT builder's
    workspace limit (on Jetson the builder otherwise takes the shared memory the station and the LLM
    need), FP16, and where ONNX Runtime's TensorRT provider caches its engines (so that they are built
    once, not at every start)."""

    workspace_mb: int = 1024
    fp16: bool = True
    engine_cache: Path = Path(os.environ.get("ANOMALY_EDGE_CACHE", Path.home() / ".cache" / "anomaly-edge")) / "ort-trt"


def onnxruntime_providers(available: list[str], gpu: GpuOptions) -> list:
    """The providers to ask ONNX Runtime for, best first, among `available`: TensorRT (with its engine
    cache, FP16 and workspace limit), CUDA, CPU."""
    from edge.inference.cuda import gpu_device_present

    if not gpu_device_present():
        # onnxruntime-gpu lists its CUDA and TensorRT providers on any machine; asked for them without a
        # device it prints provider-library and CUDA errors at every start before falling back to the CPU.
        return ["CPUExecutionProvider"]
    providers: list = []
    if "TensorrtExecutionProvider" in available:
        providers.append(("TensorrtExecutionProvider", {
            "trt_engine_cache_enable": True, "trt_engine_cache_path": str(gpu.engine_cache),
            "trt_timing_cache_enable": True, "trt_timing_cache_path": str(gpu.engine_cache),
            "trt_fp16_enable": gpu.fp16, "trt_max_workspace_size": gpu.workspace_mb << 20}))
    providers += [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    return providers


class OnnxRuntimeBackend:
    """The pack encoder in an ONNX Runtime session. Providers: TensorRT/CUDA when present, else CPU."""

    def __init__(self, pack: Pack, providers: list | None = None, threads: int | None = None,
                 path=None, output: str | None = None, output_shape: tuple[int, int, int] | None = None,
                 gpu: GpuOptions | None = None):
        """`path`, `output`, `output_shape`: another graph on the pack's input (a station's student)."""
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise EdgeError(f"ONNX Runtime is not installed: pip install 'anomaly-edge[cpu]' (or [gpu] on a CUDA "
                            f"machine) ({e})") from None

        path = path or pack.file(pack.encoder.file)
        self.output_name = output or pack.encoder.output
        self.output_shape = tuple(output_shape or pack.encoder.feature_shape)
        self.gpu = gpu or GpuOptions()
        available = ort.get_available_providers()
        if providers is None:
            providers = onnxruntime_providers(available, self.gpu)
            if "TensorrtExecutionProvider" in available:
                self.gpu.engine_cache.mkdir(parents=True, exist_ok=True)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # ORT's worker threads otherwise spin-wait after each run and steal the cores that the
        # nearest-neighbour GEMM (BLAS) needs right after the encoder.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        env_threads = os.environ.get("ANOMALY_EDGE_THREADS")
        if threads is None and env_threads:
            if not env_threads.isdigit() or int(env_threads) < 1:
                raise EdgeError(f"ANOMALY_EDGE_THREADS={env_threads!r}: expected a positive integer")
            threads = int(env_threads)
        if threads:
            opts.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types
            raise PackError(f"{path}: ONNX Runtime could not load the encoder: {e}") from None
        self.name = "onnxruntime:" + ",".join(self.session.get_providers())
        # What the threshold depends on: TensorRT's provider (FP16 when asked) computes otherwise than
        # the CUDA and CPU providers, which agree to float32 rounding.
        if "TensorrtExecutionProvider" in self.session.get_providers():
            self.family, self.precision = "onnxruntime-tensorrt", "fp16" if self.gpu.fp16 else "fp32"
        else:
            self.family, self.precision = "onnxruntime", "fp32"
        self._check_shapes(pack, path)
        self.input_name = pack.input.name
        log.debug("encoder %s on %s", path.name, self.name)  # the station's start line says it once

    @property
    def numerics(self) -> str:
        return f"{self.family} {self.precision}"

    def _check_shapes(self, pack: Pack, path) -> None:
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        outputs = {o.name: o.shape for o in self.session.get_outputs()}
        spec = pack.input
        if spec.name not in inputs:
            raise PackError(f"{path}: has no input '{spec.name}' (inputs: {sorted(inputs)})")
        want_in = (spec.channels, spec.height, spec.width)
        got_in = inputs[spec.name]
        if len(got_in) != 4 or not all(dim_matches(d, w) for d, w in zip(got_in[1:], want_in)):
            raise PackError(f"{path}: input '{spec.name}' has shape {got_in}, pack.yaml says N x {want_in}")
        if spec.size_multiple is not None and any(isinstance(d, int) for d in got_in[2:]):
            raise PackError(f"{path}: input '{spec.name}' has a fixed size {got_in[2:]}, but pack.yaml says the "
                            f"encoder takes any multiple of {spec.size_multiple} (input.size_multiple): export it "
                            "with dynamic height and width, or drop size_multiple")
        out = self.output_name
        if out not in outputs:
            raise PackError(f"{path}: has no output '{out}' (outputs: {sorted(outputs)})")
        got_out = outputs[out]
        want_out = self.output_shape
        if len(got_out) != 4 or not all(dim_matches(d, w) for d, w in zip(got_out[1:], want_out)):
            raise PackError(f"{path}: output '{out}' has shape {got_out}, expected N x {want_out}")
        if not all(isinstance(d, int) for d in got_out[1:]):
            # Symbolic output dims (a graph with dynamic height and width): one blank frame shows what it gives.
            ran = self.session.run([out], {spec.name: np.zeros((1, *want_in), np.float32)})[0].shape
            if tuple(ran[1:]) != tuple(want_out):
                raise PackError(f"{path}: output '{out}' of a {spec.height}x{spec.width} frame has shape "
                                f"{list(ran[1:])}, expected {list(want_out)}")

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.run_outputs(batch, [self.output_name])[0]

    def run_outputs(self, batch: np.ndarray, names: list[str]) -> list[np.ndarray]:
        return self.session.run(names, {self.input_name: np.ascontiguousarray(batch, np.float32)})


class EngineMismatch(PackError):
    """A TensorRT engine whose inputs or outputs (names, dtypes, shapes) are not what pack.yaml says."""


def expected_io(pack: Pack) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """Per-sample shapes of the encoder file's inputs and outputs that pack.yaml declares (all float32):
    the image input and the features, plus the zero-shot maps and image embedding of AnomalyGPT packs."""
    spec = pack.input
    inputs = {spec.name: (spec.channels, spec.height, spec.width)}
    outputs = {pack.encoder.output: tuple(pack.encoder.feature_shape)}
    zero_shot = getattr(pack.scorer, "zero_shot", None)
    if pack.scorer.kind == "anomalygpt" and zero_shot is not None:
        outputs[zero_shot.output] = (len(zero_shot.classes), spec.height, spec.width)
        outputs[zero_shot.embedding_output] = (zero_shot.embedding_dim,)
    return inputs, outputs


def engine_precision(pack: Pack) -> str:
    """The precision the pack's engine was built with (provenance.tensorrt.precision; fp32 if unsaid)."""
    return str((pack.manifest.provenance.get("tensorrt") or {}).get("precision", "fp32"))


def check_engine_io(engine, trt, pack: Pack, where) -> None:
    """Raise EngineMismatch naming the tensor when the engine's I/O differs from pack.yaml's."""
    inputs, outputs = expected_io(pack)
    found = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        mode = "input" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "output"
        found[name] = (mode, engine.get_tensor_dtype(name), tuple(engine.get_tensor_shape(name)))
    for mode, want in (("input", inputs), ("output", outputs)):
        for name, shape in want.items():
            if name not in found:
                names = sorted(n for n, f in found.items() if f[0] == mode)
                raise EngineMismatch(f"{where}: engine has no {mode} '{name}' that pack.yaml declares ({mode}s: {names})")
            got_mode, dtype, dims = found[name]
            if got_mode != mode:
                raise EngineMismatch(f"{where}: engine tensor '{name}' is an {got_mode}, pack.yaml has it as an {mode}")
            if dtype != trt.DataType.FLOAT:
                raise EngineMismatch(f"{where}: engine {mode} '{name}' is {dtype}, pack.yaml's encoder I/O is float32 "
                                     f"(build the engine with float32 I/O: anomaly-edge export engine)")
            # -1: the dynamic batch (or a dynamic dim the profile fixes); fixed ones must agree.
            if len(dims) != len(shape) + 1 or not all(d == -1 or d == w for d, w in zip(dims[1:], shape)):
                raise EngineMismatch(f"{where}: engine {mode} '{name}' has shape {dims}, pack.yaml says N x {shape}")


class TensorRtBackend:
    """The pack's TensorRT engine on the process's device thread (edge.inference.device), which owns the CUDA
    context: deserialization, buffers, the stream and every run happen there, whichever thread calls.
    Every output the engine has is bound (AnomalyGPT's vision.plan has three); batches larger than
    the optimization profile's maximum are run in slices. The engine's I/O is checked against
    pack.yaml when it is loaded (EngineMismatch names the tensor)."""

    family = "tensorrt"

    def __init__(self, pack: Pack, device=None):
        """`device`: a DeviceExecutor (default: edge.inference.device.cuda_executor(), the process's)."""
        key = f"{pack.encoder.file}_engine"
        if key not in pack.manifest.files:
            raise EdgeError(f"{pack.root}: the pack has no TensorRT engine (files.{key}); build one on this GPU")
        try:
            import pycuda.driver  # noqa: F401
            import tensorrt as trt
        except ImportError as e:
            raise EdgeError(f"TensorRT backend needs tensorrt and pycuda: {e}") from None
        if device is None:
            from edge.inference.device import cuda_executor

            device = cuda_executor()  # CudaUnavailable (an EdgeError) says why there is none
        self.device, self.trt = device, trt
        self.path = pack.file(key)
        self.input_name = pack.input.name
        self.inputs, self.outputs = expected_io(pack)
        self.output_name = pack.encoder.output
        self.precision = engine_precision(pack)
        self._buffers: dict[int, dict] = {}
        self.device.call(self._open, pack)
        self.name = f"tensorrt {trt.__version__}: {self.path.name}"

    @property
    def numerics(self) -> str:
        return f"{self.family} {self.precision}"

    def _open(self, pack: Pack) -> None:  # on the device thread
        import pycuda.driver as cuda

        trt = self.trt
        self.cuda = cuda
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise PackError(f"{self.path}: TensorRT could not deserialize the engine (built for another GPU or "
                            f"TensorRT version than {trt.__version__}?)")
        check_engine_io(self.engine, trt, pack, self.path)
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise EdgeError(f"{self.path}: TensorRT could not create an execution context (out of device memory?)")
        self.stream = cuda.Stream()
        self.max_batch = int(self.engine.get_tensor_profile_shape(self.input_name, 0)[2][0])

    def _buffers_for(self, n: int) -> dict:  # on the device thread
        if n not in self._buffers:
            bound = {}
            for name, shape in {**self.inputs, **self.outputs}.items():
                host = self.cuda.pagelocked_empty((n, *shape), np.float32)
                bound[name] = (self.cuda.mem_alloc(host.nbytes), host)
            self._buffers[n] = bound
        return self._buffers[n]

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.run_outputs(batch, [self.output_name])[0]

    def run_outputs(self, batch: np.ndarray, names: list[str]) -> list[np.ndarray]:
        if getattr(self, "closed", False):
            raise EdgeError(f"{self.name}: the engine was closed")
        unknown = [n for n in names if n not in self.outputs]
        if unknown:
            raise EdgeError(f"{self.name}: the engine has no output {unknown} (outputs: {sorted(self.outputs)})")
        batch = np.ascontiguousarray(batch, np.float32)
        return self.device.call(self._run_here, batch, list(names))

    def _run_here(self, batch: np.ndarray, names: list[str]) -> list[np.ndarray]:  # on the device thread
        parts = [self._run_slice(batch[i:i + self.max_batch], names) for i in range(0, len(batch), self.max_batch)]
        return [p[0] if len(parts) == 1 else np.concatenate(p) for p in zip(*parts)]

    def _run_slice(self, batch: np.ndarray, names: list[str]) -> list[np.ndarray]:
        bound = self._buffers_for(len(batch))
        if not self.context.set_input_shape(self.input_name, batch.shape):
            raise EdgeError(f"{self.name}: input '{self.input_name}' shape {batch.shape} is outside the engine's "
                            f"optimization profile (max batch {self.max_batch})")
        for name, (device_buffer, _) in bound.items():
            if not self.context.set_tensor_address(name, int(device_buffer)):
                raise EdgeError(f"{self.name}: TensorRT refused the device address of tensor '{name}'")
        inp, _ = bound[self.input_name]
        self.cuda.memcpy_htod_async(inp, batch, self.stream)
        if not self.context.execute_async_v3(self.stream.handle):
            raise EdgeError(f"{self.name}: execution failed")
        for name in names:
            device_buffer, host = bound[name]
            self.cuda.memcpy_dtoh_async(host, device_buffer, self.stream)
        self.stream.synchronize()
        return [bound[name][1].copy() for name in names]

    def close(self) -> None:
        """Free the engine, its context and buffers on the device thread."""
        self.closed = True
        self.device.release(self.__dict__, "_buffers", "context", "engine", "stream")

    def __del__(self):
        if "device" in self.__dict__:
            self.close()


def scoring_device(backend, bank=None) -> str:
    """One line for the start log: where the encoder and the nearest-neighbour search run, e.g.
    "scoring on CPU (onnxruntime CPUExecutionProvider; nearest-neighbour search on the CPU)"."""
    from edge.inference.cuda import GpuMemoryBank

    providers = backend.session.get_providers() if hasattr(backend, "session") else []
    if isinstance(backend, TensorRtBackend):
        where, encoder = "GPU", backend.name
    elif providers:
        used = providers[0]
        where, encoder = ("CPU" if used == "CPUExecutionProvider" else "GPU"), f"onnxruntime {used}"
    else:
        where, encoder = "CPU", getattr(backend, "name", type(backend).__name__)
    if bank is None:
        return f"scoring on {where} ({encoder})"
    search = "the GPU (nn_min.cu)" if isinstance(bank, GpuMemoryBank) else "the CPU"
    if where == "CPU" and isinstance(bank, GpuMemoryBank):
        where = "CPU and GPU"
    return f"scoring on {where} ({encoder}; nearest-neighbour search on {search})"


def create_backend(pack: Pack, kind: str = "auto", threads: int | None = None, gpu: GpuOptions | None = None) -> Backend:
    """The best backend for this pack: TensorRT when the pack has an engine and TensorRT runs here,
    else ONNX Runtime (with its TensorRT/CUDA providers where installed). Why TensorRT was passed over
    is logged; an engine that does not match pack.yaml (EngineMismatch) is an error, not a fallback."""
    if kind not in ("auto", "onnxruntime", "tensorrt"):
        raise ValueError(f"unknown backend '{kind}' (choose auto, onnxruntime or tensorrt)")
    if kind == "tensorrt":
        return TensorRtBackend(pack)
    if kind == "auto" and pack.native_size is not None and f"{pack.encoder.file}_engine" in pack.manifest.files:
        log.info("TensorRT engine not used: it was built for %dx%d frames and this station scores %dx%d ones "
                 "(ONNX Runtime)", *pack.native_size, pack.input.height, pack.input.width)
    elif kind == "auto" and f"{pack.encoder.file}_engine" in pack.manifest.files:
        try:
            return TensorRtBackend(pack)
        except EngineMismatch:
            raise
        except EdgeError as e:
            log.warning("TensorRT engine not used, falling back to ONNX Runtime: %s", e)
    return OnnxRuntimeBackend(pack, threads=threads, gpu=gpu)
