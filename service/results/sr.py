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

Documents show findings (the model's operating point; :func:`.views.frame_findings`), not every detection.

Codes, as IHE AI Results asks of a creator: a class is named by the standard code the bundle's manifest
gives it (``class_codes``: SNOMED CT, RadLex), and by the private coding scheme ``99RETINAEDGE`` only when
it has none (the scheme is then declared in the Coding Scheme Identification Sequence); the score is
(111012, DCM, "Certainty of Finding"), unitless 0..1 (a series finding's maximum and mean carry the
derivations Maximum and Mean); the count of findings is (246206008, SCT, "Number of lesions"). The
algorithm is identified in each group (TID 4019: the model's name, and its sha256 as the version) and in
the Contributing Equipment Sequence (purpose Processing Equipment: the manufacturer, the model's name,
retinaedge's version and the model's sha256 as software versions, and this device's identity).

:func:`instance_sr` and :func:`series_sr` are the builders of the result documents ``sr`` and
``series-sr`` (:mod:`.documents`): a view of a done instance or a complete series -> the SR.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from retinaedge.runtime import __version__
from retinaedge.runtime.findings import SeriesResult
from retinaedge.runtime.manifest import ClassCode
from retinaedge.service.results.appliance import MANUFACTURER, device_identity
from retinaedge.service.results.dicomdoc import document_series_uid, with_type2
from retinaedge.service.results.evidence import header_from_json
from retinaedge.service.results.selection import frame_findings
from retinaedge.service.results.views import InstanceView, SeriesView, Unavailable

SCHEME = "99RETINAEDGE"


def instance_sr(view: InstanceView) -> Dataset:
    """The document ``sr``: the instance's TID 1500 SR from its kept header (evidence and identity)
    and result; :class:`Unavailable` when no header was kept."""
    if not view.header_json:
        raise Unavailable("no source header was kept for this instance")
    header = header_from_json(view.header_json, view.identity)
    return build_sr(header, view.result, view.model_name, view.model_sha256, codes=_class_codes(view))


def series_sr(view: SeriesView) -> Dataset:
    """The document ``series-sr``: the complete series' 3D findings; :class:`Unavailable` when no
    instance of it could be analysed."""
    found = view.found
    if found is None:
        raise Unavailable("no instance of this series could be analysed")
    return build_series_sr(
        found.headers, found.result, view.model_name, view.model_sha256, codes=_class_codes(view)
    )


def _class_codes(view: Any) -> Mapping[str, ClassCode]:
    """The standard class codes of the model that made the view's result (none: the private scheme)."""
    manifest = getattr(view, "manifest", None)
    return manifest.class_codes if manifest is not None else {}


def build_sr(
    image: Dataset,
    result: dict[str, Any],
    model_name: str,
    model_sha256: str,
    *,
    codes: Mapping[str, ClassCode] | None = None,
) -> Dataset:
    """``image`` is the source instance's header (no pixel data needed); ``result`` is a /v1/detect body;
    ``codes`` the standard codes of the model's classes (module docstring). Only findings are reported."""
    from highdicom.sr import AlgorithmIdentification

    image = with_type2(image)
    codes = codes or {}
    algorithm = AlgorithmIdentification(name=model_name[:64], version=model_sha256[:16])
    groups = [
        _planar_group(
            image, frame["index"], det, algorithm, f"frame {frame['index'] + 1} finding {k + 1}", codes
        )
        for frame in result.get("frames", [])
        for k, det in enumerate(frame_findings(frame))
    ]
    summary = _summary(algorithm, len(groups), [image])
    private = any(str(g["label"]) not in codes for f in result.get("frames", []) for g in frame_findings(f))
    return _report(
        [image],
        [summary, *groups],
        model_name,
        model_sha256,
        f"retinaedge findings ({model_name})",
        private,
        kind="sr",
    )


def build_series_sr(
    images: dict[str, Dataset],
    series: SeriesResult,
    model_name: str,
    model_sha256: str,
    *,
    codes: Mapping[str, ClassCode] | None = None,
) -> Dataset:
    """The series' 3D findings (module docstring). ``images``: SOP Instance UID -> header of every
    instance of the series that went into ``series`` (the SR's evidence); ``series`` is consistent or
    has no findings."""
    from highdicom.sr import (
        AlgorithmIdentification,
        GraphicTypeValues3D,
        Measurement,
        SourceImageForSegmentation,
        TrackingIdentifier,
        VolumeSurface,
        VolumetricROIMeasurementsAndQualitativeEvaluations,
    )
    from pydicom.sr.codedict import codes as codes_module

    evidence = {uid: with_type2(ds) for uid, ds in images.items()}
    codes = codes or {}
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
        finding_type = _finding_type(finding.class_id, finding.label, codes)
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
                        name=codes_module.SCT.Volume,
                        value=round(finding.volume_mm3, 3),
                        unit=codes_module.UCUM.CubicMillimeter,
                        algorithm_id=algorithm,
                    ),
                    _score(finding.max_score, algorithm, codes_module.SCT.Maximum),
                    _score(finding.mean_score, algorithm, codes_module.SCT.Mean),
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
                    codes,
                )
            )
    summary = _summary(algorithm, len(series.findings), list(evidence.values()))
    private = any(f.label not in codes for f in series.findings)
    return _report(
        list(evidence.values()),
        [summary, *groups],
        model_name,
        model_sha256,
        f"retinaedge series findings ({model_name})",
        private,
        kind="series-sr",
    )


