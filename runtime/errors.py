"""One exception hierarchy for the whole appliance.

Every error carries a stable ``type`` string (used in CLI JSON and HTTP problem documents) and the
HTTP status it maps to. The mapping lives here and nowhere else.
"""

from __future__ import annotations


class RetinaEdgeError(Exception):
    """Base class. ``type`` names the error for machines, ``http_status`` for the service."""

    type: str = "internal-error"
    http_status: int = 500

    def to_dict(self) -> dict[str, str]:
        """The ``{"type", "message"}`` object the CLI prints for a rejected input."""
        return {"type": self.type, "message": str(self)}


class ConfigError(RetinaEdgeError):
    """An option or an option combination that cannot be honoured (never silently rewritten)."""

    type = "invalid-configuration"
    http_status = 400


class MissingDependencyError(RetinaEdgeError):
    """An optional dependency is not installed; the message names the extra that provides it."""

    type = "missing-dependency"
    http_status = 500

    def __init__(self, module: str, extra: str, purpose: str) -> None:
        super().__init__(
            f"{purpose} needs the Python package '{module}', which is not installed. "
            f"Install the '{extra}' extra: pip install 'retinaedge[{extra}]'"
        )
        self.module = module
        self.extra = extra


class BundleError(RetinaEdgeError):
    """A model bundle is missing a file, has an invalid manifest or a checksum mismatch."""

    type = "invalid-model-bundle"
    http_status = 500


class ExportError(RetinaEdgeError):
    """Export could not produce a valid bundle."""

    type = "export-failed"


class CheckpointMismatchError(ExportError):
    """A state_dict does not fit the requested architecture (the message names the keys)."""

    type = "checkpoint-mismatch"


class ParityError(ExportError):
    """The exported model does not reproduce the PyTorch model's detections well enough."""

    type = "parity-failed"


class SelfTestError(RetinaEdgeError):
    """A backend failed the bundle's golden self-test."""

    type = "self-test-failed"
    http_status = 503
