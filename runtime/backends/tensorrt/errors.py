"""Errors of the TensorRT backend (engine builds, the engine cache, TensorRT and CUDA).

They are part of the one hierarchy of :mod:`retinaedge.runtime.errors`: each has its ``type`` and HTTP
status there, so the CLI and the service report them like every other error, with no mapping step.
"""

from __future__ import annotations

from retinaedge.runtime.errors import ConfigError, MissingDependencyError, RetinaEdgeError


class TensorRTError(RetinaEdgeError):
    """Base class of what the TensorRT backend raises: the engine or the GPU could not be used."""

    type = "tensorrt-failed"
    http_status = 500


class BuildOptionsError(ConfigError, TensorRTError):
    """Build options that are invalid, or that this device or model cannot honour (never rewritten)."""


class MissingExtraError(MissingDependencyError, TensorRTError):
    """TensorRT or pycuda is not installed; the message names the ``trt`` extra."""

    def __init__(self, what: str) -> None:
        RetinaEdgeError.__init__(
            self, f"{what} is not installed (pip install '.[trt]', i.e. the retinaedge[trt] extra)"
        )
        self.what = what
        self.module = what.lower()
        self.extra = "trt"


class NoCudaDeviceError(TensorRTError):
    """CUDA is installed but no usable GPU was found (or the driver refused to initialise)."""


class EngineBuildError(TensorRTError):
    """TensorRT could not parse the ONNX model or build an engine from it."""


class EngineLoadError(TensorRTError):
    """A serialized engine could not be deserialized or does not fit the ONNX I/O contract."""


class EngineCacheError(TensorRTError):
    """The engine cache directory cannot be used (not writable, not a directory)."""
