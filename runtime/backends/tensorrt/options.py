"""Engine build options and their validation against the device and the model.

:class:`BuildOptions` is shared by the builder (:mod:`.build`) and the engine cache (:mod:`.cache`, which
keys on the options); the engine settings (:mod:`.settings`) and the ``build`` verb construct it.

Options are never rewritten: an option the device or the model cannot honour is refused with a
:class:`~.errors.BuildOptionsError` that says what is wrong and what to do instead (a silently
changed option would give an engine nobody asked for).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retinaedge.runtime.backends.tensorrt.errors import BuildOptionsError
from retinaedge.runtime.backends.tensorrt.fingerprint import DeviceCapabilities, DeviceFingerprint

PRECISIONS = ("fp32", "fp16", "int8")
NMS_FLAVOURS = ("auto", "plugin", "builtin")
MIB = 1024**2


@dataclass(frozen=True)
class ModelFacts:
    """What the ONNX graph offers: Q/DQ nodes (explicit INT8), float16 tensors (strongly typed FP16),
    and whether the bundle has the ``EfficientNMS_TRT`` plugin variant beside ``model.onnx``."""

    has_qdq: bool
    has_fp16: bool
    has_plugin_variant: bool


def inspect_onnx(path: str | Path, *, plugin_variant: bool) -> ModelFacts:
    """Scan ``path`` (no weights loaded) for ``QuantizeLinear``/``DequantizeLinear`` and float16 tensors."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    ops = {n.op_type for n in graph.node}
    fp16 = onnx.TensorProto.FLOAT16
    has_fp16 = any(t.data_type == fp16 for t in graph.initializer) or any(
        v.type.tensor_type.elem_type == fp16
        for v in list(graph.value_info) + list(graph.input) + list(graph.output)
    )
    return ModelFacts(
        has_qdq=bool({"QuantizeLinear", "DequantizeLinear"} & ops),
        has_fp16=has_fp16,
        has_plugin_variant=plugin_variant,
    )


