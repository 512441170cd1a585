"""The Backend protocol: what every inference backend (ONNX Runtime, TensorRT) offers.

``infer(images)`` takes float32 ``(N, C, H, W)`` in 0..1 and returns the contract outputs
(``num_detections``, ``boxes``, ``scores``, ``labels``; docs/architecture.md, contracts) as numpy arrays.
"""

from __future__ import annotations

from types import TracebackType
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Backend(Protocol):
    """A loaded model that runs batches. One small class per backend; use as a context manager."""

    name: str

    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Run one batch ``(N, C, H, W)`` float32 -> dict of contract outputs."""
        ...

    def close(self) -> None:
        """Release the session/engine and its memory."""
        ...

    def __enter__(self) -> Backend: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...
