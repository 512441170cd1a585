"""Series completion and 3D findings from the instances the service has kept.

A series is *complete* when none of its instances is still pending and either no instance of it has
arrived for the quiet period (``series_quiet_s``) or a client asked for completion after the last one
arrived (``POST /v1/series/{uid}/complete``). An instance arriving later re-opens the series: its
findings are then computed again over everything received.

Findings come from the stored rows alone: each done instance's header (DICOM JSON, kept for the SR) gives
the plane geometry of its frames (:func:`retinaedge.runtime.slices.frames_from_dataset`), its stored
result gives the 2D detections, and :func:`retinaedge.runtime.findings.analyse_series` links them. Failed
instances are listed; their frames are absent from the stack (and show as missing slices when they
leave a gap).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from retinaedge.runtime.findings import LinkParams, SeriesResult, analyse_series
from retinaedge.runtime.instance_result import Detection
from retinaedge.runtime.slices import FrameRef, frames_from_dataset
from retinaedge.service.results.evidence import header_from_json
from retinaedge.service.results.rows import Row, state_of
from retinaedge.service.results.selection import frame_findings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SeriesStatus:
    """Where a series stands at time ``now`` (epoch seconds).

    ``state``: ``collecting`` or ``complete``; ``completed_by``: ``quiet-period`` or ``request`` when
    complete; ``retry_after_s``: when to ask again while collecting (whole seconds, at least 1).
    """

    state: str
    received: int
    pending: int
    done: int
    failed: int
    last_received_at: float
    completed_by: str | None
    retry_after_s: int
    not_applicable: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "completed_by": self.completed_by,
            "instances": {
                "received": self.received,
                "pending": self.pending,
                "done": self.done,
                "failed": self.failed,
                "not_applicable": self.not_applicable,
            },
        }


def series_status(rows: list[Row], now: float, quiet_s: float, requested_at: float | None) -> SeriesStatus:
    """Completion of a series from its rows (at least one) and the last completion request."""
    counts = {"pending": 0, "done": 0, "failed": 0, "not_applicable": 0}
    for r in rows:
        counts[state_of(r)] += 1
    last = max(r.received_at for r in rows)
    quiet_left = last + quiet_s - now
    by: str | None = None
    if counts["pending"] == 0:
        if requested_at is not None and requested_at >= last:
            by = "request"
        elif quiet_left <= 0:
            by = "quiet-period"
    retry = 1 if counts["pending"] else max(1, math.ceil(quiet_left))
    return SeriesStatus(
        state="complete" if by else "collecting",
        received=len(rows),
        pending=counts["pending"],
        done=counts["done"],
        failed=counts["failed"],
        not_applicable=counts["not_applicable"],
        last_received_at=last,
        completed_by=by,
        retry_after_s=retry,
    )


@dataclass(frozen=True)
class SeriesFindings:
    """The linked series (``result``), the headers of the instances it used (by SOP Instance UID) and
    the instances left out with why (failed, or no header kept)."""

    result: SeriesResult
    headers: dict[str, Dataset]
    left_out: list[dict[str, str]]


def _detections(result: dict[str, Any]) -> dict[int, list[Detection]]:
    """Frame index -> the findings of a stored ``/v1/detect``-shaped result (the detections at or above
    the model's operating point, :mod:`.selection`): series findings link findings only."""
    out: dict[int, list[Detection]] = {}
    for frame in result.get("frames", []):
        out[int(frame["index"])] = [
            Detection(
                label=str(d["label"]),
                class_id=int(d["class_id"]),
                score=float(d["score"]),
                box=(float(d["box"][0]), float(d["box"][1]), float(d["box"][2]), float(d["box"][3])),
            )
            for d in frame_findings(frame)
        ]
    return out


def series_findings(
    rows: list[Row], params: LinkParams, identity: Callable[[str], str | None] = lambda _uid: None
) -> SeriesFindings | None:
    """Link the done instances of one series; None when none of them can be used. ``identity(uid)``
    gives an instance's kept patient identity (:mod:`.evidence`) for the headers of the series SR."""
    frames: list[FrameRef] = []
    detections: dict[tuple[str, int], list[Detection]] = {}
    headers: dict[str, Dataset] = {}
    left_out: list[dict[str, str]] = []
    for r in rows:
        if state_of(r) == "not_applicable":  # not the model's image: neither used nor a missing slice
            continue
        if r.state == "failed":
            left_out.append(
                {"sop_instance_uid": r.sop_instance_uid, "reason": f"failed: {r.error_type or 'error'}"}
            )
            continue
        result = r.result()
        if r.state != "done" or result is None:
            continue
        if not r.header_json:
            left_out.append({"sop_instance_uid": r.sop_instance_uid, "reason": "no header was kept"})
            continue
        ds = header_from_json(r.header_json, identity(r.sop_instance_uid))
        headers[r.sop_instance_uid] = ds
        frames += frames_from_dataset(ds)
        for index, dets in _detections(result).items():
            detections[(r.sop_instance_uid, index)] = dets
    if not frames:
        return None
    results = analyse_series(frames, detections, params)
    if len(results) != 1:  # one series UID by construction; guard against rows edited by hand
        log.warning("series rows grouped into %d series", len(results))
    return SeriesFindings(result=results[0], headers=headers, left_out=left_out)
