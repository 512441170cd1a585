"""The TensorRT backend: a deserialized engine run through pycuda on one stream.

The registry's ``tensorrt`` :class:`~retinaedge.runtime.backends.base.Backend` (opened by the factory in
:mod:`retinaedge.runtime.backends.tensorrt`). ``infer(images)`` takes float32
``(N, C, H, W)`` in 0..1 and returns the ONNX contract outputs (docs/architecture.md): ``num_detections`` int32
``(N,)``, ``boxes`` float32 ``(N, K, 4)``, ``scores`` float32 ``(N, K)``, ``labels`` int32 ``(N, K)``.
Batches larger than the engine's profile maximum are run in slices.

Create, use and close it on ONE thread (the service's inference worker): the CUDA context is made
current on the creating thread (:class:`~.cuda.CudaContext`). pycuda itself is only touched in
:mod:`.cuda`.

TensorRT API used (TensorRT 10 named I/O tensors; the 8.x binding API is gone): ``Runtime(logger)``,
``deserialize_cuda_engine(bytes)`` (None on failure: checked), ``num_io_tensors``, ``get_tensor_name``,
``get_tensor_mode`` (``TensorIOMode.INPUT``), ``get_tensor_dtype`` + ``nptype``,
``get_tensor_profile_shape(name, 0)`` -> (min, opt, max), ``create_execution_context`` (None on failure),
``set_input_shape``, ``get_tensor_shape``, ``set_tensor_address``, ``execute_async_v3(stream_handle)``.
"""

from __future__ import annotations

import logging

import numpy as np
from retinaedge.runtime.backends.base import Backend
from retinaedge.runtime.backends.tensorrt.cuda import CudaContext, HostDeviceBuffer, Stream
from retinaedge.runtime.backends.tensorrt.errors import EngineLoadError, MissingExtraError

log = logging.getLogger(__name__)

INPUT_NAME = "images"
#: The ONNX contract outputs (docs/architecture.md, contracts) and the dtypes they are returned in.
OUTPUT_DTYPES: dict[str, type[np.generic]] = {
    "num_detections": np.int32,
    "boxes": np.float32,
    "scores": np.float32,
    "labels": np.int32,
}


class TensorRTBackend(Backend):
    """``infer(images (N, C, H, W) float32) -> {num_detections, boxes, scores, labels}`` on a TensorRT engine."""

    name = "tensorrt"
    providers: tuple[str, ...] = ("TensorRT",)

    def __init__(self, engine: bytes, *, device: int = 0) -> None:
        try:
            import tensorrt as trt
        except ImportError as exc:
            raise MissingExtraError("TensorRT") from exc
        self._trt = trt
        self._cuda = CudaContext(device)
        self._buffers: dict[str, HostDeviceBuffer] = {}
        try:
            self._load(engine)
        except BaseException:
            self._release()
            raise

    def _load(self, engine_bytes: bytes) -> None:
        trt = self._trt
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = self._runtime.deserialize_cuda_engine(engine_bytes)
        if engine is None:
            raise EngineLoadError(
                "TensorRT could not deserialize the engine (built by another TensorRT version or for "
                "another device, or damaged)"
            )
        self._engine = engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if inputs != [INPUT_NAME] or set(outputs) != set(OUTPUT_DTYPES):
            raise EngineLoadError(
                f"engine I/O {inputs} -> {outputs} does not follow the contract "
                f"['{INPUT_NAME}'] -> {list(OUTPUT_DTYPES)}"
            )
        lo, _, hi = (tuple(s) for s in engine.get_tensor_profile_shape(INPUT_NAME, 0))
        self.min_batch, self.max_batch = int(lo[0]), int(hi[0])
        self.input_chw = tuple(int(d) for d in hi[1:])
        context = engine.create_execution_context()
        if context is None:
            raise EngineLoadError("TensorRT could not create an execution context (out of device memory?)")
        self._context = context
        if not context.set_input_shape(INPUT_NAME, hi):
            raise EngineLoadError(f"the engine refuses its own maximum input shape {hi}")
        self._stream: Stream = self._cuda.stream()
        self._buffers[INPUT_NAME] = self._cuda.buffer(tuple(int(d) for d in hi), np.dtype(np.float32))
        for name in outputs:
            shape = tuple(int(d) for d in context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise EngineLoadError(
                    f"output {name!r} has a data-dependent shape {shape} at the maximum batch; the contract "
                    "pads every output to K detections"
                )
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            self._buffers[name] = self._cuda.buffer(shape, dtype)
        for name, buf in self._buffers.items():
            if not context.set_tensor_address(name, buf.address):
                raise EngineLoadError(f"TensorRT refused the device address of {name!r}")
        log.info(
            "tensorrt engine ready: input (%d..%d, %s), outputs %s",
            self.min_batch,
            self.max_batch,
            "x".join(map(str, self.input_chw)),
            {n: self._buffers[n].shape for n in outputs},
        )

    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Run ``images`` float32 ``(N, C, H, W)``, in slices of at most ``max_batch``."""
        if images.dtype != np.float32:
            raise ValueError(f"images must be float32, got {images.dtype}")
        if images.ndim != 4 or tuple(images.shape[1:]) != self.input_chw:
            raise ValueError(
                f"images shape {images.shape} does not fit the engine input (N, {self.input_chw})"
            )
        parts = [self._run(images[i : i + self.max_batch]) for i in range(0, len(images), self.max_batch)]
        return {name: np.concatenate([p[name] for p in parts]) for name in OUTPUT_DTYPES}

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        self._cuda.check_thread()
        n = len(batch)
        if n < self.min_batch:  # pad up to the profile minimum with empty frames, drop them afterwards
            pad = np.zeros((self.min_batch - n, *batch.shape[1:]), np.float32)
            batch = np.concatenate([batch, pad])
        run_n = len(batch)
        inp = self._buffers[INPUT_NAME]
        inp.host[:run_n] = batch
        if not self._context.set_input_shape(INPUT_NAME, (run_n, *self.input_chw)):
            raise RuntimeError(f"the engine refused input shape {(run_n, *self.input_chw)}")
        self._stream.upload(inp, batch.nbytes)
        if not self._context.execute_async_v3(self._stream.handle):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
        shapes = {name: tuple(self._context.get_tensor_shape(name)) for name in OUTPUT_DTYPES}
        for name in OUTPUT_DTYPES:
            buf = self._buffers[name]
            nbytes = int(np.prod(shapes[name])) * buf.host.dtype.itemsize
            self._stream.download(buf, nbytes)
        self._stream.synchronize()
        out: dict[str, np.ndarray] = {}
        for name, dtype in OUTPUT_DTYPES.items():
            buf = self._buffers[name]
            flat = buf.host.reshape(-1)[: int(np.prod(shapes[name]))]
            arr = flat.reshape(shapes[name])[:n].astype(dtype, copy=True)
            out[name] = arr.reshape(n) if name == "num_detections" else arr
        return out

    def _release(self) -> None:
        for buf in self._buffers.values():
            buf.free()
        self._buffers = {}
        for attr in ("_context", "_engine", "_runtime"):
            if hasattr(self, attr):
                delattr(self, attr)
        self._cuda.close()

    def close(self) -> None:
        """Free buffers, context, engine and the CUDA context (on the owning thread)."""
        if getattr(self, "_cuda", None) is not None:
            self._release()
            self._cuda = None  # type: ignore[assignment]
