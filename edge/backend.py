"""Backends run the pack's encoder: `run(batch) -> features`. ONNX Runtime here; TensorRT later.

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


def create_backend(pack: Pack, kind: str = "auto", threads: int | None = None) -> Backend:
    """The best backend available for this pack. Only ONNX Runtime exists so far."""
    if kind not in ("auto", "onnxruntime"):
        raise ValueError(f"unknown backend '{kind}' (choose auto or onnxruntime)")
    return OnnxRuntimeBackend(pack, threads=threads)
