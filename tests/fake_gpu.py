"""Stand-ins for the `tensorrt` (10.x or 11.x API surface) and `pycuda` bindings, for testing OUR code's
version branches, I/O checks and threading on a machine without a GPU. They are not TensorRT: they
reproduce the API surface our code calls and the behaviour it depends on, nothing more:

- pycuda: a context is current on the thread that pushed it only; device memory, streams, page-locked
  memory and engines touched from a thread where no context is current raise "invalid device context"
  (as the real driver does), and device memory freed from such a thread is recorded in OFF_CONTEXT_FREES
  (pycuda prints a warning there). Device memory is host memory behind integer addresses, so pointer
  arithmetic (a channel group's offset into a bank row) works. `nn_min_sqdist` is the one kernel.
- tensorrt 10: BuilderFlag.FP16 exists; 11: it does not (weak typing removed), networks are strongly
  typed. The builder "parses" the ONNX file with onnx (I/O names, dtypes, shapes), and the engine it
  serializes runs that ONNX file with ONNX Runtime on the CPU, reading and writing the fake device
  memory at the addresses bound with set_tensor_address: real outputs through our binding code.

`install(monkeypatch, "10.13.0")` puts both into sys.modules for one test.
"""
from __future__ import annotations

import itertools
import json
import sys
import threading
import types
from pathlib import Path

import numpy as np

OFF_CONTEXT_FREES: list[str] = []


class LogicError(RuntimeError):
    pass


# -- pycuda.driver ------------------------------------------------------------------------------------

_local = threading.local()
_memory: dict[int, np.ndarray] = {}  # base address -> bytes
_memory_lock = threading.Lock()
_next_address = itertools.count(1 << 20, 1 << 28)


def _stack() -> list:
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack


def _require_context(what: str) -> "Context":
    if not _stack():
        raise LogicError(f"{what} failed: invalid device context")
    return _stack()[-1]


def _view(address: int, nbytes: int) -> np.ndarray:
    with _memory_lock:
        for base, buf in _memory.items():
            if base <= address and address + nbytes <= base + buf.size:
                return buf[address - base:address - base + nbytes]
    raise LogicError(f"address {address:#x} (+{nbytes}) is not device memory: an illegal memory access")


class DeviceAllocation:
    def __init__(self, nbytes: int):
        _require_context("cuMemAlloc")
        self.address = next(_next_address)
        with _memory_lock:
            _memory[self.address] = np.zeros(max(int(nbytes), 1), np.uint8)

    def __int__(self) -> int:
        return self.address

    def free(self) -> None:
        with _memory_lock:
            if self.address not in _memory:
                return
        if not _stack():
            OFF_CONTEXT_FREES.append(f"{self.address:#x} freed on thread {threading.current_thread().name}")
        with _memory_lock:
            _memory.pop(self.address, None)

    def __del__(self):
        self.free()


class Context:
    def __init__(self, device: "Device"):
        self.device = device

    def push(self) -> None:
        _stack().append(self)

    @staticmethod
    def pop() -> None:
        if not _stack():
            raise LogicError("cuCtxPopCurrent failed: invalid device context")
        _stack().pop()

    def detach(self) -> None:
        pass

    @staticmethod
    def get_device() -> "Device":
        return _require_context("cuCtxGetDevice").device


class Device:
    def __init__(self, index: int):
        if index != 0:
            raise LogicError(f"cuDeviceGet failed: invalid device ordinal {index}")

    def name(self) -> str:
        return "Fake GPU (tests/fake_gpu.py)"

    def compute_capability(self) -> tuple[int, int]:
        return 9, 0

    def retain_primary_context(self) -> Context:
        return Context(self)


class Stream:
    _handles = itertools.count(1)

    def __init__(self):
        _require_context("cuStreamCreate")
        self.handle = next(self._handles)

    def synchronize(self) -> None:
        _require_context("cuStreamSynchronize")


def init() -> None:
    pass


def mem_alloc(nbytes: int) -> DeviceAllocation:
    return DeviceAllocation(nbytes)


def pagelocked_empty(shape, dtype) -> np.ndarray:
    _require_context("cuMemHostAlloc")
    return np.empty(shape, dtype)


def memcpy_htod_async(dst, src: np.ndarray, stream=None) -> None:
    _require_context("cuMemcpyHtoDAsync")
    data = np.ascontiguousarray(src).view(np.uint8).reshape(-1)
    _view(int(dst), data.size)[:] = data


def memcpy_dtoh_async(dst: np.ndarray, src, stream=None) -> None:
    _require_context("cuMemcpyDtoHAsync")
    out = dst.view(np.uint8).reshape(-1)
    out[:] = _view(int(src), out.size)


def _floats(address: int, count: int) -> np.ndarray:
    return _view(int(address), count * 4).view(np.float32)


