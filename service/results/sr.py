"""Detections as DICOM SR TID 1500 Measurement Reports (highdicom Comprehensive 3D SR).

Per instance (:func:`build_sr`): one Planar ROI group (TID 1410) per box: an image region (closed
POLYLINE in the frame's pixel coordinates, PS3.3 C.18.6.1.1: (0, 0) is the top-left corner of the
top-left pixel) on the referenced frame, the class as finding type, the algorithm identification, and the
score as a measurement.

Per series (:func:`build_series_sr`): one Volumetric ROI group (TID 1411) per 3D finding whose volume
surface is the finding's boxes as closed POLYGONs in patient coordinates (SCOORD3D, LPS mm, in the
series' Frame of Reference; one polygon per detected slice, or the two faces of the slab when it was
detected on one slice only), with its volume (mm3) and maximum and mean score; beside it the Planar ROI
group of every 2D box it links, tracked as ``finding N slice K``.

Class and score codes use the private coding scheme ``99RETINAEDGE`` (there are no standard codes for a
model's own classes).

:func:`instance_sr` and :func:`series_sr` are the builders of the result documents ``sr`` and
``series-sr`` (:mod:`.documents`): a view of a done instance or a complete series -> the SR.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from retinaedge.runtime.findings import SeriesResult
from retinaedge.service.results.evidence import header_from_json
from retinaedge.service.results.views import InstanceView, SeriesView, Unavailable

SCHEME = "99RETINAEDGE"


def instance_sr(view: InstanceView) -> Dataset:
    """The document ``sr``: the instance's TID 1500 SR from its kept header (evidence and identity)
    and result; :class:`Unavailable` when no header was kept."""
    if not view.header_json:
        raise Unavailable("no source header was kept for this instance")
    header = header_from_json(view.header_json, view.identity)
    return build_sr(header, view.result, view.model_name, view.model_sha256)


def series_sr(view: SeriesView) -> Dataset:
    """The document ``series-sr``: the complete series' 3D findings; :class:`Unavailable` when no
    instance of it could be analysed."""
    found = view.found
    if found is None:
        raise Unavailable("no instance of this series could be analysed")
    return build_series_sr(found.headers, found.result, view.model_name, view.model_sha256)


def build_sr(image: Dataset, result: dict[str, Any], model_name: str, model_sha256: str) -> Dataset:
    """``image`` is the source instance's header (no pixel data needed); ``result`` is a /v1/detect body."""
    from highdicom.sr import AlgorithmIdentification

    image = _with_type2(image)
    algorithm = AlgorithmIdentification(name=model_name[:64], version=model_sha256[:16])
    groups = [
        _planar_group(image, frame["index"], det, algorithm, f"frame {frame['index'] + 1} detection {k + 1}")
        for frame in result.get("frames", [])
        for k, det in enumerate(frame["detections"])
    ]
    summary = _summary(algorithm, "detections", "Number of detections", len(groups), [image])
    return _report([image], [summary, *groups], model_name, f"retinaedge detections ({model_name})")


def build_series_sr(
    images: dict[str, Dataset], series: SeriesResult, model_name: str, model_sha256: str
) -> Dataset:
    """The series' 3D findings (module docstring). ``images``: SOP Instance UID -> header of every
    instance of the series that went into ``series`` (the SR's evidence); ``series`` is consistent or
    has no findings."""
    from highdicom.sr import (
        AlgorithmIdentification,
        CodedConcept,
        GraphicTypeValues3D,
        Measurement,
        SourceImageForSegmentation,
        TrackingIdentifier,
        VolumeSurface,
        VolumetricROIMeasurementsAndQualitativeEvaluations,
    )
    from pydicom.sr.codedict import codes

    evidence = {uid: _with_type2(ds) for uid, ds in images.items()}
    algorithm = AlgorithmIdentification(name=model_name[:64], version=model_sha256[:16])
    stack = series.stack
    frames = {f.key: f for f in stack.frames}
    normal = np.asarray(stack.normal)
    groups: list[Any] = []
    for number, finding in enumerate(series.findings, start=1):
        polygons = []
        for ref in finding.detections:
            geometry = frames[(ref.sop_instance_uid, ref.frame_index)].geometry
            assert geometry is not None  # findings exist only on consistent stacks
            x1, y1, x2, y2 = ref.box
            polygons.append(
                geometry.edge_to_patient(np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2], [x1, y1]]))
            )
        if len(polygons) == 1:  # one slice: the two faces of its slab
            half = stack.slab_mm / 2.0 * normal
            polygons = [polygons[0] - half, polygons[0] + half]
        sources = [
            _source(SourceImageForSegmentation, evidence[uid], None)
            for uid in dict.fromkeys(r.sop_instance_uid for r in finding.detections)
        ]
        finding_type = CodedConcept(
            value=str(finding.class_id), scheme_designator=SCHEME, meaning=finding.label[:64]
        )
        groups.append(
            VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=TrackingIdentifier(uid=generate_uid(), identifier=f"finding {number}"),
                referenced_volume_surface=VolumeSurface(
                    GraphicTypeValues3D.POLYGON,
                    [np.asarray(p, dtype=np.float64) for p in polygons],
                    stack.frame_of_reference_uid,
                    source_images=sources,
                ),
                finding_type=finding_type,
                algorithm_id=algorithm,
                measurements=[
                    Measurement(
                        name=codes.SCT.Volume,
                        value=round(finding.volume_mm3, 3),
                        unit=codes.UCUM.CubicMillimeter,
                        algorithm_id=algorithm,
                    ),
                    _score(finding.max_score, algorithm, "max-score", "Maximum detection score"),
                    _score(finding.mean_score, algorithm, "mean-score", "Mean detection score"),
                ],
            )
        )
        for ref in finding.detections:
            det = {"class_id": finding.class_id, "label": finding.label, "score": ref.score, "box": ref.box}
            groups.append(
                _planar_group(
                    evidence[ref.sop_instance_uid],
                    ref.frame_index,
                    det,
                    algorithm,
                    f"finding {number} slice {ref.slice + 1}",
                )
            )
    summary = _summary(
        algorithm, "findings", "Number of findings", len(series.findings), list(evidence.values())
    )
    return _report(
        list(evidence.values()),
        [summary, *groups],
        model_name,
        f"retinaedge series findings ({model_name})",
    )


