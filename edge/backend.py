"""Backends run the pack's encoder: `run(batch) -> features`. ONNX Runtime everywhere; TensorRT where
the pack carries an engine (`files.<encoder>_engine`) and tensorrt + pycuda import on a GPU.

The interface is deliberately small (OpenVINO model_api's adapter idea): a backend knows its input
and output shapes and turns an N x C x H x W float32 batch into the pack's feature tensor.
"""
from __future__ import annotations

import logging
import os
from typing import Protocol

import numpy as np

from .errors import EdgeError, PackError
from .pack import Pack

log = logging.getLogger(__name__)


class Backend(Protocol):
    name: str

    def run(self, batch: np.ndarray) -> np.ndarray:
        """N x C x H x W float32 -> N x C' x h x w float32 features."""
        ...

    def run_outputs(self, batch: np.ndarray, names: list[str]) -> list[np.ndarray]:
        """The named outputs of one run, for packs whose encoder has more than the features."""
        ...


def dim_matches(declared, expected: int) -> bool:
    # Symbolic (str) or unknown (None) dims accept anything; fixed ones must agree.
    return not isinstance(declared, int) or declared == expected


class OnnxRuntimeBackend:
    """The pack encoder in an ONNX Runtime session. Providers: CUDA/TensorRT when present, else CPU."""

    def __init__(self, pack: Pack, providers: list[str] | None = None, threads: int | None = None,
                 path=None, output: str | None = None, output_shape: tuple[int, int, int] | None = None):
        """`path`, `output`, `output_shape`: another graph on the pack's input (a station's student)."""
        import onnxruntime as ort

        path = path or pack.file(pack.encoder.file)
        self.output_name = output or pack.encoder.output
        self.output_shape = tuple(output_shape or pack.encoder.feature_shape)
        available = ort.get_available_providers()
        if providers is None:
            preferred = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
            providers = [p for p in preferred if p in available]
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
        self._check_shapes(pack, path)
        self.input_name = pack.input.name
        log.info("encoder %s on %s", path.name, self.name)

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
        out = self.output_name
        if out not in outputs:
            raise PackError(f"{path}: has no output '{out}' (outputs: {sorted(outputs)})")
        got_out = outputs[out]
        want_out = self.output_shape
        if len(got_out) != 4 or not all(dim_matches(d, w) for d, w in zip(got_out[1:], want_out)):
            raise PackError(f"{path}: output '{out}' has shape {got_out}, expected N x {want_out}")

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.run_outputs(batch, [self.output_name])[0]

    def run_outputs(self, batch: np.ndarray, names: list[str]) -> list[np.ndarray]:
        return self.session.run(names, {self.input_name: np.ascontiguousarray(batch, np.float32)})


class TensorRtBackend:
    """The pack's TensorRT engine: deserialized for this GPU, device buffers held with pycuda, one CUDA
    stream, asynchronous copies and execution. Batches larger than the optimization profile's maximum
    are run in slices."""

    def __init__(self, pack: Pack):
        key = f"{pack.encoder.file}_engine"
        if key not in pack.manifest.files:
            raise EdgeError(f"{pack.root}: the pack has no TensorRT engine (files.{key}); build one on this GPU")
        try:
            import pycuda.autoprimaryctx  # noqa: F401  (shares the device's primary context)
            import pycuda.driver as cuda
            import tensorrt as trt
        except ImportError as e:
            raise EdgeError(f"TensorRT backend needs tensorrt and pycuda: {e}") from None
        except Exception as e:  # pycuda: no driver or device
            raise EdgeError(f"TensorRT backend: no CUDA device ({e})") from None
        path = pack.file(key)
        self.cuda, self.trt = cuda, trt
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise PackError(f"{path}: TensorRT could not deserialize the engine (built for another GPU or "
                            f"TensorRT version than {trt.__version__}?)")
        self.context = self.engine.create_execution_context()
        self.stream = cuda.Stream()
        self.input_name = pack.input.name
        self.output_name = pack.encoder.output
        self.max_batch = int(self.engine.get_tensor_profile_shape(self.input_name, 0)[2][0])
        self.feature_shape = tuple(pack.encoder.feature_shape)
        self._buffers: dict[int, tuple] = {}
        self.name = f"tensorrt {trt.__version__}: {path.name}"

    def _buffers_for(self, n: int):
        if n not in self._buffers:
            c, h, w = self.context.engine.get_tensor_shape(self.input_name)[1:]
            inp = self.cuda.mem_alloc(n * c * h * w * 4)
            out_host = self.cuda.pagelocked_empty((n, *self.feature_shape), np.float32)
            out = self.cuda.mem_alloc(out_host.nbytes)
            self._buffers[n] = (inp, out, out_host)
        return self._buffers[n]

    def run(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, np.float32)
        parts = [self._run_slice(batch[i:i + self.max_batch]) for i in range(0, len(batch), self.max_batch)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _run_slice(self, batch: np.ndarray) -> np.ndarray:
        inp, out, out_host = self._buffers_for(len(batch))
        self.context.set_input_shape(self.input_name, batch.shape)
        self.context.set_tensor_address(self.input_name, int(inp))
        self.context.set_tensor_address(self.output_name, int(out))
        self.cuda.memcpy_htod_async(inp, batch, self.stream)
        if not self.context.execute_async_v3(self.stream.handle):
            raise EdgeError(f"{self.name}: execution failed")
        self.cuda.memcpy_dtoh_async(out_host, out, self.stream)
        self.stream.synchronize()
        return out_host.copy()

    def run_outputs(self, batch: np.ndarray, names: list[str]) -> list[np.ndarray]:
        if names != [self.output_name]:
            raise EdgeError(f"{self.name}: only the encoder output '{self.output_name}' is bound, not {names}")
        return [self.run(batch)]


def create_backend(pack: Pack, kind: str = "auto", threads: int | None = None) -> Backend:
    """The best backend for this pack: TensorRT when the pack has an engine and TensorRT runs here,
    else ONNX Runtime (with its CUDA provider where installed). Why TensorRT was passed over is logged."""
    if kind not in ("auto", "onnxruntime", "tensorrt"):
        raise ValueError(f"unknown backend '{kind}' (choose auto, onnxruntime or tensorrt)")
    if kind == "tensorrt":
        return TensorRtBackend(pack)
    if kind == "auto" and f"{pack.encoder.file}_engine" in pack.manifest.files:
        try:
            return TensorRtBackend(pack)
        except EdgeError as e:
            log.warning("TensorRT engine not used, falling back to ONNX Runtime: %s", e)
    return OnnxRuntimeBackend(pack, threads=threads)
