"""A study's images with findings as a Key Object Selection Document (PS3.3 A.35.4, TID 2010; highdicom).

:func:`study_kos` is the builder of the result document ``kos`` (:mod:`.documents`): a list of the
study's images that have findings, so that a viewer can jump to them. It is made of a study *so far*
(:mod:`.studies`): every done instance of the study with findings kept when it is built.

What it holds (:func:`build_kos`):

- **Key Object Document** (C.17.6.2) and **SR Document Content** (C.17.3): the root container of TID
  2010 titled (113000, DCM, "Of Interest") (CID 7010); a device observer (TID 1002/1004: this
  appliance, the model's name as its model); a Key Object Description (113012, DCM) naming the model;
  then one IMAGE content item per key image, (260753009, SCT, "Source"), and for a multi-frame image
  the frames with findings (Referenced Frame Number, 1-based; C.18.3.1).
- **Current Requested Procedure Evidence Sequence** (C.17.6.2.1): every referenced image by study,
  series and SOP instance.
- **Key Object Document Series** (C.17.6.1, Modality KO, one series per study and model), **General
  Equipment** (:mod:`.dicomdoc`), Content Date/Time (when it is built), and the patient and study
  attributes copied from the first key image's kept header.

A study without any finding has no KOS (:class:`.views.NothingToReport`): TID 2010 lists at least one
object, and there is nothing to point a reader to.
"""

from __future__ import annotations

from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from retinaedge.service.results.appliance import MANUFACTURER, device_identity
from retinaedge.service.results.dicomdoc import document_series_uid, equipment, with_type2
from retinaedge.service.results.key_images import KeyImage
from retinaedge.service.results.views import NothingToReport, StudyView

KIND = "kos"
SERIES_NUMBER = 9004  # the SRs are 9001 (series SRs 9005), the SCs 9002, the GSPSs 9003
#: The Document Title (CID 7010 Key Object Selection Document Title).
TITLE = ("113000", "DCM", "Of Interest")


def study_kos(view: StudyView) -> Dataset:
    """The document ``kos``: the study's key images so far; :class:`NothingToReport` when none of its
    images has findings."""
    if not view.images.images:
        raise NothingToReport("no image of this study has findings (so far)")
    return build_kos(view.images.images, view.model_name, view.model_sha256)


def _ordered(images: tuple[KeyImage, ...]) -> list[KeyImage]:
    """Series in order of arrival, and in each its images by Instance Number (then arrival)."""
    series_rank: dict[str, int] = {}
    for image in images:
        series_rank.setdefault(image.series_instance_uid, len(series_rank))

    def key(item: tuple[int, KeyImage]) -> tuple[int, int, int]:
        arrival, image = item
        number = image.header.get("InstanceNumber")
        return series_rank[image.series_instance_uid], int(number) if number not in (None, "") else 0, arrival

    return [image for _, image in sorted(enumerate(images), key=key)]


def build_kos(images: tuple[KeyImage, ...], model_name: str, model_sha256: str) -> Dataset:
    """The KOS (module docstring) listing ``images`` (at least one, all of one study)."""
    from highdicom.ko import KeyObjectSelection, KeyObjectSelectionDocument
    from highdicom.sr import CodedConcept, DeviceObserverIdentifyingAttributes, ObserverContext
    from pydicom.sr.codedict import codes

    ordered = _ordered(images)
    evidence = [with_type2(image.header) for image in ordered]
    device = device_identity()
    observer = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=device.uid,
            name=device.name,
            manufacturer_name=MANUFACTURER,
            model_name=model_name[:64],
            serial_number=device.serial,
        ),
    )
    findings = sum(image.findings for image in ordered)
    content = KeyObjectSelection(
        document_title=CodedConcept(*TITLE),
        referenced_objects=evidence,
        observer_device_context=observer,
        description=(
            f"{len(ordered)} image(s) with {findings} finding(s) of the model {model_name} "
            f"(sha256 {model_sha256[:16]}), made by retinaedge"
        ),
    )
    _reference_frames(content[0], ordered)
    study = str(evidence[0].StudyInstanceUID)
    eq = equipment(model_name, model_sha256)
    return KeyObjectSelectionDocument(
        evidence=evidence,
        content=content,
        series_instance_uid=document_series_uid(KIND, study, model_sha256),
        series_number=SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=str(eq["ManufacturerModelName"]),
        software_versions=eq["SoftwareVersions"],
        device_serial_number=str(eq["DeviceSerialNumber"]),
        series_description=f"retinaedge key images ({model_name})"[:64],
    )


def _reference_frames(root: Any, images: list[KeyImage]) -> None:
    """Add the frames with findings to the IMAGE items of multi-frame images (highdicom references the
    whole instance)."""
    frames = {
        image.sop_instance_uid: [index + 1 for index in image.frames]
        for image in images
        if int(image.header.get("NumberOfFrames", 1) or 1) > 1
    }
    for item in root.ContentSequence:
        if item.ValueType != "IMAGE":
            continue
        reference = item.ReferencedSOPSequence[0]
        numbers = frames.get(str(reference.ReferencedSOPInstanceUID))
        if numbers:
            reference.ReferencedFrameNumber = numbers if len(numbers) > 1 else numbers[0]
