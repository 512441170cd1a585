"""Detections of one instance as a DICOM SR TID 1500 Measurement Report (highdicom Comprehensive 3D SR).

One Planar ROI group (TID 1410) per box: an image region (closed POLYLINE in the frame's pixel coordinates,
PS3.3 C.18.6.1.1: (0, 0) is the top-left corner of the top-left pixel) on the referenced frame, the class
as finding type, the algorithm identification, and the score as a measurement. Class and score codes use
the private coding scheme ``99RETINAEDGE`` (there are no standard codes for a model's own classes).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

SCHEME = "99RETINAEDGE"


def build_sr(image: Dataset, result: dict[str, Any], model_name: str, model_sha256: str) -> Dataset:
    """``image`` is the source instance's header (no pixel data needed); ``result`` is a /v1/detect body."""
    from highdicom.sr import (
        AlgorithmIdentification,
        CodedConcept,
        Comprehensive3DSR,
        DeviceObserverIdentifyingAttributes,
        GraphicTypeValues,
        ImageRegion,
        Measurement,
        MeasurementReport,
        ObservationContext,
        ObserverContext,
        PlanarROIMeasurementsAndQualitativeEvaluations,
        SourceImageForRegion,
        TrackingIdentifier,
    )
    from pydicom.sr.codedict import codes

    image = _with_type2(image)
    algorithm = AlgorithmIdentification(name=model_name[:64], version=model_sha256[:16])
    score_name = CodedConcept(value="score", scheme_designator=SCHEME, meaning="Detection score")
    no_units = CodedConcept(value="1", scheme_designator="UCUM", meaning="no units")
    multiframe = int(image.get("NumberOfFrames", 1) or 1) > 1
    groups = []
    for frame in result.get("frames", []):
        for k, det in enumerate(frame["detections"]):
            x1, y1, x2, y2 = (float(v) for v in det["box"])
            polyline = np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2], [x1, y1]], dtype=np.float64)
            source = _source(SourceImageForRegion, image, frame["index"] + 1 if multiframe else None)
            groups.append(
                PlanarROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=TrackingIdentifier(
                        uid=generate_uid(), identifier=f"frame {frame['index'] + 1} detection {k + 1}"
                    ),
                    referenced_region=ImageRegion(GraphicTypeValues.POLYLINE, polyline, source),
                    finding_type=CodedConcept(
                        value=str(det["class_id"]), scheme_designator=SCHEME, meaning=str(det["label"])[:64]
                    ),
                    algorithm_id=algorithm,
                    measurements=[
                        Measurement(
                            name=score_name, value=float(det["score"]), unit=no_units, algorithm_id=algorithm
                        )
                    ],
                )
            )
    observer = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=generate_uid(), name="retinaedge", model_name=model_name[:64]
        ),
    )
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=CodedConcept(
            value="imaging", scheme_designator=SCHEME, meaning="Imaging procedure"
        ),
        imaging_measurements=groups or None,
        referenced_images=None if groups else [image],
    )
    return Comprehensive3DSR(
        evidence=[image],
        content=report,
        series_instance_uid=generate_uid(),
        series_number=9001,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="retinaedge",
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=f"retinaedge detections ({model_name})"[:64],
    )


def _source(cls: Any, image: Dataset, frame_number: int | None) -> Any:
    """The region's source image; frame numbers only where highdicom accepts the SOP class as multi-frame
    (a legacy single-frame class carrying Number of Frames is referenced as a whole)."""
    if frame_number is not None:
        try:
            return cls.from_source_image(image, referenced_frame_numbers=[frame_number])
        except TypeError:
            pass
    return cls.from_source_image(image)


# Type 2 attributes of the Patient and General Study modules (PS3.3 C.7.1.1, C.7.2.1) that the SR copies:
# present (possibly empty) in a conformant image, but scanners and test data sometimes omit them.
_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


def _with_type2(image: Dataset) -> Dataset:
    """A copy of ``image`` with missing Type 2 patient/study attributes present and empty."""
    import copy

    out = copy.deepcopy(image)
    for keyword in _TYPE2:
        if keyword not in out:
            setattr(out, keyword, "")
    return out
