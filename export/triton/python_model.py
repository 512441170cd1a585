"""Triton python-backend model: the bundle's ``model.onnx`` on ONNX Runtime (CPU) inside Triton.

``retinaedge export-triton --platform python`` copies this file as ``NAME/1/model.py`` beside
``model.onnx``. It is the CPU-only variant for a Triton that has the python backend only (the
``tritonserver`` in the ``nvidia-pytriton`` wheel); a GPU server uses ``--platform onnxruntime`` or
``tensorrt``. It needs numpy and onnxruntime in the python backend's environment and nothing of retinaedge.

Each ``execute`` gets the requests Triton's dynamic batcher gathered; their ``images`` (float32
``(n_i, C, H, W)``) are concatenated, run as one batch, and the outputs split back per request, so the
batcher's work really becomes one ONNX Runtime run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

INPUT = "images"
OUTPUTS = ("num_detections", "boxes", "scores", "labels")


class TritonPythonModel:
    """The python backend's model class (``initialize``, ``execute``, ``finalize``)."""

    def initialize(self, args: dict[str, str]) -> None:
        import onnxruntime as ort

        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(params.get("intra_op_threads") or 0)
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])

    def execute(self, requests: list[Any]) -> list[Any]:
        import triton_python_backend_utils as pb_utils

        batches = [pb_utils.get_input_tensor_by_name(r, INPUT).as_numpy() for r in requests]
        images = np.ascontiguousarray(np.concatenate(batches) if len(batches) > 1 else batches[0])
        outputs = self.session.run(list(OUTPUTS), {INPUT: images})
        responses, start = [], 0
        for batch in batches:
            stop = start + batch.shape[0]
            tensors = [
                pb_utils.Tensor(name, np.ascontiguousarray(out[start:stop]))
                for name, out in zip(OUTPUTS, outputs, strict=True)
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start = stop
        return responses

    def finalize(self) -> None:
        self.session = None
