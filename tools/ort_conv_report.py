"""What ONNX Runtime's CPU provider makes of a model's convolutions: the figures docs/models.md cites for
why the TensorRT Q/DQ model is slow there.

For each ONNX file: the session is created with ``ORT_ENABLE_ALL`` (as the runtime does) and the optimized
graph saved (``optimized_model_filepath``); the report counts the convolutions of the source, what they
became (``com.microsoft.nchwc`` ``Conv``: the blocked-layout fast path; ``QLinearConv``/``ConvInteger``:
integer arithmetic; ``ai.onnx`` ``Conv`` or ``com.microsoft`` ``FusedConv``: plain float kernels) and how
many float convolutions read a ``DequantizeLinear`` output. Prints one JSON object per file.

    .venv/bin/python tools/ort_conv_report.py models/demo/model.onnx /tmp/demo-int8/model.int8.qdq.onnx
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path
from typing import Any


def report(path: Path) -> dict[str, Any]:
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="ort-conv-") as tmp:
        out = Path(tmp) / "optimized.onnx"
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.optimized_model_filepath = str(out)
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 3
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        graph = onnx.load(str(out)).graph
    producer = {o: n for n in graph.node for o in n.output}
    after = collections.Counter(
        f"{n.domain or 'ai.onnx'}:{n.op_type}" for n in graph.node if "Conv" in n.op_type
    )
    fed_by_dq = sum(
        1
        for n in graph.node
        if n.op_type in ("Conv", "FusedConv")
        and n.input
        and n.input[0] in producer
        and producer[n.input[0]].op_type == "DequantizeLinear"
    )
    source = sum(n.op_type == "Conv" for n in onnx.load(str(path)).graph.node)
    integer = sum(v for k, v in after.items() if k.endswith(("QLinearConv", "ConvInteger")))
    return {
        "model": str(path),
        "source_convs": source,
        "after_optimization": dict(after),
        "integer_convs": integer,
        "float_convs_fed_by_dequantize": fed_by_dq,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("models", type=Path, nargs="+", help="ONNX files")
    for path in parser.parse_args(argv).models:
        sys.stdout.write(json.dumps(report(path)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
