"""Everything that touches pycuda, in one module (one thread owns the CUDA context: docs/architecture.md).

- :func:`query_gpu`: name, compute capability, SM count and driver version of a device (no context);
- :class:`CudaContext`: a context created on, pushed by and only ever used from the calling thread;
- :class:`HostDeviceBuffer`: a page-locked host array and a device allocation of the same size;
- :class:`Stream`: one CUDA stream with asynchronous copies.

pycuda API used (pycuda ``driver`` module, https://documen.tician.de/pycuda/driver.html): ``init``,
``Device(i).name()/.compute_capability()/.get_attribute(device_attribute.MULTIPROCESSOR_COUNT)``,
``get_driver_version``, ``Device.retain_primary_context``/``Context.push``/``pop``/``detach``,
``pagelocked_empty``, ``mem_alloc``,
``memcpy_htod_async``/``memcpy_dtoh_async``, ``Stream().synchronize()``/``.handle``. Nothing here runs
without a GPU; it is covered by the tests marked ``gpu``.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
from retinaedge.runtime.backends.tensorrt.errors import MissingExtraError, NoCudaDeviceError

log = logging.getLogger(__name__)


def _driver() -> Any:
    try:
        import pycuda.driver as cuda
    except ImportError as exc:
        raise MissingExtraError("pycuda") from exc
    try:
        cuda.init()
    except Exception as exc:  # pycuda.driver.Error subclasses; the driver may be missing entirely
        raise NoCudaDeviceError(f"the CUDA driver did not initialise: {exc}") from exc
    return cuda


@dataclass(frozen=True)
class GpuFacts:
    """One CUDA device as the driver reports it; ``cuda_version`` is the driver's ``"12.6"``."""

    name: str
    compute_capability: str
    sm_count: int
    cuda_version: str


def query_gpu(index: int = 0) -> GpuFacts:
    """Facts about device ``index``; raises :class:`NoCudaDeviceError` when there is no such device."""
    cuda = _driver()
    count = cuda.Device.count()
    if index >= count:
        raise NoCudaDeviceError(f"CUDA device {index} requested but {count} device(s) found")
    dev = cuda.Device(index)
    major, minor = dev.compute_capability()
    version = int(cuda.get_driver_version())  # e.g. 12060
    return GpuFacts(
        name=str(dev.name()),
        compute_capability=f"{major}.{minor}",
        sm_count=int(dev.get_attribute(cuda.device_attribute.MULTIPROCESSOR_COUNT)),
        cuda_version=f"{version // 1000}.{(version % 1000) // 10}",
    )


class CudaContext:
    """The device's primary CUDA context, made current on the creating thread; every later call must come
    from that thread. The primary context is the one TensorRT's builder and runtime (CUDA runtime API)
    use, so there is one context per process, not two (memory is scarce on a Jetson)."""

    def __init__(self, index: int = 0) -> None:
        self._cuda = _driver()
        self._ctx = self._cuda.Device(index).retain_primary_context()
        self._ctx.push()
        self._thread = threading.get_ident()
        log.info("CUDA context created on device %d (thread %s)", index, threading.current_thread().name)

    def check_thread(self) -> None:
        """Raise RuntimeError when called from a thread that does not own the context."""
        if threading.get_ident() != self._thread:
            raise RuntimeError("the CUDA context is used from a thread that does not own it")

    def stream(self) -> Stream:
        self.check_thread()
        return Stream(self._cuda)

    def buffer(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> HostDeviceBuffer:
        self.check_thread()
        return HostDeviceBuffer(self._cuda, shape, dtype)

    def close(self) -> None:
        """Pop the context and release this retain of it (from the owning thread)."""
        if self._ctx is not None:
            self.check_thread()
            self._ctx.pop()
            self._ctx.detach()
            self._ctx = None


class Stream:
    """One CUDA stream; ``handle`` is what ``execute_async_v3`` takes."""

    def __init__(self, cuda: Any) -> None:
        self._cuda = cuda
        self._stream = cuda.Stream()

    @property
    def handle(self) -> int:
        return int(self._stream.handle)

    def upload(self, buf: HostDeviceBuffer, nbytes: int) -> None:
        """Copy the first ``nbytes`` of the pinned host array to the device, asynchronously."""
        self._cuda.memcpy_htod_async(buf.device, buf.host.reshape(-1).view(np.uint8)[:nbytes], self._stream)

    def download(self, buf: HostDeviceBuffer, nbytes: int) -> None:
        """Copy the first ``nbytes`` of the device allocation back to the pinned host array."""
        self._cuda.memcpy_dtoh_async(buf.host.reshape(-1).view(np.uint8)[:nbytes], buf.device, self._stream)

    def synchronize(self) -> None:
        self._stream.synchronize()


class HostDeviceBuffer:
    """Page-locked host array ``host`` (``shape``, ``dtype``) and a device allocation of its size."""

    def __init__(self, cuda: Any, shape: tuple[int, ...], dtype: np.dtype[Any]) -> None:
        self.host: np.ndarray = cuda.pagelocked_empty(shape, dtype)
        self.device = cuda.mem_alloc(max(1, self.host.nbytes))
        self.shape = shape

    @property
    def address(self) -> int:
        """Device pointer for ``set_tensor_address``."""
        return int(self.device)

    def free(self) -> None:
        self.device.free()
