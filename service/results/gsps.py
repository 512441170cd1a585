"""The findings of one instance as a Grayscale Softcopy Presentation State (PS3.3 A.33.1; highdicom).

:func:`instance_gsps` is the builder of the result document ``gsps`` (:mod:`.documents`): the source
image as the site reads it, with the model's findings drawn over it, for any viewer that applies a
presentation state to the image it references (the image itself is not copied: a GSPS holds no pixels).

What it holds (:func:`build_gsps`):

- **Presentation State Relationship** (C.11.11): the Referenced Series Sequence to the source image.
- **Graphic Layer** (C.10.7): one layer, ``FINDINGS``; **Graphic Annotation** (C.10.5): per frame with
  findings one item referencing the image, and for a multi-frame image that frame (Referenced Frame
  Number n for the findings of frame n, 1-based); in it per finding a Graphic Object, the box as a
  closed POLYLINE of 5 points (first = last) in PIXEL units, where (0, 0) is the top-left corner of the
  top-left pixel and (Columns, Rows) the bottom-right corner of the bottom-right one (C.10.5.1.2: the
  result's box edges as they are), and a Text Object "<class> <score>" anchored at the box's top-left
  corner; box and text share a Graphic Group (C.10.8) so a viewer moves them together.
- **Displayed Area** (C.10.4): the whole image, scaled to fit, at the pixels' aspect ratio.
- **Modality LUT** (C.11.1): the image's own rescale (Rescale Slope/Intercept/Type, or the shared
  Pixel Value Transformation of a multi-frame image), when it has one.
- **Softcopy VOI LUT** (C.11.8): the image's own Window Center/Width (with its explanation and VOI LUT
  Function; of a multi-frame image the Frame VOI LUT of each frame, grouped by window), when the kept
  header has one; none otherwise (a viewer then shows the full range).
- **Softcopy Presentation LUT** (C.11.6): the image's Presentation LUT Shape when it states one, else
  INVERSE for MONOCHROME1 and IDENTITY otherwise, so the grey scale has the image's polarity.
- **General Equipment** and the series of :mod:`.dicomdoc` (Modality PR, one series per study and model);
  Presentation Creation Date/Time (C.11.10: a presentation state's content date and time).

Only *findings* are drawn (:func:`.selection.findings_by_frame`); an instance without any has no GSPS
(:class:`.views.NothingToReport`).
"""

from __future__ import annotations

from collections.abc import Iterator
from fractions import Fraction
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from retinaedge.service.results.dicomdoc import document_series_uid, equipment, with_type2
from retinaedge.service.results.evidence import header_from_json
from retinaedge.service.results.selection import findings_by_frame
from retinaedge.service.results.views import InstanceView, NothingToReport, Unavailable

KIND = "gsps"
SERIES_NUMBER = 9003  # the SRs are 9001, the SCs 9002
LAYER = "FINDINGS"


def instance_gsps(view: InstanceView) -> Dataset:
    """The document ``gsps``: the findings of a done instance over its image; :class:`Unavailable`
    when no header was kept, :class:`NothingToReport` when it has no findings."""
    if not view.header_json:
        raise Unavailable("no source header was kept for this instance")
    found = findings_by_frame(view.result)
    if not found:
        raise NothingToReport("this instance has no findings: there is nothing to present")
    header = header_from_json(view.header_json, view.identity)
    return build_gsps(header, found, view.model_name, view.model_sha256)


