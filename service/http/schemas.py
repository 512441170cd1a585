"""Pydantic models of every JSON body the service sends, for ``/openapi.json``.

The handlers build their bodies as plain dicts (the shapes the runtime's ``to_json`` methods produce) and
return them as :class:`~fastapi.responses.JSONResponse`; these models are the documented contract, declared
with ``response_model=``/``responses=`` on each route, and ``tests/test_routes.py`` validates real bodies
against them. They are not used to re-validate each response: FastAPI passes a returned ``Response``
through untouched, which keeps ``/v1/detect`` from validating its nested detections twice.

Models whose objects the service may extend later (the manifest, timings, engine details) allow extra
members; clients must ignore members they do not know.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Open(BaseModel):
    """A JSON object that may carry members beyond the documented ones."""

    model_config = ConfigDict(extra="allow")


class Problem(_Open):
    """An RFC 9457 problem document (``application/problem+json``), for every 4xx and 5xx."""

    type: str = Field(examples=["urn:retinaedge:error:not-found"])
    title: str
    status: int
    detail: str
    offered: list[str] | None = Field(
        default=None, description="406 from content negotiation: the media types this resource offers"
    )


class Health(BaseModel):
    """``GET /healthz``: the process is alive (says nothing about the model)."""

    status: Literal["alive"]


class EngineStatus(_Open):
    """The start-up backend decision and the state of a deferred (background) engine build."""

    decision: str | None
    background_build: str | None


class Ready(BaseModel):
    """``GET /readyz`` when the model is loaded, its golden self-test passed and the spool is writable."""

    status: Literal["ready", "degraded"]
    degraded: list[str] = Field(
        default_factory=list,
        description="why the service is degraded while it still takes instances (export destinations "
        "failing, SRs dead-lettered); empty when status is ready",
    )
    backend: str
    backend_reason: str
    precision: str = Field(
        default="fp32", description="the arithmetic the model ran in (fp32; bf16 or int8 after a passed gate)"
    )
    reason: str
    self_test: dict[str, Any]
    engine: EngineStatus
    model: str
    models: dict[str, Any] | None = Field(
        default=None, description="every model served: its backend and precision (GET /v1/models has more)"
    )
    dimse: dict[str, Any] | None = Field(
        default=None, description="the C-STORE SCP (state, AE title, port, TLS, open associations), if on"
    )
    clock: dict[str, Any] | None = Field(
        default=None,
        description="the system clock: synchronised (true, false, or null when it cannot be read), the "
        "offset of service time from it (s) and the wall-clock jumps seen since start (jumps, last_jump); "
        "a jump is shown, never acted on",
    )
    database: dict[str, Any] | None = Field(
        default=None,
        description="present when the state database was found damaged at start: why, where it was moved "
        "(damaged, moved_to) and how many result rows were salvaged (salvaged_rows)",
    )


class BackendInfo(BaseModel):
    """The backend serving the model (``onnxruntime`` or ``tensorrt``) and the worker's state."""

    name: str
    state: str
    reason: str
    precision: str = Field(
        default="fp32", description="the arithmetic the model ran in (fp32; bf16 or int8 after a passed gate)"
    )
    engine: EngineStatus


class ModelInfo(_Open):
    """``GET /v1/model``: the bundle's manifest (every member of ``manifest.json``) and the backend."""

    name: str
    architecture: str
    class_names: list[str]
    model_sha256: str | None
    format_version: int
    backend: BackendInfo


class ServedModel(_Open):
    """One model of ``GET /v1/models``: its state (``loading``, ``ready``, ``failed``, ``unavailable``),
    backend, classes, intended use (None: every image), the AE titles bound to it and its instances by
    state."""

    name: str
    sha256: str
    state: str
    reason: str | None
    backend: str | None
    precision: str | None
    class_names: list[str]
    intended_use: dict[str, Any] | None
    operating_point: bool
    ae_titles: list[str]
    instances: dict[str, int]


class ModelsList(BaseModel):
    """``GET /v1/models``."""

    models: list[ServedModel]


class ModelRef(BaseModel):
    """Which model produced a result."""

    name: str
    sha256: str


class Detection(BaseModel):
    """One box: ``box`` is ``[x1, y1, x2, y2]`` in the frame's pixel-edge coordinates. ``finding``:
    at or above the model's operating point for its class (every detection when the bundle has none);
    results kept before there was a flag do not carry it."""

    label: str
    class_id: int
    score: float
    box: list[float] = Field(min_length=4, max_length=4)
    finding: bool | None = None


class Frame(BaseModel):
    """The detections of frame ``index`` (0-based, in the instance's frame order)."""

    index: int
    detections: list[Detection]


class ImageInfo(_Open):
    """The instance's image as decoded."""

    rows: int
    columns: int
    frames: int
    photometric_interpretation: str
    transfer_syntax: str