def _summary(algorithm: Any, count: int, images: list[Dataset]) -> Any:
    """TID 1501 group stating how many findings there are (also when there are none: a TID 1500 report
    needs at least one measurement group, and "nothing found" is a result)."""
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
                name=CodedConcept(value="246206008", scheme_designator="SCT", meaning="Number of lesions"),
                value=count,
                unit=CodedConcept(value="{count}", scheme_designator="UCUM", meaning="count"),
                algorithm_id=algorithm,
            )
        ],
        source_images=[SourceImageForMeasurementGroup.from_source_image(i) for i in images],
    )


def _score(value: float, algorithm: Any, derivation: Any = None) -> Any:
    """The detection score as (111012, DCM, "Certainty of Finding"), unitless 0..1; ``derivation``
    (Maximum, Mean) for a series finding's summary of its boxes' scores."""
    from highdicom.sr import CodedConcept, Measurement

    return Measurement(
        name=CodedConcept(value="111012", scheme_designator="DCM", meaning="Certainty of Finding"),
        value=float(value),
        unit=CodedConcept(value="1", scheme_designator="UCUM", meaning="no units"),
        algorithm_id=algorithm,
        derivation=derivation,
    )


def _finding_type(class_id: int, label: str, codes: Mapping[str, ClassCode]) -> Any:
    """The class as a coded finding type: its standard code, else the private scheme."""
    from highdicom.sr import CodedConcept

    code = codes.get(label)
    if code is not None:
        return CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)
    return CodedConcept(value=str(class_id), scheme_designator=SCHEME, meaning=label[:64])


def _planar_group(
    image: Dataset,
    frame_index: int,
    det: dict[str, Any],
    algorithm: Any,
    name: str,
    codes: Mapping[str, ClassCode],
) -> Any:
    """TID 1410 for one 2D box ``det`` (``class_id``, ``label``, ``score``, ``box``) on frame
    ``frame_index`` (0-based) of ``image``."""
    from highdicom.sr import (
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
        finding_type=_finding_type(int(det["class_id"]), str(det["label"]), codes),
        algorithm_id=algorithm,
        measurements=[_score(float(det["score"]), algorithm)],
    )


def _report(
    evidence: list[Dataset],
    groups: list[Any],
    model_name: str,
    model_sha256: str,
    description: str,
    private: bool,
    *,
    kind: str,
) -> Dataset:
    """The Comprehensive 3D SR around the measurement ``groups`` (at least one); ``private``: a class
    without a standard code was named in the private scheme, which is then declared. Its series is the
    study's series of ``kind`` documents by this model (:func:`.dicomdoc.document_series_uid`), so a
    viewer shows one SR series per study and model, not one series per SR."""
    from highdicom import ContributingEquipment
    from highdicom.sr import (
        Comprehensive3DSR,
        DeviceObserverIdentifyingAttributes,
        MeasurementReport,
        ObservationContext,
        ObserverContext,
    )
    from pydicom.sr.codedict import codes

    device = device_identity()
    observer = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=device.uid, name=device.name, manufacturer_name=MANUFACTURER, model_name=model_name[:64]
        ),
    )
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=codes.SCT.ImagingProcedure,  # SNOMED CT 363679005, a standard code
        imaging_measurements=groups,
    )
    equipment = ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=model_name[:64],
        software_versions=[f"retinaedge {__version__}", model_sha256[:64]],
        device_serial_number=device.serial,
        station_name=device.name[:16],
        contribution_description=f"detections by the model {model_name}"[:64],
    )
    sr = Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=document_series_uid(kind, str(evidence[0].StudyInstanceUID), model_sha256),
        series_number=9001 if kind == "sr" else 9005,  # SCs 9002, GSPSs 9003, KOSs 9004
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=description[:64],
        contributing_equipment=[equipment],
    )
    sr.ManufacturerModelName = model_name[:64]
    sr.SoftwareVersions = f"retinaedge {__version__}"
    sr.DeviceSerialNumber = device.serial
    if private:  # the private scheme of classes without a standard code, declared (PS3.3 C.12.1.1.5)
        scheme = Dataset()
        scheme.CodingSchemeDesignator = SCHEME
        scheme.CodingSchemeName = "retinaedge model classes"
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
