"""Errors raised by the device layer (engine builds, the engine cache, TensorRT and CUDA).

``device`` imports nothing from the rest of retinaedge (docs/architecture.md), so it has its own small
hierarchy; the service and the CLI map it onto the runtime's :class:`RetinaEdgeError` types in one place
(:func:`retinaedge.runtime.backends.policy.to_runtime_error`).
"""

from __future__ import annotations


class DeviceError(Exception):
    """Base class of every error the device layer raises."""


class BuildOptionsError(DeviceError):
    """Build options that are invalid, or that this device or model cannot honour (never rewritten)."""


class MissingExtraError(DeviceError):
    """TensorRT or pycuda is not installed; the message names the ``trt`` extra."""

    def __init__(self, what: str) -> None:
        super().__init__(f"{what} is not installed (pip install '.[trt]', i.e. the retinaedge[trt] extra)")
        self.what = what


class NoCudaDeviceError(DeviceError):
    """CUDA is installed but no usable GPU was found (or the driver refused to initialise)."""


class EngineBuildError(DeviceError):
    """TensorRT could not parse the ONNX model or build an engine from it."""


class EngineLoadError(DeviceError):
    """A serialized engine could not be deserialized or does not fit the ONNX I/O contract."""


class EngineCacheError(DeviceError):
    """The engine cache directory cannot be used (not writable, not a directory)."""
