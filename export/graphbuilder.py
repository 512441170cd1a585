"""A tiny helper for writing ONNX subgraphs node by node with unique, prefixed tensor names.

No torch here: the post-processing graph is plain ONNX and can be built and tested without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper


class GraphBuilder:
    """Collects nodes and initializers; every tensor name gets ``prefix``."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}{hint}_{self._count}"

    def const(self, value: Any, hint: str = "const", dtype: Any = None) -> str:
        """Add an initializer from a numpy-convertible value; return its name."""
        arr = np.asarray(value, dtype=dtype)
        name = self._name(hint)
        self.initializers.append(numpy_helper.from_array(arr, name))
        return name

    def op(
        self,
        op_type: str,
        inputs: Sequence[str],
        hint: str | None = None,
        *,
        outputs: int | Sequence[str] = 1,
        domain: str = "",
        **attrs: Any,
    ) -> Any:
        """Add a node; return its output name (or a list of names when it has several)."""
        if isinstance(outputs, int):
            out_names = [self._name(hint or op_type.lower()) for _ in range(outputs)]
        else:
            out_names = list(outputs)
        node = helper.make_node(
            op_type,
            list(inputs),
            out_names,
            name=self._name(f"{op_type}_node"),
            domain=domain,
            **attrs,
        )
        self.nodes.append(node)
        return out_names[0] if len(out_names) == 1 else out_names

    def attach(self, graph: onnx.GraphProto) -> None:
        """Append the collected nodes and initializers to ``graph``."""
        graph.node.extend(self.nodes)
        graph.initializer.extend(self.initializers)
