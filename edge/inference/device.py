"""The device executor: one thread that owns a station's CUDA context, where all its device work runs.

A CUDA context (pycuda's, TensorRT's buffers, the nn_min kernel's bank) is current on one thread at a
time; memory and engines made under it fail with "invalid device context" when touched from a thread
where it is not current. A station has a capture, a score and a maintenance thread (enrollment and
reload build new banks), so instead of pushing and popping around every call, every device call is
handed to one thread that pushed the context once and keeps it:

    device = cuda_executor()                     # the process's device thread (CudaUnavailable: why not)
    engine = device.call(load_engine, path)      # runs on the device thread, returns or raises here
    device.call(engine.run, batch)               # from any thread

`DeviceExecutor(open_context)` is the mechanism with any context opener (tests give it a CPU stand-in);
`cuda_executor()` is the process-wide one with pycuda's primary context of device
ANOMALY_EDGE_CUDA_DEVICE (default 0), shared with ONNX Runtime's CUDA provider.
"""
from __future__ import annotations

import atexit
import concurrent.futures
import logging
import os
import queue
import threading
from collections.abc import Callable

from edge.errors import EdgeError

log = logging.getLogger(__name__)


class CudaUnavailable(EdgeError):
    """No usable CUDA here (no pycuda, no driver, no device or no nvcc); the message says which."""


class DeviceClosed(EdgeError):
    """The device executor was closed; nothing more runs on it."""


class DeviceExecutor:
    """A thread that opens a context (`open_context()` returns the function that closes it, or None)
    and then runs the calls it is handed, one at a time, in order. `call` blocks the caller until its
    call has run and returns its result or raises its exception; a call made from the device thread
    itself (a device function calling another) runs directly."""

    def __init__(self, open_context: Callable[[], Callable[[], None] | None], name: str = "edge-device"):
        self.name = name
        self._open_context = open_context
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._ready = threading.Event()
        self._open_error: BaseException | None = None
        self._closed = False
        self._close_lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._open_error is not None:
            self._thread.join()
            raise self._open_error

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def on_device_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def _loop(self) -> None:
        try:
            close_context = self._open_context()
        except BaseException as e:  # reported to the constructor's caller
            self._open_error = e
            self._ready.set()
            return
        self._ready.set()
        try:
            while True:
                job = self._jobs.get()
                if job is None:
                    break
                fn, args, kwargs, future = job
                if not future.set_running_or_notify_cancel():
                    continue
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as e:
                    future.set_exception(e)
                del job, fn, args, kwargs, future  # what a call held is dropped here, on this thread
        finally:
            if close_context is not None:
                try:
                    close_context()
                except Exception as e:  # closing must not hide why the loop ended
                    log.warning("%s: closing the device context failed: %s", self.name, e)

    def call(self, fn: Callable, *args, **kwargs):
        """fn(*args, **kwargs) on the device thread; its result, or its exception raised here."""
        if self.on_device_thread():
            return fn(*args, **kwargs)
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._close_lock:
            if self._closed:
                raise DeviceClosed(f"{self.name}: the device executor is closed; cannot run {_name(fn)}")
            self._jobs.put((fn, args, kwargs, future))
        return future.result()

    def release(self, namespace: dict, *keys: str) -> None:
        """Pop `keys` from `namespace` (an object's __dict__) on the device thread, without waiting, so
        that device memory they hold is freed where its context is current (the caller keeps no other
        reference). After close() they are popped here: the context is gone with its memory."""
        if not self.on_device_thread():
            with self._close_lock:
                if not self._closed:
                    self._jobs.put((_pop, (namespace, keys), {}, concurrent.futures.Future()))
                    return
        _pop(namespace, keys)

    def close(self, timeout: float | None = 10.0) -> None:
        """Run what was already handed over, close the context, end the thread. Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            self._jobs.put(None)
        if not self.on_device_thread():
            self._thread.join(timeout)


def _pop(namespace: dict, keys) -> None:
    for key in keys:
        namespace.pop(key, None)


def _name(fn) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


def _open_primary_context() -> Callable[[], None]:
    """Make the device's primary context current on this (the device) thread; returns its closer."""
    try:
        import pycuda.driver as cuda
    except ImportError as e:
        raise CudaUnavailable(f"pycuda is not installed (pip install 'anomaly-edge[gpu]'): {e}") from None
    index = os.environ.get("ANOMALY_EDGE_CUDA_DEVICE", "0")
    if not index.isdigit():
        raise CudaUnavailable(f"ANOMALY_EDGE_CUDA_DEVICE={index!r}: expected a device number")
    try:
        cuda.init()
        device = cuda.Device(int(index))
        context = device.retain_primary_context()
        context.push()
    except Exception as e:  # pycuda raises its own errors when there is no driver or device
        raise CudaUnavailable(f"no CUDA device {index}: {type(e).__name__}: {e}") from None
    log.info("CUDA context of device %s (%s) owned by thread %s", index, device.name(), threading.current_thread().name)

    def close() -> None:
        cuda.Context.pop()
        context.detach()

    return close


_executor: DeviceExecutor | None = None
_executor_error: CudaUnavailable | None = None
_executor_lock = threading.Lock()


def cuda_executor() -> DeviceExecutor:
    """The process's CUDA device thread, started on first use. Raises CudaUnavailable (the same reason
    on every call) where there is no pycuda, driver or device."""
    global _executor, _executor_error
    with _executor_lock:
        if _executor is None:
            if _executor_error is not None:
                raise _executor_error
            try:
                _executor = DeviceExecutor(_open_primary_context, name="edge-cuda")
            except CudaUnavailable as e:
                _executor_error = e
                raise
            atexit.register(close_cuda_executor)  # the context is closed on its own thread at exit
        return _executor


def close_cuda_executor() -> None:
    """Close the process's device thread if one was started (the next cuda_executor() opens anew)."""
    global _executor, _executor_error
    with _executor_lock:
        executor, _executor, _executor_error = _executor, None, None
    if executor is not None:
        executor.close()