@dataclass(frozen=True)
class BuildOptions:
    """How to build an engine.

    ``precision``: ``fp32`` (TF32 off), ``fp16`` or ``int8`` (explicit quantization: the ONNX must carry
    Q/DQ nodes, see ``retinaedge quantize``). ``dla_core``: run on that DLA core with GPU fallback for
    layers the DLA cannot run (None: GPU only). ``batch_min/opt/max``: the optimization profile of the
    dynamic batch dimension N of ``images`` ``(N, C, H, W)``. ``workspace_mib``: builder workspace pool
    limit in MiB. ``nms``: ``plugin`` builds ``model.efficientnms_trt.onnx``, ``builtin`` builds
    ``model.onnx`` (ONNX NonMaxSuppression -> TensorRT's NMS layer), ``auto`` picks by TensorRT version.
    ``timing_cache``: file to load/save the builder timing cache (speeds up rebuilds; not part of the
    cache key because it does not change what the engine computes).
    """

    precision: str = "fp32"
    dla_core: int | None = None
    batch_min: int = 1
    batch_opt: int = 4
    batch_max: int = 4
    workspace_mib: int = 1024
    nms: str = "auto"
    timing_cache: Path | None = None

    def validate(self) -> None:
        """Refuse options that are wrong on any device."""
        if self.precision not in PRECISIONS:
            raise BuildOptionsError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.nms not in NMS_FLAVOURS:
            raise BuildOptionsError(f"nms flavour must be one of {NMS_FLAVOURS}, got {self.nms!r}")
        if not 1 <= self.batch_min <= self.batch_opt <= self.batch_max:
            raise BuildOptionsError(
                "batch sizes must satisfy 1 <= min <= opt <= max, got "
                f"min={self.batch_min} opt={self.batch_opt} max={self.batch_max}"
            )
        if self.workspace_mib < 1:
            raise BuildOptionsError(f"workspace must be at least 1 MiB, got {self.workspace_mib}")
        if self.dla_core is not None:
            if self.dla_core < 0:
                raise BuildOptionsError(f"DLA core must be >= 0, got {self.dla_core}")
            if self.precision == "fp32":
                raise BuildOptionsError(
                    f"DLA core {self.dla_core} requested with precision fp32, but the DLA runs only FP16 and "
                    "INT8; choose --precision fp16 or int8, or leave out --dla-core to run on the GPU"
                )

    def resolve_nms(self, caps: DeviceCapabilities, facts: ModelFacts) -> str:
        """The flavour to build: ``plugin`` or ``builtin`` (``auto`` decided by the TensorRT version)."""
        if self.nms != "auto":
            return self.nms
        if caps.builtin_nms:
            return "builtin"
        if not facts.has_plugin_variant:
            raise BuildOptionsError(
                "this TensorRT predates 10.12, so nms=auto wants the EfficientNMS_TRT variant, but the bundle "
                "has no model.efficientnms_trt.onnx; re-export with --trt-plugin, or pass --nms builtin to "
                "build the ONNX NonMaxSuppression graph anyway"
            )
        return "plugin"

    def validate_against(
        self, fingerprint: DeviceFingerprint, caps: DeviceCapabilities, facts: ModelFacts
    ) -> str:
        """Refuse what this device or model cannot honour; return the NMS flavour to build."""
        self.validate()
        if self.dla_core is not None and self.dla_core >= fingerprint.dla_cores:
            have = (
                "no DLA"
                if fingerprint.dla_cores == 0
                else f"{fingerprint.dla_cores} DLA core(s), 0..{fingerprint.dla_cores - 1}"
            )
            raise BuildOptionsError(
                f"DLA core {self.dla_core} requested but {fingerprint.gpu_name} has {have}"
            )
        if self.precision == "fp16":
            if caps.strongly_typed_only and not facts.has_fp16:
                raise BuildOptionsError(
                    f"TensorRT {fingerprint.tensorrt} has no FP16 builder flag (networks are strongly typed) "
                    "and this model has no float16 tensors; build fp32, or convert the model to mixed "
                    "precision first"
                )
            if not caps.strongly_typed_only and not caps.fast_fp16:
                raise BuildOptionsError(
                    f"precision fp16 requested but {fingerprint.gpu_name} has no fast FP16 "
                    "(IBuilder.platform_has_fast_fp16 is False); build fp32 instead"
                )
        if self.precision == "int8":
            if not facts.has_qdq:
                raise BuildOptionsError(
                    "precision int8 needs a model with Q/DQ nodes (explicit quantization; the implicit "
                    "calibrators are deprecated since TensorRT 10.1); make one with `retinaedge quantize`"
                )
            if not caps.strongly_typed_only and not caps.fast_int8:
                raise BuildOptionsError(
                    f"precision int8 requested but {fingerprint.gpu_name} has no fast INT8 "
                    "(IBuilder.platform_has_fast_int8 is False)"
                )
        if self.precision == "fp32" and facts.has_qdq:
            raise BuildOptionsError("this model carries Q/DQ nodes (INT8); build it with precision int8")
        return self.resolve_nms(caps, facts)

    def key_dict(self) -> dict[str, Any]:
        """The options that change the engine (everything but the timing cache path), for cache keys."""
        return {
            "precision": self.precision,
            "dla_core": self.dla_core,
            "batch": [self.batch_min, self.batch_opt, self.batch_max],
            "workspace_mib": self.workspace_mib,
            "nms": self.nms,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BuildOptions:
        """The options :meth:`to_dict` wrote (an engine cache manifest's ``options``); raises KeyError,
        TypeError or ValueError for a dictionary that is not one."""
        lo, opt, hi = (int(b) for b in d["batch"])
        timing = d.get("timing_cache")
        return cls(
            precision=d["precision"],
            dla_core=None if d["dla_core"] is None else int(d["dla_core"]),
            batch_min=lo,
            batch_opt=opt,
            batch_max=hi,
            workspace_mib=int(d["workspace_mib"]),
            nms=d["nms"],
            timing_cache=None if timing is None else Path(timing),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.key_dict(),
            "timing_cache": None if self.timing_cache is None else str(self.timing_cache),
        }
