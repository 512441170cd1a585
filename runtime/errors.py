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


class BenchmarkError(RetinaEdgeError):
    """A benchmark phase could not complete (a runner process failed, the service did not start)."""

    type = "benchmark-failed"
    http_status = 500


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


class DicomInputError(RetinaEdgeError):
    """Base for everything wrong with an incoming DICOM instance (always the client's input, 4xx)."""

    type = "invalid-dicom"
    http_status = 400


class MalformedDicomError(DicomInputError):
    """Not parseable as DICOM, or inconsistent header values."""

    type = "malformed-dicom"
    http_status = 400


class TruncatedDicomError(MalformedDicomError):
    """Fewer bytes present than the header declares (a cut file); nothing partial is ever decoded."""

    type = "truncated-dicom"


class UnsupportedTransferSyntaxError(DicomInputError):
    """A transfer syntax no installed decoder handles (the message says what to install, if anything)."""

    type = "unsupported-transfer-syntax"
    http_status = 415


class UnsupportedPhotometricError(DicomInputError):
    """A photometric interpretation or pixel layout the preprocessing does not handle."""

    type = "unsupported-photometric-interpretation"
    http_status = 415


class NoPixelDataError(DicomInputError):
    """Not an image: no pixel data, or no usable frame."""

    type = "no-pixel-data"
    http_status = 422


class OverBudgetError(DicomInputError):
    """The header asks for more memory, frames or bytes than the configured limits allow."""

    type = "over-budget"
    http_status = 413


class RequestError(RetinaEdgeError):
    """An HTTP request the service cannot take as sent (transport level, before any DICOM parsing)."""

    type = "bad-request"
    http_status = 400


class PayloadTooLargeError(RequestError):
    type = "payload-too-large"
    http_status = 413


class UnsupportedMediaTypeError(RequestError):
    type = "unsupported-media-type"
    http_status = 415


class RequestTimeoutError(RequestError):
    """The client stopped sending its request body for longer than the idle timeout."""

    type = "request-timeout"
    http_status = 408


class UnauthorizedError(RequestError):
    type = "unauthorized"
    http_status = 401


class NotAcceptableError(RequestError):
    """Nothing the client accepts (its Accept header) is offered; ``offered`` lists what is."""

    type = "not-acceptable"
    http_status = 406

    def __init__(self, message: str, offered: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.offered = offered


class NotFoundError(RequestError):
    """What the request names does not exist here (e.g. a result document this resource does not have)."""

    type = "not-found"
    http_status = 404


class UnknownModelError(NotFoundError):
    """The request names a model this appliance does not serve (the message lists those it does)."""

    type = "unknown-model"


class ForbiddenError(RequestError):
    """The request is refused as configured (e.g. staging a model without an API token set)."""

    type = "forbidden"
    http_status = 403


class ConflictError(RequestError):
    """The request conflicts with the current state (e.g. a rollback with no earlier version)."""

    type = "conflict"
    http_status = 409


class BundleRejectedError(RequestError):
    """A bundle sent to be staged is refused: ``type`` says why (``signature-rejected`` for a signature
    that does not verify, ``invalid-model-bundle`` for anything else); nothing of it is kept."""

    http_status = 422

    def __init__(self, message: str, type_: str = "invalid-model-bundle") -> None:
        super().__init__(message)
        self.type = type_


class OverloadedError(RetinaEdgeError):
    """The inference queue is full or too old; the client should retry after ``retry_after`` seconds."""

    type = "overloaded"
    http_status = 503

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NotReadyError(RetinaEdgeError):
    """The model is not loaded or failed its self-test."""

    type = "not-ready"
    http_status = 503


class InsufficientStorageError(RetinaEdgeError):
    """The spool disk is below its reserve: nothing new is accepted."""

    type = "insufficient-storage"
    http_status = 507


class StorageUnavailableError(RetinaEdgeError):
    """The spool or the database cannot be written or read now (a read-only remount after an I/O error,
    an I/O error, a lock): nothing is lost, the client should retry after ``retry_after`` seconds."""

    type = "storage-unavailable"
    http_status = 503

    def __init__(self, message: str, retry_after: int = 30) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class StateVersionError(RetinaEdgeError):
    """The service's database (``state.sqlite3``) was written by a newer version than this one: it is
    never downgraded, so the service does not start on it."""

    type = "state-too-new"
    http_status = 500