def _nn_min_sqdist(q, n, ldq, bank, bank_sq, m, ldb, c, out, block=None, grid=None, stream=None):
    """kernels/nn_min.cu's contract: out[i] = max(min_j bank_sq[j] - 2 q_i.b_j + |q_i|^2, 0) over the
    first c channels of rows with strides ldq and ldb (floats) from the given addresses."""
    _require_context("cuLaunchKernel")
    n, ldq, m, ldb, c = int(n), int(ldq), int(m), int(ldb), int(c)
    qs = np.lib.stride_tricks.as_strided(_floats(int(q), (n - 1) * ldq + c), (n, c), (ldq * 4, 4))
    bs = np.lib.stride_tricks.as_strided(_floats(int(bank), (m - 1) * ldb + c), (m, c), (ldb * 4, 4))
    sq = _floats(int(bank_sq), m)
    d = (sq[None, :] - 2 * qs.astype(np.float64) @ bs.T.astype(np.float64)).min(1) + (qs.astype(np.float64) ** 2).sum(1)
    _floats(int(out), n)[:] = np.maximum(d, 0).astype(np.float32)


class Module:
    def __init__(self, path: str):
        _require_context("cuModuleLoad")
        if not Path(path).is_file():
            raise LogicError(f"cuModuleLoad failed: file not found: {path}")

    def get_function(self, name: str):
        _require_context("cuModuleGetFunction")
        if name != "nn_min_sqdist":
            raise LogicError(f"cuModuleGetFunction failed: named symbol not found: {name}")
        return _nn_min_sqdist


def module_from_file(path: str) -> Module:
    return Module(path)


# -- pycuda.gpuarray ----------------------------------------------------------------------------------

class GPUArray:
    def __init__(self, shape, dtype):
        self.shape, self.dtype = tuple(np.atleast_1d(shape)), np.dtype(dtype)
        self.gpudata = DeviceAllocation(int(np.prod(self.shape)) * self.dtype.itemsize)

    def get(self) -> np.ndarray:
        out = np.empty(self.shape, self.dtype)
        memcpy_dtoh_async(out, self.gpudata)
        return out


def to_gpu(array: np.ndarray) -> GPUArray:
    g = GPUArray(array.shape, array.dtype)
    memcpy_htod_async(g.gpudata, array)
    return g


def to_gpu_async(array: np.ndarray, stream=None) -> GPUArray:
    return to_gpu(array)


def empty(shape, dtype) -> GPUArray:
    return GPUArray(shape, dtype)


# -- tensorrt ------------------------------------------------------------------------------------------