class DetectResult(BaseModel):
    """``POST /v1/detect``: the detections of every frame of one instance."""

    sop_instance_uid: str
    model: ModelRef
    image: ImageInfo
    frames: list[Frame]
    timings_ms: dict[str, float] = Field(description="per stage; ``request`` is the whole request")
    backend: str
    backend_reason: str
    precision: str = Field(
        default="fp32", description="the arithmetic the model ran in (fp32; bf16 or int8 after a passed gate)"
    )


class ResultDone(DetectResult):
    """``GET /v1/results/{uid}`` once processed: the ``/v1/detect`` body of the instance."""

    state: Literal["done"]


class ResultError(BaseModel):
    """Why the instance failed: the error ``type`` (as in problem documents) and its message."""

    type: str | None
    message: str | None


class ResultFailed(BaseModel):
    """``GET /v1/results/{uid}`` of an instance the runtime rejected or could not process."""

    sop_instance_uid: str
    state: Literal["failed"]
    error: ResultError
    model: str | None = None  # whose processing failed


class FailedRule(BaseModel):
    """One rule of a model's intended use that an instance fails: what it expects and the value seen
    (never patient data; ``missing`` when absent)."""

    rule: str
    expected: str
    seen: str


class ModelRules(BaseModel):
    """The intended-use rules one model found failed."""

    model: str
    rules: list[FailedRule]


class ResultNotApplicable(BaseModel):
    """``GET /v1/results/{uid}`` of an instance outside the model's intended use: stored and acknowledged,
    never inferred, nothing exported; ``rules`` says why."""

    sop_instance_uid: str
    state: Literal["not-applicable"]
    model: str
    rules: list[FailedRule]
    models: list[ModelRules] | None = None  # every model's rules, when no model took it


class ResultsOfModels(BaseModel):
    """``GET /v1/results/{uid}`` (JSON) of an instance that several models took: each one's result (the
    JSON of ``?model=NAME``), in the order of the models."""

    sop_instance_uid: str
    results: list[dict[str, Any]]


class ResultPending(BaseModel):
    """``GET /v1/results/{uid}`` (202) while the instance waits to be processed; ask again later."""

    sop_instance_uid: str
    state: Literal["pending"]
    model: str | None = None  # which model's result is awaited


class InstanceCounts(BaseModel):
    """The instances of a series (or a study) received so far, by state."""

    received: int
    pending: int
    done: int
    failed: int
    not_applicable: int = 0  # outside the model's intended use: stored, never inferred


class SeriesCollecting(BaseModel):
    """``/v1/series/{uid}`` (202) while instances are pending or the quiet period has not passed."""

    series_instance_uid: str
    model: str | None = None  # whose results of the series
    state: Literal["collecting"]
    completed_by: None
    instances: InstanceCounts
    quiet_period_s: float


class FindingDetection(BaseModel):
    """A 2D detection a finding links: frame ``frame`` of the instance, stack slice ``slice``."""

    sop_instance_uid: str
    frame: int
    slice: int
    position_mm: float
    box: list[float] = Field(min_length=4, max_length=4)
    score: float


class BoundingBox(BaseModel):
    """An axis-aligned box in patient coordinates (LPS mm): its ``min`` and ``max`` corners."""

    min: list[float]
    max: list[float]


class Finding(BaseModel):
    """One lesion candidate across slices (patient coordinates: LPS mm)."""

    id: int
    label: str
    class_id: int
    slices: int
    extent_slices: int
    first_slice: int
    last_slice: int
    first_position_mm: float
    last_position_mm: float
    extent_mm: float
    bbox_lps_mm: BoundingBox
    centroid_lps_mm: list[float]
    volume_mm3: float
    volume_ellipse_mm3: float
    max_score: float
    mean_score: float
    detections: list[FindingDetection]


class LeftOut(BaseModel):
    """An instance of the series (or study) not used for the findings (or key images), and why."""

    sop_instance_uid: str
    reason: str


class KeyImage(BaseModel):
    """A done instance of the study with findings (what the study's Key Object Selection lists)."""

    sop_instance_uid: str
    series_instance_uid: str
    frames: list[int] = Field(
        description="the frames with findings: indexes (0-based) as in frames[].index of the instance's result"
    )
    findings: int = Field(description="how many findings the instance has")


class StudyResult(BaseModel):
    """``GET /v1/studies/{uid}``: the study so far (a study has no complete state): its instances by
    state and those with findings (``key_images``, in order of arrival); ``left_out``: instances with
    findings that no document can reference (no header kept)."""

    study_instance_uid: str
    instances: InstanceCounts
    key_images: list[KeyImage]
    left_out: list[LeftOut]
    model: ModelRef


