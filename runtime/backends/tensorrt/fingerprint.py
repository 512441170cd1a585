"""What an engine is built for: the device fingerprint and what the device can do.

TensorRT engines are not portable across TensorRT versions, GPUs or even Orin modules (same compute
capability 8.7, different SM counts), so every cached engine records the
:class:`DeviceFingerprint` it was built on and is only used where the fingerprint is equal.

:class:`DeviceFingerprint` is pure data. :func:`probe` fills it on a real device: the GPU facts through
:mod:`.cuda` (pycuda; the only module that imports it), the TensorRT version and DLA core count through
TensorRT, the CUDA version from the driver and the L4T release from ``/etc/nv_tegra_release``. Both
imports are lazy; without them :func:`probe` raises :class:`~.errors.MissingExtraError`.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from retinaedge.runtime.backends.tensorrt.errors import MissingExtraError

log = logging.getLogger(__name__)


def _version_tuple(version: str) -> tuple[int, ...]:
    """``"10.3.0.30"`` -> ``(10, 3, 0, 30)``; non-numeric parts end the tuple."""
    out = []
    for part in version.split("."):
        if not part.isdigit():
            break
        out.append(int(part))
    return tuple(out)


@dataclass(frozen=True)
class DeviceFingerprint:
    """The facts an engine depends on. ``compute_capability`` is ``"major.minor"`` (e.g. ``"8.7"``);
    versions are strings as the libraries report them; ``l4t`` is None off Jetson."""

    gpu_name: str
    compute_capability: str
    sm_count: int
    tensorrt: str
    cuda: str
    l4t: str | None
    dla_cores: int

    @classmethod
    def from_values(
        cls,
        *,
        gpu_name: str,
        compute_capability: str | tuple[int, int],
        sm_count: int,
        tensorrt: str,
        cuda: str,
        l4t: str | None = None,
        dla_cores: int = 0,
    ) -> DeviceFingerprint:
        """Build from plain values (tests, manifests); ``compute_capability`` may be ``(8, 7)``."""
        if isinstance(compute_capability, tuple):
            compute_capability = f"{compute_capability[0]}.{compute_capability[1]}"
        if sm_count < 1:
            raise ValueError(f"sm_count must be >= 1, got {sm_count}")
        if dla_cores < 0:
            raise ValueError(f"dla_cores must be >= 0, got {dla_cores}")
        return cls(
            gpu_name=str(gpu_name),
            compute_capability=str(compute_capability),
            sm_count=int(sm_count),
            tensorrt=str(tensorrt),
            cuda=str(cuda),
            l4t=None if l4t is None else str(l4t),
            dla_cores=int(dla_cores),
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeviceFingerprint:
        """Inverse of :meth:`to_dict`; raises ``KeyError``/``ValueError``/``TypeError`` on bad data."""
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown fingerprint fields {sorted(unknown)}")
        return cls.from_values(**{name: data[name] for name in names})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def tensorrt_version(self) -> tuple[int, ...]:
        return _version_tuple(self.tensorrt)

    def differences(self, other: DeviceFingerprint) -> list[str]:
        """``["sm_count: 16 here, 8 recorded", ...]`` for every field where ``other`` differs."""
        return [
            f"{f.name}: {getattr(self, f.name)!r} here, {getattr(other, f.name)!r} recorded"
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]

    def describe(self) -> str:
        jetson = f", L4T {self.l4t}" if self.l4t else ""
        return (
            f"{self.gpu_name} (sm_{self.compute_capability.replace('.', '')}, {self.sm_count} SMs, "
            f"{self.dla_cores} DLA), TensorRT {self.tensorrt}, CUDA {self.cuda}{jetson}"
        )


@dataclass(frozen=True)
class DeviceCapabilities:
    """What the installed TensorRT can build on this device.

    ``fast_fp16``/``fast_int8``: ``IBuilder.platform_has_fast_fp16/_int8`` (TensorRT 10; removed in 11,
    where precision comes from the graph); ``strongly_typed_only``: TensorRT >= 11, which has no
    precision builder flags at all; ``builtin_nms``: the ONNX ``NonMaxSuppression`` -> built-in NMS layer
    path is the one to use (TensorRT >= 10.12, where ``EfficientNMS_TRT`` is deprecated).
    """

    fast_fp16: bool
    fast_int8: bool
    strongly_typed_only: bool
    builtin_nms: bool

    @classmethod
    def for_tensorrt(cls, version: str, *, fast_fp16: bool, fast_int8: bool) -> DeviceCapabilities:
        v = _version_tuple(version)
        return cls(
            fast_fp16=fast_fp16,
            fast_int8=fast_int8,
            strongly_typed_only=v >= (11,),
            builtin_nms=v >= (10, 12),
        )


def require_trt_extra() -> None:
    """Raise :class:`MissingExtraError` unless both tensorrt and pycuda are importable (no import)."""
    for module, what in (("tensorrt", "TensorRT"), ("pycuda", "pycuda")):
        if importlib.util.find_spec(module) is None:
            raise MissingExtraError(what)


def l4t_release(root: Path = Path("/")) -> str | None:
    """L4T version string (``"36.4.4"``) from ``etc/nv_tegra_release`` under ``root``, None off Jetson."""
    from retinaedge.device.l4t import parse_nv_tegra_release

    try:
        text = (root / "etc/nv_tegra_release").read_text(errors="replace")
    except OSError:
        return None
    release = parse_nv_tegra_release(text)
    return None if release is None else release.version


def from_tensorrt() -> tuple[str, int, bool, bool]:
    """``(version, DLA cores, fast fp16, fast int8)`` from the installed TensorRT.

    ``trt.Builder(logger).num_DLA_cores`` and ``platform_has_fast_fp16``/``_int8`` (TensorRT 10 Python
    API, ``tensorrt.Builder``); the two platform queries are gone in TensorRT 11, where they are
    reported as False and :class:`DeviceCapabilities` marks the version as strongly typed only.
    """
    require_trt_extra()
    import tensorrt as trt

    builder = trt.Builder(trt.Logger(trt.Logger.WARNING))
    version = str(trt.__version__)
    dla = int(builder.num_DLA_cores)
    fp16 = bool(getattr(builder, "platform_has_fast_fp16", False))
    int8 = bool(getattr(builder, "platform_has_fast_int8", False))
    return version, dla, fp16, int8


def from_pycuda(device: int = 0) -> tuple[str, str, int, str]:
    """``(GPU name, compute capability, SM count, CUDA driver version)`` via :mod:`.cuda`."""
    require_trt_extra()
    from retinaedge.runtime.backends.tensorrt.cuda import query_gpu

    facts = query_gpu(device)
    return facts.name, facts.compute_capability, facts.sm_count, facts.cuda_version


def probe(root: Path = Path("/"), device: int = 0) -> tuple[DeviceFingerprint, DeviceCapabilities]:
    """The fingerprint and capabilities of GPU ``device`` on this machine (imports TensorRT and pycuda)."""
    name, cc, sms, cuda_version = from_pycuda(device)
    trt_version, dla, fp16, int8 = from_tensorrt()
    fingerprint = DeviceFingerprint.from_values(
        gpu_name=name,
        compute_capability=cc,
        sm_count=sms,
        tensorrt=trt_version,
        cuda=cuda_version,
        l4t=l4t_release(root),
        dla_cores=dla,
    )
    caps = DeviceCapabilities.for_tensorrt(trt_version, fast_fp16=fp16, fast_int8=int8)
    log.info("device fingerprint: %s", fingerprint.describe())
    return fingerprint, caps