def build_gsps(
    image: Dataset, found: dict[int, list[dict[str, Any]]], model_name: str, model_sha256: str
) -> Dataset:
    """The GSPS (module docstring) of ``image`` (the source's header: no pixel data needed) showing
    ``found``: frame index (0-based) -> its findings (``label``, ``score``, ``box`` [x1, y1, x2, y2] in
    pixels). Raises :class:`Unavailable` for an image a grayscale presentation state cannot show."""
    from highdicom.pr import (
        AnnotationUnitsValues,
        GraphicAnnotation,
        GraphicGroup,
        GraphicLayer,
        GraphicObject,
        GraphicTypeValues,
        GrayscaleSoftcopyPresentationState,
        TextObject,
    )

    if int(image.get("SamplesPerPixel", 1) or 1) != 1:
        # Not a failure: a destination taking gsps skips colour images (counted), never dead-letters them.
        raise NothingToReport("a colour image has no grayscale softcopy presentation state")
    image = with_type2(image)
    multiframe = int(image.get("NumberOfFrames", 1) or 1) > 1
    rows, columns = float(image.Rows), float(image.Columns)
    layer = GraphicLayer(LAYER, order=1, description=f"findings of {model_name}"[:64])
    groups: list[Any] = []
    annotations = []
    for index, detections in found.items():
        graphics, texts = [], []
        for det in detections:
            group = GraphicGroup(len(groups) + 1, f"finding {len(groups) + 1}")
            groups.append(group)
            x1, y1, x2, y2 = (float(v) for v in det["box"])
            x1, x2 = (min(max(v, 0.0), columns) for v in (x1, x2))  # float noise at the edges only
            y1, y2 = (min(max(v, 0.0), rows) for v in (y1, y2))
            box = np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2], [x1, y1]], dtype=np.float64)
            graphics.append(
                GraphicObject(
                    GraphicTypeValues.POLYLINE, box, AnnotationUnitsValues.PIXEL, graphic_group=group
                )
            )
            texts.append(
                TextObject(
                    f"{det['label']} {float(det['score']):.2f}"[:1024],
                    AnnotationUnitsValues.PIXEL,
                    anchor_point=(x1, y1),
                    anchor_point_visible=False,
                    graphic_group=group,
                )
            )
        annotations.append(
            GraphicAnnotation(
                [image],
                layer,
                referenced_frame_number=index + 1 if multiframe else None,
                graphic_objects=graphics,
                text_objects=texts,
            )
        )
    study = str(image.StudyInstanceUID)
    eq = equipment(model_name, model_sha256)
    gsps = GrayscaleSoftcopyPresentationState(
        referenced_images=[image],
        series_instance_uid=document_series_uid(KIND, study, model_sha256),
        series_number=SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=max(1, int(image.get("InstanceNumber", 1) or 1)),
        manufacturer=str(eq["Manufacturer"]),
        manufacturer_model_name=str(eq["ManufacturerModelName"]),
        software_versions=eq["SoftwareVersions"],  # type: ignore[arg-type]  # LO, multi-valued
        device_serial_number=str(eq["DeviceSerialNumber"]),
        content_label=LAYER,
        content_description=f"{model_name} findings"[:64],
        graphic_annotations=annotations,
        graphic_layers=[layer],
        graphic_groups=groups,
        modality_lut_transformation=_modality_lut(image),
        voi_lut_transformations=_voi_luts(image),
        presentation_lut_transformation=_presentation_lut(image),
        series_description=f"retinaedge findings ({model_name})"[:64],
    )
    _body_part(gsps, image)
    _aspect_ratio(gsps, image)
    return gsps


def _shared(image: Dataset, sequence: str) -> Dataset | None:
    """The first item of ``sequence`` in the Shared Functional Groups of a multi-frame image, if any."""
    shared = image.get("SharedFunctionalGroupsSequence")
    if not shared or sequence not in shared[0] or not shared[0][sequence].value:
        return None
    item: Dataset = shared[0][sequence].value[0]
    return item


def _per_frame(image: Dataset, sequence: str) -> Iterator[tuple[int, Dataset | None]]:
    """(frame number, the first item of ``sequence`` of that frame, else of the shared groups)."""
    shared = _shared(image, sequence)
    frames = image.get("PerFrameFunctionalGroupsSequence") or []
    for number in range(1, int(image.get("NumberOfFrames", 1) or 1) + 1):
        item = frames[number - 1] if number <= len(frames) else None
        if item is not None and sequence in item and item[sequence].value:
            yield number, item[sequence].value[0]
        else:
            yield number, shared


def _modality_lut(image: Dataset) -> Any:
    """The image's rescale as a Modality LUT Transformation, or None when it has none. Of a
    multi-frame image every frame must have the same (a presentation state has one for the image)."""
    from highdicom import ModalityLUTTransformation

    if "PerFrameFunctionalGroupsSequence" in image or "SharedFunctionalGroupsSequence" in image:
        found = {
            (str(s.RescaleSlope), str(s.RescaleIntercept), str(s.get("RescaleType", "US") or "US"))
            for _, s in _per_frame(image, "PixelValueTransformationSequence")
            if s is not None and "RescaleSlope" in s and "RescaleIntercept" in s
        }
        if len(found) > 1:
            raise Unavailable(
                "the image's frames have different rescales; one presentation state cannot show them"
            )
        if not found:
            return None
        slope, intercept, kind = found.pop()
    elif "RescaleSlope" in image and "RescaleIntercept" in image:
        slope, intercept = str(image.RescaleSlope), str(image.RescaleIntercept)
        kind = str(image.get("RescaleType") or ("HU" if image.get("Modality") == "CT" else "US"))
    else:
        return None
    return ModalityLUTTransformation(
        rescale_intercept=float(intercept), rescale_slope=float(slope), rescale_type=kind
    )


