"""A frame with its findings burned in as a DICOM Secondary Capture Image (PS3.3 A.8.1), for PACS and
viewers that show images only.

:func:`build_sc` makes one single-frame SC Image (SOP class 1.2.840.10008.5.1.4.1.1.7, highdicom's
``SCImage``) of one frame of a source instance: the frame as the model saw it (windowed by the model's
preprocessing, at the frame's own size) with the findings' boxes and labels (class, score) and the notice
:data:`NOTICE` burned in (:func:`retinaedge.runtime.overlay.burn_in`), as 8-bit RGB: the boxes are coloured
by class; a grey source stays grey (R = G = B) everywhere else.

What it says about itself:

- General Image (C.7.6.1): Image Type ``DERIVED\\SECONDARY\\OTHER``; Burned In Annotation ``YES``;
  Derivation Description and Image Comments both start with :data:`NOTICE`; Source Image Sequence
  (0008,2112) names the source's SOP class and instance, with Referenced Frame Number when the source is
  multi-frame, Spatial Locations Preserved ``YES`` (the frame's own pixel grid) and the purpose (DCM
  121322, "Source image for image processing operation"); Lossy Image Compression ``01`` when the
  source's transfer syntax is lossy; Instance Number the source's for a single-frame source, the frame
  number for a multi-frame one.
- General Series (C.7.3.1): its own series, Modality ``OT``, Series Number :data:`SERIES_NUMBER`: one per
  study and model, like every document's (:func:`.dicomdoc.document_series_uid`), so every SC of a
  study's findings lands in one series, described as not for diagnosis; Body Part Examined and
  Laterality the source's (Laterality is Type 2C: absent when the source names its body part without
  one, taken as unpaired; empty when it says neither, unknown).
- Common Instance Reference (C.12.2): the source's series and instance (Referenced Series Sequence).
- SC Equipment (C.8.6.1): Conversion Type ``WSD`` (made by a workstation); General Equipment
  (C.7.5.1) as every document's (:func:`.dicomdoc.equipment`: the appliance, the model's name and hash).
- Patient, General Study: copied from the kept header (:mod:`.evidence`: the evidence and the patient
  identity), so that a PACS files the SC with its images; Patient Orientation (C.7.6.1.1.1) from the
  source's Image Orientation (Patient), empty when it has none.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from retinaedge.service.results.dicomdoc import TYPE2, document_series_uid, equipment

KIND = "sc"
#: Burned into every capture and written in its Derivation Description and Image Comments.
NOTICE = "NOT FOR PRIMARY DIAGNOSIS"
SC_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
SERIES_NUMBER = 9002  # the SRs are 9001
#: Lossy transfer syntaxes and the Lossy Image Compression Method (0028,2114) each means.
_LOSSY = {
    "1.2.840.10008.1.2.4.50": "ISO_10918_1",
    "1.2.840.10008.1.2.4.51": "ISO_10918_1",
    "1.2.840.10008.1.2.4.81": "ISO_14495_1",
    "1.2.840.10008.1.2.4.91": "ISO_15444_1",
    "1.2.840.10008.1.2.4.203": "ISO_15444_15",
}


def patient_orientation(header: Dataset, frame_index: int) -> list[str]:
    """Patient Orientation (0020,0020) of frame ``frame_index``: the direction of the rows and of the
    columns as letters (L/R, P/A, H/F, the main one first; PS3.3 C.7.6.1.1.1) from Image Orientation
    (Patient) (top level, or the frame's or shared Plane Orientation Sequence); [] when there is none."""
    iop = header.get("ImageOrientationPatient")
    for groups, index in (
        ("PerFrameFunctionalGroupsSequence", frame_index),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        if iop is not None:
            break
        seq = header.get(groups)
        if seq is not None and len(seq) > index and seq[index].get("PlaneOrientationSequence"):
            iop = seq[index].PlaneOrientationSequence[0].get("ImageOrientationPatient")
    try:
        values = [float(v) for v in iop] if iop is not None else []
    except (TypeError, ValueError):
        return []
    if len(values) != 6:
        return []
    return [_direction(values[:3]), _direction(values[3:])]


def _direction(vector: Sequence[float]) -> str:
    """A direction in LPS (mm) -> its letters, the largest component first, components under 1 % left out."""
    letters = (("L", "R"), ("P", "A"), ("H", "F"))
    order = sorted(range(3), key=lambda i: -abs(vector[i]))
    return "".join(letters[i][0 if vector[i] > 0 else 1] for i in order if abs(vector[i]) >= 0.01)


def _laterality(header: Dataset) -> str | None:
    """Laterality (0020,0060; Type 2C, C.7.3.1) for the SC's series: the source's, or its Image Laterality
    when that is R or L; None (absent) when the source names its body part without a laterality (an
    unpaired part); empty (unknown) when it says neither."""
    for keyword in ("Laterality", "ImageLaterality"):
        value = str(header.get(keyword, "") or "").strip()
        if value in ("R", "L"):
            return value
    return None if str(header.get("BodyPartExamined", "") or "").strip() else ""


def _pixel_spacing(header: Dataset) -> tuple[float, float] | None:
    """The source's Pixel Spacing (row, column; mm): top level or in the shared Pixel Measures."""
    spacing = header.get("PixelSpacing")
    shared = header.get("SharedFunctionalGroupsSequence")
    if spacing is None and shared and shared[0].get("PixelMeasuresSequence"):
        spacing = shared[0].PixelMeasuresSequence[0].get("PixelSpacing")
    try:
        row, column = (float(v) for v in spacing) if spacing is not None else (0.0, 0.0)
    except (TypeError, ValueError):
        return None
    return (row, column) if row > 0 and column > 0 else None


def build_sc(
    header: Dataset,
    frame_index: int,
    rgb: np.ndarray,
    findings: Sequence[dict[str, Any]],
    model_name: str,
    model_sha256: str,
) -> Dataset:
    """The SC of frame ``frame_index`` (0-based) of the instance whose kept header is ``header`` (the
    evidence with the patient identity, :func:`.evidence.header_from_json`): ``rgb`` (rows, columns, 3)
    uint8 is the frame with ``findings`` (stored detections) burned in. See the module docstring."""
    from highdicom.sc import SCImage
    from pydicom.sr.codedict import codes

    multiframe = int(header.get("NumberOfFrames", 1) or 1) > 1
    frame_number = frame_index + 1
    source_number = header.get("InstanceNumber")
    spacing = _pixel_spacing(header)
    eq = equipment(model_name, model_sha256)
    sc = SCImage(
        pixel_array=np.ascontiguousarray(rgb, dtype=np.uint8),
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        study_instance_uid=str(header.StudyInstanceUID),
        series_instance_uid=document_series_uid(KIND, str(header.StudyInstanceUID), model_sha256),
        series_number=SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=frame_number if multiframe or source_number in (None, "") else int(source_number),
        manufacturer=str(eq["Manufacturer"]),
        patient_orientation=("L", "P"),  # replaced below: highdicom takes single letters only
        pixel_spacing=spacing,
        series_description=f"retinaedge findings, {NOTICE.lower()}"[:64],
        manufacturer_model_name=str(eq["ManufacturerModelName"]),
        software_versions=eq["SoftwareVersions"],  # LO, multi-valued
        device_serial_number=str(eq["DeviceSerialNumber"]),
    )
    sc.PatientOrientation = patient_orientation(header, frame_index)
    if "SpecificCharacterSet" in header:
        sc.SpecificCharacterSet = header.SpecificCharacterSet
    for keyword in TYPE2:
        setattr(sc, keyword, header.get(keyword, ""))
    if header.get("BodyPartExamined"):
        sc.BodyPartExamined = header.BodyPartExamined
    laterality = _laterality(header)
    if laterality is not None:
        sc.Laterality = laterality
    if "IssuerOfPatientID" in header:
        sc.IssuerOfPatientID = header.IssuerOfPatientID
    sc.ConversionType = "WSD"
    sc.BurnedInAnnotation = "YES"
    labels = ", ".join(f"{d['label']} {float(d['score']):.2f}" for d in findings)
    sc.DerivationDescription = (
        f"{NOTICE}. Frame {frame_number} of the source instance, windowed as the model {model_name} "
        f"({model_sha256[:16]}) saw it, with its findings burned in as boxes labelled with class and score."
    )[:1024]
    sc.ImageComments = (f"{NOTICE}. retinaedge findings burned in ({len(findings)}): {labels}")[:10240]
    source = Dataset()
    source.ReferencedSOPClassUID = header.SOPClassUID
    source.ReferencedSOPInstanceUID = header.SOPInstanceUID
    if multiframe:
        source.ReferencedFrameNumber = frame_number
    source.SpatialLocationsPreserved = "YES"  # the frame's own pixel grid (C.7.6.1.1.3)
    purpose = codes.DCM.SourceImageForImageProcessingOperation
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = purpose.value, "DCM", purpose.meaning
    source.PurposeOfReferenceCodeSequence = [code]
    sc.SourceImageSequence = [source]
    # Common Instance Reference (C.12.2): the source's series, so that readers find the source's place.
    instance = Dataset()
    instance.ReferencedSOPClassUID = header.SOPClassUID
    instance.ReferencedSOPInstanceUID = header.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = header.SeriesInstanceUID
    series.ReferencedInstanceSequence = [instance]
    sc.ReferencedSeriesSequence = [series]
    method = _LOSSY.get(str(getattr(getattr(header, "file_meta", None), "TransferSyntaxUID", "")))
    if method is not None:
        sc.LossyImageCompression = "01"
        sc.LossyImageCompressionMethod = method
    return sc