class SeriesComplete(BaseModel):
    """``/v1/series/{uid}`` once complete: the 3D findings over every usable instance.

    ``stack`` is null (and the geometry members are absent) when no instance could be used.
    """

    series_instance_uid: str
    state: Literal["complete"]
    completed_by: Literal["quiet-period", "request"]
    instances: InstanceCounts
    model: ModelRef
    frame_of_reference_uid: str | None = None
    frames: int | None = None
    detections_considered: int | None = None
    parameters: dict[str, Any] | None = None
    stack: dict[str, Any] | None
    findings: list[Finding]
    left_out: list[LeftOut]


class DicomAttribute(_Open):
    """One attribute in the DICOM JSON model (PS3.18 F.2)."""

    vr: str
    Value: list[Any] | None = None


class StoreInstancesResponse(BaseModel):
    """``POST /dicomweb/studies`` (``application/dicom+json``, PS3.18 10.5.3): what was stored, what not.

    200 all stored, 202 some stored and some failed, 409 none stored.
    """

    model_config = ConfigDict(populate_by_name=True)

    referenced: DicomAttribute | None = Field(
        default=None, alias="00081199", description="Referenced SOP Sequence: the stored instances"
    )
    failed: DicomAttribute | None = Field(
        default=None, alias="00081198", description="Failed SOP Sequence, with a Failure Reason each"
    )


class ExportAttempt(BaseModel):
    """The last finished attempt of a destination, or one attempt of a job."""

    outcome: Literal["delivered", "failed", "unknown", "interrupted", "in-flight"]
    detail: str | None
    at: float | None = Field(default=None, description="when it started (epoch seconds)")
    started_at: float | None = None
    finished_at: float | None = None


class ExportDestinationStatus(BaseModel):
    """One configured export destination (no secret is ever shown)."""

    name: str
    type: str = Field(
        description="the destination type: one of the destination types' registry "
        "(service/outbox/destinations.py), listed in /openapi.json as this member's enum"
    )
    target: str = Field(description="AE@host:port, or the DICOMweb URL")
    instance_sr: bool = Field(description='it receives each instance\'s SR ("sr" in documents)')
    series_sr: bool = Field(description='it receives each complete series\' SR ("series-sr" in documents)')
    documents: list[str] = Field(
        description="the result documents it receives, by kind (service/results/documents.py: sr, "
        "series-sr, ...)"
    )
    state: Literal["ok", "failing"] = Field(description="failing: SRs wait and the last attempt failed")
    jobs: dict[str, int] = Field(description="jobs by state: pending, delivered, dead")
    oldest_pending_at: float | None
    last_attempt: ExportAttempt | None
    last_delivered_at: float | None
    attempts: dict[str, int] = Field(description="attempts so far by outcome (kept across restarts)")
    duplicates: dict[str, int] = Field(
        description="possible: delivered after an attempt that was interrupted or unanswered (the peer may "
        "hold it twice); confirmed: the peer said it already had the SOP instance"
    )
    dead_lettered: int
    skipped: int = Field(
        default=0,
        description="documents not sent because their subject had nothing to show (an instance without "
        "findings has no GSPS, a study without any no KOS)",
    )


class ExportJob(BaseModel):
    """One delivery job of a result document."""

    id: int
    destination: str
    kind: Literal["instance", "series", "study"] = Field(
        description="what the document is made of (its scope)"
    )
    document: str = Field(
        description="the document's kind (service/results/documents.py: sr, series-sr, ...)"
    )
    model: str = Field(default="", description="the model whose result the document shows")
    model_sha256: str | None = Field(
        default=None, description="the version (model sha256) that produced an instance's result"
    )
    subject_uid: str = Field(
        description="SOP Instance UID (instance), Series Instance UID (series) or Study Instance UID (study)"
    )
    sr_sop_instance_uid: str | None = Field(
        description="the document's SOP Instance UID once built (its first, for one of several instances)"
    )
    sop_instance_uids: list[str] = Field(
        default_factory=list,
        description="the document's SOP Instance UIDs once built: one, or one per frame for sc",
    )
    state: Literal["pending", "delivered", "dead"]
    attempts: int
    created_at: float
    next_attempt_at: float | None
    finished_at: float | None
    last_error: str | None
    possibly_delivered_before: bool = Field(
        description="an earlier attempt was interrupted or unanswered: the peer may already hold the SR"
    )
    duplicate: Literal["possible", "confirmed"] | None
    history: list[ExportAttempt] | None = Field(default=None, description="GET /v1/exports/{id} only")


class ExportsStatus(BaseModel):
    """``GET /v1/exports``: every destination and the jobs asked for (newest first)."""

    destinations: list[ExportDestinationStatus]
    jobs: list[ExportJob]


class ExportsRetried(BaseModel):
    """``POST /v1/exports/retry``: how many dead-lettered jobs are pending again."""

    requeued: int