def _as_tuple(value: Any) -> tuple[Any, ...]:
    """A DICOM value as a tuple of its values (one value, or each of a multi-valued one)."""
    from pydicom.multival import MultiValue

    return tuple(value) if isinstance(value, MultiValue | list | tuple) else (value,)


def _window(source: Dataset | None) -> tuple[Any, ...] | None:
    """(centers, widths, explanations or None, VOI LUT Function or None) of a dataset with a complete,
    valid window (as many centers as widths, each width at least 1: PS3.3 C.11.2.1.2), else None."""
    if source is None or source.get("WindowCenter") in (None, "") or source.get("WindowWidth") in (None, ""):
        return None
    centers = tuple(float(v) for v in _as_tuple(source.WindowCenter))
    widths = tuple(float(v) for v in _as_tuple(source.WindowWidth))
    if len(centers) != len(widths) or any(w < 1 for w in widths):
        return None
    explanation = None
    if source.get("WindowCenterWidthExplanation") not in (None, ""):
        explanation = tuple(str(v) for v in _as_tuple(source.WindowCenterWidthExplanation))
        if len(explanation) != len(centers):
            explanation = None
    function = str(source.get("VOILUTFunction") or "") or None
    return centers, widths, explanation, function


def _voi_luts(image: Dataset) -> list[Any] | None:
    """The image's own window(s) as Softcopy VOI LUT items, or None when the kept header has none."""
    from highdicom import ReferencedImageSequence
    from highdicom.pr import SoftcopyVOILUTTransformation

    if "PerFrameFunctionalGroupsSequence" in image or "SharedFunctionalGroupsSequence" in image:
        by_window: dict[tuple[Any, ...], list[int]] = {}
        for number, item in _per_frame(image, "FrameVOILUTSequence"):
            window = _window(item)
            if window is not None:
                by_window.setdefault(window, []).append(number)
        frames = int(image.get("NumberOfFrames", 1) or 1)
    else:
        window = _window(image)
        by_window = {window: [1]} if window is not None else {}
        frames = 1
    out = []
    for (centers, widths, explanation, function), numbers in by_window.items():
        refs = None
        if len(by_window) > 1 or len(numbers) < frames:
            refs = ReferencedImageSequence(referenced_images=[image], referenced_frame_number=numbers)
        out.append(
            SoftcopyVOILUTTransformation(
                window_center=list(centers) if len(centers) > 1 else centers[0],
                window_width=list(widths) if len(widths) > 1 else widths[0],
                window_explanation=(list(explanation) if len(explanation) > 1 else explanation[0])
                if explanation
                else None,
                voi_lut_function=function,
                referenced_images=refs,
            )
        )
    return out or None


def _presentation_lut(image: Dataset) -> Any:
    """The Presentation LUT Shape that keeps the image's polarity (module docstring)."""
    from highdicom import PresentationLUTTransformation
    from highdicom.enum import PresentationLUTShapeValues

    shape = str(image.get("PresentationLUTShape") or "")
    if shape not in ("IDENTITY", "INVERSE"):
        shape = "INVERSE" if image.get("PhotometricInterpretation") == "MONOCHROME1" else "IDENTITY"
    return PresentationLUTTransformation(presentation_lut_shape=PresentationLUTShapeValues(shape))


def _body_part(gsps: Dataset, image: Dataset) -> None:
    """Body Part Examined and Laterality of the General Series (PS3.3 C.7.3.1) from the image's:
    Laterality where the image states it (or its Image Laterality is R or L); absent for a stated body
    part without one (taken as unpaired), empty (unknown) when the image says neither."""
    if image.get("BodyPartExamined"):
        gsps.BodyPartExamined = image.BodyPartExamined
    laterality = image.get("Laterality") or image.get("ImageLaterality")
    if laterality in ("R", "L"):
        gsps.Laterality = laterality
    elif not image.get("BodyPartExamined"):
        gsps.Laterality = ""


def _aspect_ratio(gsps: Dataset, image: Dataset) -> None:
    """Presentation Pixel Aspect Ratio (C.10.4) from the image's pixel spacing (row \\ column), as the
    smallest integers; highdicom writes 1 \\ 1."""
    spacing = image.get("PixelSpacing")
    if spacing is None:
        measures = _shared(image, "PixelMeasuresSequence")
        spacing = measures.get("PixelSpacing") if measures is not None else None
    if spacing is None or len(spacing) != 2 or float(spacing[1]) <= 0 or float(spacing[0]) <= 0:
        return
    ratio = Fraction(float(spacing[0]) / float(spacing[1])).limit_denominator(100)
    if ratio != 1:
        gsps.DisplayedAreaSelectionSequence[0].PresentationPixelAspectRatio = [
            ratio.numerator,
            ratio.denominator,
        ]
