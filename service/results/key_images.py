"""A study as far as it has been received: its instances and the images among them with findings.

A study has no "complete" event (its series do: :mod:`.completion`), so what is said of a study is
always *so far*: the done instances kept now. :func:`study_images` reads them from the stored rows alone:
each done instance whose stored result has findings (:func:`.selection.findings_by_frame`) is a *key image*,
with its kept header (evidence and patient identity, :mod:`.evidence`) for the documents that reference
it (the Key Object Selection, :mod:`.kos`). A done instance with findings whose header was not kept is
left out, with the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from retinaedge.service.results.evidence import header_from_json
from retinaedge.service.results.rows import Row, state_of
from retinaedge.service.results.selection import findings_by_frame


@dataclass(frozen=True)
class KeyImage:
    """A done instance with findings: its kept ``header``, the ``frames`` (0-based indexes, as in its
    result) that have findings, and how many ``findings`` it has."""

    sop_instance_uid: str
    series_instance_uid: str
    header: Dataset
    frames: tuple[int, ...]
    findings: int

    def to_json(self) -> dict[str, Any]:
        return {
            "sop_instance_uid": self.sop_instance_uid,
            "series_instance_uid": self.series_instance_uid,
            "frames": list(self.frames),
            "findings": self.findings,
        }


@dataclass(frozen=True)
class StudyImages:
    """A study's instances received so far by state, its key images in order of arrival, and the done
    instances with findings that could not be used (``left_out``: SOP Instance UID and reason)."""

    study_instance_uid: str
    counts: dict[str, int]
    images: tuple[KeyImage, ...]
    left_out: tuple[dict[str, str], ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "study_instance_uid": self.study_instance_uid,
            "instances": dict(self.counts),
            "key_images": [image.to_json() for image in self.images],
            "left_out": [dict(x) for x in self.left_out],
        }


def study_images(
    study_uid: str, rows: list[Row], identity: Callable[[str], str | None] = lambda _uid: None
) -> StudyImages:
    """The study's key images from its ``rows`` (every kept instance of it, in order of arrival);
    ``identity(uid)`` gives an instance's kept patient identity."""
    counts = {"received": len(rows), "pending": 0, "done": 0, "failed": 0, "not_applicable": 0}
    images: list[KeyImage] = []
    left_out: list[dict[str, str]] = []
    for r in rows:
        counts[state_of(r)] += 1
        result = r.result() if r.state == "done" else None
        if result is None:
            continue
        found = findings_by_frame(result)
        if not found:
            continue
        if not r.header_json:
            left_out.append({"sop_instance_uid": r.sop_instance_uid, "reason": "no header was kept"})
            continue
        images.append(
            KeyImage(
                sop_instance_uid=r.sop_instance_uid,
                series_instance_uid=r.series_uid,
                header=header_from_json(r.header_json, identity(r.sop_instance_uid)),
                frames=tuple(found),
                findings=sum(len(v) for v in found.values()),
            )
        )
    return StudyImages(study_uid, counts, tuple(images), tuple(left_out))