def _summary(algorithm: Any, code: str, meaning: str, count: int, images: list[Dataset]) -> Any:
    """TID 1501 group stating how many detections or findings there are (also when there are none:
    a TID 1500 report needs at least one measurement group, and "nothing found" is a result)."""
    from highdicom.sr import (
        CodedConcept,
        Measurement,
        MeasurementsAndQualitativeEvaluations,
        SourceImageForMeasurementGroup,
        TrackingIdentifier,
    )

    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=generate_uid(), identifier="summary"),
        algorithm_id=algorithm,
        measurements=[
            Measurement(
                name=CodedConcept(value=code, scheme_designator=SCHEME, meaning=meaning),
                value=count,
                unit=CodedConcept(value="{count}", scheme_designator="UCUM", meaning="count"),
                algorithm_id=algorithm,
            )
        ],
        source_images=[SourceImageForMeasurementGroup.from_source_image(i) for i in images],
    )


def _score(value: float, algorithm: Any, code: str = "score", meaning: str = "Detection score") -> Any:
    """A unitless score measurement (private code)."""
    from highdicom.sr import CodedConcept, Measurement

    return Measurement(
        name=CodedConcept(value=code, scheme_designator=SCHEME, meaning=meaning),
        value=float(value),
        unit=CodedConcept(value="1", scheme_designator="UCUM", meaning="no units"),
        algorithm_id=algorithm,
    )


def _planar_group(image: Dataset, frame_index: int, det: dict[str, Any], algorithm: Any, name: str) -> Any:
    """TID 1410 for one 2D box ``det`` (``class_id``, ``label``, ``score``, ``box``) on frame
    ``frame_index`` (0-based) of ``image``."""
    from highdicom.sr import (
        CodedConcept,
        GraphicTypeValues,
        ImageRegion,
        PlanarROIMeasurementsAndQualitativeEvaluations,
        SourceImageForRegion,
        TrackingIdentifier,
    )

    multiframe = int(image.get("NumberOfFrames", 1) or 1) > 1
    x1, y1, x2, y2 = (float(v) for v in det["box"])
    polyline = np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2], [x1, y1]], dtype=np.float64)
    source = _source(SourceImageForRegion, image, frame_index + 1 if multiframe else None)
    return PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=generate_uid(), identifier=name),
        referenced_region=ImageRegion(GraphicTypeValues.POLYLINE, polyline, source),
        finding_type=CodedConcept(
            value=str(det["class_id"]), scheme_designator=SCHEME, meaning=str(det["label"])[:64]
        ),
        algorithm_id=algorithm,
        measurements=[_score(float(det["score"]), algorithm)],
    )


def _report(evidence: list[Dataset], groups: list[Any], model_name: str, description: str) -> Dataset:
    """The Comprehensive 3D SR around the measurement ``groups`` (at least one)."""
    from highdicom.sr import (
        Comprehensive3DSR,
        DeviceObserverIdentifyingAttributes,
        MeasurementReport,
        ObservationContext,
        ObserverContext,
    )
    from pydicom.sr.codedict import codes

    observer = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=generate_uid(), name="retinaedge", model_name=model_name[:64]
        ),
    )
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=codes.SCT.ImagingProcedure,  # SNOMED CT 363679005, a standard code
        imaging_measurements=groups,
    )
    sr = Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=generate_uid(),
        series_number=9001,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="retinaedge",
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=description[:64],
    )
    # The private scheme of the model's own class and score codes, declared (PS3.3 C.12.1.1.5).
    scheme = Dataset()
    scheme.CodingSchemeDesignator = SCHEME
    scheme.CodingSchemeName = "retinaedge model classes and scores"
    scheme.CodingSchemeResponsibleOrganization = "retinaedge"
    sr.CodingSchemeIdentificationSequence = [scheme]
    return sr


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
