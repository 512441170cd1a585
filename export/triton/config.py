"""A Triton Inference Server ``config.pbtxt`` for a model bundle, as protobuf text (``ModelConfig``).

The I/O follows the bundle's contract (:mod:`retinaedge.runtime.detections`): input ``images`` float32
``(N, C, H, W)``; outputs ``num_detections`` int32 ``(N,)``, ``boxes`` float32 ``(N, K, 4)``, ``scores``
float32 ``(N, K)``, ``labels`` int32 ``(N, K)``. Under ``max_batch_size > 0`` Triton leaves the batch
dimension out of ``dims``, so the per-image ``num_detections`` (a scalar per image) is declared
``dims: [ 1 ]`` with ``reshape { shape: [ ] }``: Triton's dims may not be empty, the model's are.

The bundle's identity travels in ``parameters`` (:data:`SHA_PARAMETER`, :data:`MANIFEST_PARAMETER`), which
Triton returns from its model configuration API: the appliance compares them with its own bundle before
it serves (:mod:`retinaedge.runtime.backends.triton`). Nothing here imports protobuf or tritonclient.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from retinaedge.runtime.backends.triton import CRITERIA_PARAMETER, MANIFEST_PARAMETER, SHA_PARAMETER
from retinaedge.runtime.manifest import Manifest

#: ``parameters`` keys written into every exported configuration (the first two are what
#: ``backend=triton`` reads back: :mod:`retinaedge.runtime.backends.triton`).
__all__ = [
    "CRITERIA_PARAMETER",
    "MANIFEST_PARAMETER",
    "SHA_PARAMETER",
    "TritonModelConfig",
    "default_preferred",
]
VERSION_PARAMETER = "retinaedge_version"
#: python variant only: ONNX Runtime intra-op threads per model instance (0: ONNX Runtime's default).
THREADS_PARAMETER = "intra_op_threads"

#: What each platform choice writes: (``platform`` or ``backend`` field, its value).
PLATFORMS = {
    "onnxruntime": ("platform", "onnxruntime_onnx"),
    "tensorrt": ("platform", "tensorrt_plan"),
    "python": ("backend", "python"),
}

_TYPES = {"float32": "TYPE_FP32", "int32": "TYPE_INT32", "int64": "TYPE_INT64", "float16": "TYPE_FP16"}


@dataclass(frozen=True)
class TritonModelConfig:
    """What goes into ``config.pbtxt``; :meth:`to_pbtxt` renders it.

    ``max_batch``: Triton's ``max_batch_size`` (frames per execution, >= 1); ``preferred``: the dynamic
    batcher's preferred batch sizes (each 1..max_batch); ``queue_delay_us``: how long (microseconds) the
    batcher may hold a request to form a larger batch; ``instances``/``kind``: ``instance_group`` (count,
    ``KIND_GPU`` or ``KIND_CPU``); ``cc_files``: for ``tensorrt``, compute capability (``"8.6"``) ->
    engine file name in the version directory; ``extra``: more string ``parameters``.
    """

    name: str
    platform: str
    manifest: Manifest
    max_batch: int
    preferred: tuple[int, ...]
    queue_delay_us: int
    instances: int = 1
    kind: str = "KIND_GPU"
    cc_files: dict[str, str] = field(default_factory=dict)
    extra: dict[str, str] = field(default_factory=dict)

    def parameters(self) -> dict[str, str]:
        """The string parameters: the bundle's model sha256, its manifest (compact JSON), the exporter."""
        from retinaedge.runtime import __version__

        return {
            SHA_PARAMETER: str(self.manifest.model_sha256),
            MANIFEST_PARAMETER: json.dumps(self.manifest.to_dict(), sort_keys=True, separators=(",", ":")),
            VERSION_PARAMETER: __version__,
            **self.extra,
        }

    def to_pbtxt(self) -> str:
        """The configuration as protobuf text format (``ModelConfig``)."""
        m = self.manifest
        out = m.outputs
        k = int(m.postprocess.detections_per_img)
        key, value = PLATFORMS[self.platform]
        lines = [
            "# Written by retinaedge export-triton: the bundle's model sha256 and manifest are in parameters.",
            f"name: {_q(self.name)}",
            f"{key}: {_q(value)}",
            f"max_batch_size: {self.max_batch}",
            "input [",
            _tensor(m.input.name, "float32", [m.input.channels, m.input.height, m.input.width]),
            "]",
            "output [",
            _tensor("num_detections", _dtype(out, "num_detections", "int32"), [1], reshape=[]) + ",",
            _tensor("boxes", _dtype(out, "boxes", "float32"), [k, 4]) + ",",
            _tensor("scores", _dtype(out, "scores", "float32"), [k]) + ",",
            _tensor("labels", _dtype(out, "labels", "int32"), [k]),
            "]",
            "dynamic_batching {",
            f"  preferred_batch_size: {_list(self.preferred)}",
            f"  max_queue_delay_microseconds: {self.queue_delay_us}",
            "}",
            "instance_group [",
            f"  {{ count: {self.instances} kind: {self.kind} }}",
            "]",
            "version_policy: { latest: { num_versions: 1 } }",
        ]
        for cc, filename in sorted(self.cc_files.items()):
            lines.append(f"cc_model_filenames {{ key: {_q(cc)} value: {_q(filename)} }}")
        for name, text in self.parameters().items():
            lines.append(f"parameters {{ key: {_q(name)} value: {{ string_value: {_q(text)} }} }}")
        return "\n".join(lines) + "\n"


def _dtype(outputs: dict[str, dict[str, object]], name: str, default: str) -> str:
    return str(outputs.get(name, {}).get("dtype", default))


def _tensor(name: str, dtype: str, dims: list[int], reshape: list[int] | None = None) -> str:
    if dtype not in _TYPES:
        raise ValueError(f"tensor {name}: dtype {dtype} has no Triton type here")
    text = f"  {{ name: {_q(name)} data_type: {_TYPES[dtype]} dims: {_list(dims)}"
    if reshape is not None:
        text += f" reshape {{ shape: {_list(reshape)} }}"
    return text + " }"


def _list(values: list[int] | tuple[int, ...]) -> str:
    return f"[ {', '.join(str(v) for v in values)} ]" if values else "[ ]"


def _q(text: str) -> str:
    """A protobuf text-format string literal (ASCII; backslash, quote and control characters escaped)."""
    escaped = []
    for ch in text:
        if ch in ('"', "\\"):
            escaped.append("\\" + ch)
        elif ch == "\n":
            escaped.append("\\n")
        elif ord(ch) < 0x20 or ord(ch) > 0x7E:
            escaped.extend(f"\\{b:03o}" for b in ch.encode("utf-8"))
        else:
            escaped.append(ch)
    return '"' + "".join(escaped) + '"'


def default_preferred(max_batch: int) -> tuple[int, ...]:
    """Preferred batch sizes for ``max_batch``: its half (when > 1) and itself."""
    return tuple(sorted({max(1, max_batch // 2), max_batch}))
