"""ONNX -> serialized TensorRT engine (TensorRT 10.x and 11.x Python API).

One function, :func:`build_engine`, in the order of TensorRT's own ``build_engine.py`` sample: parse, set
up the builder config (precision, DLA, workspace, timing cache, optimization profile), build, report.
``tensorrt`` is imported inside the function; without it :class:`~.errors.MissingExtraError` names the
``trt`` extra. Options are validated by the caller (:meth:`BuildOptions.validate_against`) first; nothing
here changes them.

TensorRT API used (Python, TensorRT 10: docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api):
``Builder(logger)``, ``create_network(flags)`` (explicit batch is the only mode in 10.x; the
``STRONGLY_TYPED`` creation flag for Q/DQ or float16 graphs, always on and ignored in 11.x),
``OnnxParser(network, logger).parse(bytes)`` + ``num_errors``/``get_error``,
``create_builder_config()``, ``set_flag(BuilderFlag.FP16/INT8/GPU_FALLBACK)`` and
``clear_flag(BuilderFlag.TF32)`` (10.x only: 11.x removed the weak-typing precision flags),
``default_device_type = DeviceType.DLA``, ``DLA_core``, ``can_run_on_DLA(layer)``,
``set_memory_pool_limit(MemoryPoolType.WORKSPACE, bytes)``, ``create_optimization_profile()`` +
``set_shape(name, min, opt, max)`` + ``add_optimization_profile``, ``create_timing_cache(bytes)`` +
``set_timing_cache(cache, ignore_mismatch=False)`` + ``get_timing_cache().serialize()``,
``build_serialized_network(network, config)`` (None on failure).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retinaedge.runtime.backends.tensorrt.errors import EngineBuildError, MissingExtraError
from retinaedge.runtime.backends.tensorrt.options import MIB, BuildOptions

log = logging.getLogger(__name__)

INPUT_NAME = "images"


@dataclass(frozen=True)
class BuildReport:
    """What a build produced: engine size, seconds taken, layers on the DLA and on the GPU (names), the
    NMS flavour and ONNX file built, and whether the timing cache was loaded/saved."""

    engine_bytes: int
    seconds: float
    onnx_file: str
    nms: str
    precision: str
    dla_core: int | None
    dla_layers: list[str] = field(default_factory=list)
    gpu_layers: list[str] = field(default_factory=list)
    timing_cache_loaded: bool = False
    timing_cache_saved: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "engine_bytes": self.engine_bytes,
            "seconds": round(self.seconds, 2),
            "onnx_file": self.onnx_file,
            "nms": self.nms,
            "precision": self.precision,
            "dla_core": self.dla_core,
            "layers_on_dla": len(self.dla_layers),
            "layers_on_gpu": len(self.gpu_layers),
            "dla_layers": self.dla_layers,
            "gpu_fallback_layers": self.gpu_layers if self.dla_core is not None else [],
            "timing_cache_loaded": self.timing_cache_loaded,
            "timing_cache_saved": self.timing_cache_saved,
        }


def _import_trt() -> Any:
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise MissingExtraError("TensorRT") from exc
    return trt


def _major(trt: Any) -> int:
    return int(str(trt.__version__).split(".")[0])


def _parse(trt: Any, builder: Any, logger: Any, onnx_path: Path, strongly_typed: bool) -> Any:
    flags = 0
    if strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    # Registers TensorRT's own plugins (EfficientNMS_TRT for the plugin flavour) with the parser.
    trt.init_libnvinfer_plugins(logger, "")
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    return network


def _configure(trt: Any, builder: Any, network: Any, options: BuildOptions, strongly_typed: bool) -> Any:
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib * MIB)
    # A strongly typed network takes every type from the graph; precision flags do not apply to it
    # (and TensorRT 11 has none). Weakly typed (TensorRT 10 only): the flags let TensorRT pick kernels.
    if not strongly_typed:
        if options.precision == "fp32":
            config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32: parity with ONNX Runtime
        elif options.precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        elif options.precision == "int8":
            # Explicit quantization: Q/DQ nodes set the INT8 layers; FP16 lets the rest run in half.
            config.set_flag(trt.BuilderFlag.INT8)
            config.set_flag(trt.BuilderFlag.FP16)
    if options.dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = options.dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    images = network.get_input(0)
    if images.name != INPUT_NAME:
        raise EngineBuildError(f"the model's first input is {images.name!r}, expected {INPUT_NAME!r}")
    _, c, h, w = tuple(images.shape)
    profile = builder.create_optimization_profile()
    profile.set_shape(
        INPUT_NAME,
        (options.batch_min, c, h, w),
        (options.batch_opt, c, h, w),
        (options.batch_max, c, h, w),
    )
    config.add_optimization_profile(profile)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    return config


def _dla_split(trt: Any, network: Any, config: Any, options: BuildOptions) -> tuple[list[str], list[str]]:
    """Layer names the builder will place on the DLA and on the GPU (``can_run_on_DLA`` per layer)."""
    dla: list[str] = []
    gpu: list[str] = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        on_dla = options.dla_core is not None and bool(config.can_run_on_DLA(layer))
        (dla if on_dla else gpu).append(layer.name)
    return dla, gpu


def build_engine(
    onnx_path: str | Path, options: BuildOptions, *, nms: str, strongly_typed: bool
) -> tuple[bytes, BuildReport]:
    """Build ``onnx_path`` (the ONNX file of NMS flavour ``nms``) with ``options`` -> ``(engine, report)``.

    ``strongly_typed``: the graph's own types decide precision (a float16 graph; always the case with
    TensorRT 11). On TensorRT 10 a Q/DQ graph is built weakly typed with the INT8 and FP16 flags (explicit
    quantization: the Q/DQ scales fix the INT8 layers). Raises :class:`EngineBuildError` when parsing or
    building fails.
    """
    trt = _import_trt()
    onnx_path = Path(onnx_path)
    started = time.monotonic()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = strongly_typed or _major(trt) >= 11
    network = _parse(trt, builder, logger, onnx_path, strongly_typed)
    config = _configure(trt, builder, network, options, strongly_typed)
    cache_path = options.timing_cache
    cache_bytes = cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else b""
    timing_cache = config.create_timing_cache(cache_bytes)
    loaded = bool(cache_bytes)
    if not config.set_timing_cache(timing_cache, False):
        log.warning("timing cache %s does not fit this TensorRT/device; starting a new one", cache_path)
        timing_cache = config.create_timing_cache(b"")
        config.set_timing_cache(timing_cache, False)
        loaded = False
    dla_layers, gpu_layers = _dla_split(trt, network, config, options)
    log.info(
        "building %s: precision=%s dla_core=%s batch=%d/%d/%d (%d layers on the DLA, %d on the GPU)",
        onnx_path.name,
        options.precision,
        options.dla_core,
        options.batch_min,
        options.batch_opt,
        options.batch_max,
        len(dla_layers),
        len(gpu_layers),
    )
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT failed to build an engine from {onnx_path.name} (see its log)")
    saved = False
    if cache_path is not None:
        from retinaedge.runtime.backends.tensorrt.cache import atomic_write

        cache_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cache_path, [memoryview(config.get_timing_cache().serialize())])
        saved = True
    engine = bytes(memoryview(serialized))
    report = BuildReport(
        engine_bytes=len(engine),
        seconds=time.monotonic() - started,
        onnx_file=onnx_path.name,
        nms=nms,
        precision=options.precision,
        dla_core=options.dla_core,
        dla_layers=dla_layers,
        gpu_layers=gpu_layers,
        timing_cache_loaded=loaded,
        timing_cache_saved=saved,
    )
    log.info("engine built in %.1f s (%d bytes)", report.seconds, report.engine_bytes)
    return engine, report