def _tensorrt_module(version: str) -> types.ModuleType:
    import enum

    major = int(version.split(".")[0])
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.BUILT: list[dict] = []  # what each build_serialized_network call was asked for

    class Logger:
        WARNING = 2

        def __init__(self, severity=2):
            self.severity = severity

    class DataType(enum.Enum):
        FLOAT = 0
        HALF = 1
        INT64 = 10

    class TensorIOMode(enum.Enum):
        NONE = 0
        INPUT = 1
        OUTPUT = 2

    class NetworkDefinitionCreationFlag(enum.IntEnum):
        STRONGLY_TYPED = 1

    class MemoryPoolType(enum.Enum):
        WORKSPACE = 0

    if major >= 11:  # weak typing removed: no precision flags
        BuilderFlag = enum.Enum("BuilderFlag", {"DEBUG": 0, "REFIT": 3, "SPARSE_WEIGHTS": 6})
    else:
        BuilderFlag = enum.Enum("BuilderFlag", {"FP16": 0, "INT8": 1, "DEBUG": 2, "REFIT": 3, "STRONGLY_TYPED_X": 9})

    onnx_dtypes = {1: DataType.FLOAT, 10: DataType.HALF, 7: DataType.INT64}

    class Network:
        def __init__(self, flags: int):
            self.flags = flags
            self.io: list[dict] = []
            self.onnx = None

    class OnnxParser:
        def __init__(self, network: Network, logger):
            self.network = network
            self.num_errors = 0

        def parse_from_file(self, path: str) -> bool:
            import onnx

            model = onnx.load(path)
            net = self.network
            net.onnx = str(path)
            net.onnx_bytes = Path(path).read_bytes()
            net.input_types = [i.type.tensor_type.elem_type for i in model.graph.input]
            net.float16_nodes = sum(1 for n in model.graph.node for a in n.attribute
                                    if n.op_type == "Cast" and a.name == "to" and a.i == 10)
            for mode, values in (("input", model.graph.input), ("output", model.graph.output)):
                for v in values:
                    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]
                    net.io.append({"name": v.name, "mode": mode, "dtype": onnx_dtypes[v.type.tensor_type.elem_type].name,
                                   "shape": [-1, *dims[1:]]})
            return True

        def get_error(self, i):
            return ""

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = [list(lo), list(opt), list(hi)]

    class BuilderConfig:
        def __init__(self):
            self.flags, self.pools, self.profiles = set(), {}, []

        def set_flag(self, flag) -> None:
            self.flags.add(flag.name)

        def set_memory_pool_limit(self, pool, size: int) -> None:
            self.pools[pool.name] = int(size)

        def add_optimization_profile(self, profile) -> int:
            self.profiles.append(profile)
            return len(self.profiles) - 1

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags: int = 0) -> Network:
            if major < 11 and flags & ~(1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)):
                raise TypeError(f"unknown network flags {flags}")
            return Network(flags)

        def create_builder_config(self) -> BuilderConfig:
            return BuilderConfig()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Network, config: BuilderConfig) -> bytes:
            strongly = major >= 11 or bool(network.flags & (1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)))
            record = {"version": version, "onnx": network.onnx, "io": network.io, "strongly_typed": strongly,
                      "flags": sorted(config.flags), "pools": config.pools,
                      "profile": config.profiles[0].shapes if config.profiles else {},
                      "input_types": network.input_types, "float16_casts": network.float16_nodes}
            trt.BUILT.append(record)
            return json.dumps(record).encode() + b"\n" + network.onnx_bytes  # the "engine" runs this graph

    class Engine:
        def __init__(self, record: dict, graph: bytes):
            self.record, self.graph = record, graph
            self.io = record["io"]
            self.num_io_tensors = len(self.io)

        def _tensor(self, name):
            for t in self.io:
                if t["name"] == name:
                    return t
            raise KeyError(name)

        def get_tensor_name(self, i: int) -> str:
            return self.io[i]["name"]

        def get_tensor_mode(self, name: str):
            return TensorIOMode.INPUT if self._tensor(name)["mode"] == "input" else TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name: str):
            return DataType[self._tensor(name)["dtype"]]

        def get_tensor_shape(self, name: str):
            return tuple(self._tensor(name)["shape"])

        def get_tensor_profile_shape(self, name: str, profile: int):
            return [tuple(s) for s in self.record["profile"][name]]

        def create_execution_context(self):
            _require_context("createExecutionContext")
            return ExecutionContext(self)

    class ExecutionContext:
        def __init__(self, engine: Engine):
            import onnxruntime as ort

            self.engine = engine
            self.addresses: dict[str, int] = {}
            self.shapes: dict[str, tuple] = {}
            self.session = ort.InferenceSession(engine.graph, providers=["CPUExecutionProvider"])

        def set_input_shape(self, name: str, shape) -> bool:
            t = next((t for t in self.engine.io if t["name"] == name and t["mode"] == "input"), None)
            hi = self.engine.record["profile"].get(name, [[0]] * 3)[2]
            if t is None or len(shape) != len(hi) or any(s > h for s, h in zip(shape, hi)):
                return False
            self.shapes[name] = tuple(shape)
            return True

        def set_tensor_address(self, name: str, address: int) -> bool:
            if not any(t["name"] == name for t in self.engine.io):
                return False
            self.addresses[name] = int(address)
            return True

        def execute_async_v3(self, stream_handle: int) -> bool:
            _require_context("enqueueV3")
            missing = [t["name"] for t in self.engine.io if t["name"] not in self.addresses]
            if missing:
                raise LogicError(f"enqueueV3: tensors without an address: {missing}")
            feeds = {}
            for t in self.engine.io:
                if t["mode"] == "input":
                    shape = self.shapes[t["name"]]
                    feeds[t["name"]] = _floats(self.addresses[t["name"]], int(np.prod(shape))).reshape(shape).copy()
            outputs = [t["name"] for t in self.engine.io if t["mode"] == "output"]
            for name, value in zip(outputs, self.session.run(outputs, feeds)):
                value = np.ascontiguousarray(value, np.float32)
                _floats(self.addresses[name], value.size)[:] = value.reshape(-1)
            return True

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data: bytes):
            _require_context("deserializeCudaEngine")
            header, _, graph = bytes(data).partition(b"\n")
            try:
                record = json.loads(header)
            except ValueError:
                return None
            if record.get("version") != version:
                return None  # built with another TensorRT version
            return Engine(record, graph)

    for name, value in list(locals().items()):
        if isinstance(value, type) or name in ("onnx_dtypes",):
            setattr(trt, name, value)
    return trt


def install(monkeypatch, tensorrt_version: str | None = "10.13.0", pycuda: bool = True) -> types.ModuleType | None:
    """Put the stand-ins into sys.modules for one test (monkeypatch undoes it); returns the tensorrt."""
    for name in list(sys.modules):
        if name == "tensorrt" or name.startswith("pycuda"):
            monkeypatch.delitem(sys.modules, name)
    trt = None
    if tensorrt_version is not None:
        trt = _tensorrt_module(tensorrt_version)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
    if pycuda:
        this = sys.modules[__name__]
        package = types.ModuleType("pycuda")
        driver = types.ModuleType("pycuda.driver")
        for name in ("init", "Device", "Context", "Stream", "mem_alloc", "pagelocked_empty", "memcpy_htod_async",
                     "memcpy_dtoh_async", "module_from_file", "LogicError", "DeviceAllocation"):
            setattr(driver, name, getattr(this, name))
        gpuarray = types.ModuleType("pycuda.gpuarray")
        for name in ("to_gpu", "to_gpu_async", "empty", "GPUArray"):
            setattr(gpuarray, name, getattr(this, name))
        package.driver, package.gpuarray = driver, gpuarray
        for name, module in (("pycuda", package), ("pycuda.driver", driver), ("pycuda.gpuarray", gpuarray)):
            monkeypatch.setitem(sys.modules, name, module)
    return trt
