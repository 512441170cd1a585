"""The ``openvino`` backend: the bundle on OpenVINO's CPU plugin, FP32 by default, bf16 or INT8 behind a
gate that runs on this device against this bundle's FP32 outputs.

The registry finds this folder by its name and calls :func:`open` (and :func:`check`, which finds
openvino without importing it). Nothing here imports openvino at import time. One module per job:

- :mod:`.compiled`: :class:`~.compiled.OpenVinoBackend`, one compiled model (precision pinned, hint,
  threads, streams); :mod:`.cache`: the compiled-model cache keyed by model, precision, CPU and
  OpenVINO version, with the gate's figures beside each entry; :mod:`.cpu`: the CPU's ISA facts;
- :mod:`.precision`: which precisions are offered and which one serves (pure); :mod:`.gate`: the gate's
  comparison (pure); :mod:`.gating`: running it; :mod:`.variants`: which file runs INT8;
  :mod:`.recheck`: a reduced precision served with an FP32 re-check of the frames it cannot decide.

``options.extra`` (the service's ``openvino_*`` settings, the CLI's ``--precision``): ``precision``
(``fp32`` | ``bf16`` | ``int8`` | ``auto``, default fp32), ``cache_dir``, ``performance_hint``
(``latency`` | ``throughput``), ``int8_model`` (``auto`` | ``nncf`` | ``qdq``), ``gate_annotations``
and ``gate_eval`` (annotated DICOM the gate also evaluates), ``device_properties`` (a mapping that
replaces what the CPU device reports, e.g. ``{"OPTIMIZATION_CAPABILITIES": ["FP32", "INT8"]}``: how
tests simulate a CPU without bf16), ``gate_bundle`` (the benchmark's ``--gate-model``: another, trained
bundle whose gate decides the precision; not a service setting), ``recheck_band`` (a reduced precision's
FP32 re-check of the frames with a detection that close to its class's threshold, :mod:`.recheck`; None:
the precision's default, 0: none).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retinaedge.runtime.backends.base import BackendOptions
from retinaedge.runtime.bundle import Bundle
from retinaedge.runtime.errors import MissingDependencyError

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from retinaedge.runtime.backends.openvino.opening import Served


def check() -> None:
    """Raise :class:`MissingDependencyError` naming ``retinaedge[openvino]`` unless openvino is found."""
    if importlib.util.find_spec("openvino") is None:
        raise MissingDependencyError("openvino", "openvino", "backend openvino")


def open(bundle: Bundle, options: BackendOptions) -> Served:  # noqa: A001 (registry factory)
    """The registry factory (see the module docstring); the returned backend's ``precision`` is what
    runs and ``reason`` why (a fallback to FP32 is said there and logged as a warning)."""
    check()
    from retinaedge.runtime.backends.openvino.opening import open_gated

    return open_gated(bundle, options, _extra(options.extra))


def _extra(extra: Mapping[str, Any]) -> dict[str, Any]:
    """The extra options with their defaults; ``None`` values (unset settings) take the default."""
    defaults: dict[str, Any] = {
        "precision": "fp32",
        "cache_dir": None,
        "performance_hint": "latency",
        "int8_model": "auto",
        "gate_annotations": None,
        "gate_eval": (),
        "device_properties": None,
        "gate_bundle": None,
        "recheck_band": None,
    }
    out = dict(defaults)
    for key in defaults:
        if extra.get(key) is not None:
            out[key] = extra[key]
    if out["cache_dir"] is not None:
        out["cache_dir"] = Path(out["cache_dir"])
    return out
