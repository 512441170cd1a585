"""Write :class:`~study.SyntheticSeries` as DICOM the way a scanner and a PACS would, plus their ground truth.

- :func:`write_single_frame_series`: one MR Image Storage instance per slice (Explicit VR Little Endian).
- :func:`write_multiframe`: the same slices as one Legacy Converted Enhanced MR Image (highdicom), with
  per-frame functional groups (plane position, orientation, pixel measures).
- :func:`compress_instance`: one single-frame instance re-encoded losslessly (JPEG 2000 by default) as a
  new instance of its own series.
- :func:`ground_truth`: the boxes of every written frame in the format ``retinaedge eval`` reads;
  :func:`lesion_truth`: the tumours of every written series and where they appear.

Everything is deterministic in the series' seed: UIDs come from :func:`pydicom.uid.generate_uid` with
fixed entropy sources, dates and times from the seed. File names come from indices, never from tag
values. Every instance says it is synthetic (Image Comments, Series/Study Description, the patient).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEG2000Lossless, MRImageStorage, generate_uid
from pydicom.valuerep import format_number_as_ds

from .lesions import KINDS
from .study import SyntheticSeries

log = logging.getLogger(__name__)

NOTICE_FILE = Path(__file__).with_name("NOTICE-MNI-ICBM152.txt")
CLASSES: tuple[str, ...] = KINDS
SYNTHETIC_COMMENT = (
    "Synthetic phantom derived from the MNI ICBM152 2009a template; not a patient; not for clinical use"
)
NOTICE_LINE = (
    "Synthetic images derived from the MNI ICBM152 2009a T1 template (Copyright (C) 1993-2009 Louis "
    "Collins, McConnell Brain Imaging Centre, MNI, McGill University); see NOTICE-MNI-ICBM152.txt"
)
STUDY_DESCRIPTION = "MR BRAIN W CONTRAST (SYNTHETIC)"
SERIES_DESCRIPTION = "AX T1 POST GD (SYNTHETIC)"
MANUFACTURER = "retinaedge synthetic phantom"
UID_NAMESPACE = "retinaedge-phantom"
GYROMAGNETIC_MHZ_PER_T = 42.577478  # 1H
NATO = (
    "ALPHA BRAVO CHARLIE DELTA ECHO FOXTROT GOLF HOTEL INDIA JULIETT KILO LIMA MIKE NOVEMBER OSCAR PAPA "
    "QUEBEC ROMEO SIERRA TANGO UNIFORM VICTOR WHISKEY XRAY YANKEE ZULU"
).split()


def phantom_uid(*parts: object) -> UID:
    """A UID that depends only on ``parts`` (same parts, same UID; under pydicom's UID root)."""
    return generate_uid(entropy_srcs=[UID_NAMESPACE, *(str(p) for p in parts)])


def _ds(value: float) -> str:
    """A float as a Decimal String of at most 16 characters (as precise as that allows)."""
    return format_number_as_ds(float(value))


@dataclass(frozen=True)
class SyntheticPatient:
    """Obviously synthetic demographics. ``birth_date`` is ``YYYYMMDD``; ``sex`` ``"F"`` or ``"M"``."""

    name: str
    patient_id: str
    birth_date: str
    sex: str


def synthetic_patient(seed: int) -> SyntheticPatient:
    """``PHANTOM^<NATO word>``, id ``SYN-<seed, 6 digits>``, a birth date 1940-1999 and a sex, from ``seed``."""
    rng = np.random.default_rng([seed, 0x5A7])
    birth = dt.date(1940, 1, 1) + dt.timedelta(days=int(rng.integers(0, 60 * 365)))
    return SyntheticPatient(
        name=f"PHANTOM^{NATO[seed % len(NATO)]}",
        patient_id=f"SYN-{seed % 1_000_000:06d}",
        birth_date=birth.strftime("%Y%m%d"),
        sex="F" if rng.random() < 0.5 else "M",
    )


@dataclass(frozen=True)
class StudyContext:
    """What every series of one synthetic study shares (all derived from the seed by :func:`study_context`)."""

    seed: int
    patient: SyntheticPatient
    study_uid: str
    frame_of_reference_uid: str
    start: dt.datetime
    accession_number: str
    study_id: str
    field_strength_t: float


def study_context(
    seed: int, patient: SyntheticPatient | None = None, study_uid: str | None = None
) -> StudyContext:
    """The study of ``seed``: a fixed date in 2024-2025 during working hours, UIDs, accession, field strength."""
    rng = np.random.default_rng([seed, 0x57D])
    day = dt.date(2024, 1, 2) + dt.timedelta(days=int(rng.integers(0, 700)))
    start = dt.datetime.combine(day, dt.time(8, 0)) + dt.timedelta(seconds=int(rng.integers(0, 9 * 3600)))
    return StudyContext(
        seed=seed,
        patient=patient if patient is not None else synthetic_patient(seed),
        study_uid=study_uid or phantom_uid(seed, "study"),
        frame_of_reference_uid=phantom_uid(seed, "frame-of-reference"),
        start=start,
        accession_number=f"SYNACC{seed % 10**8:08d}",
        study_id=f"{seed % 10**6:06d}",
        field_strength_t=1.5 if rng.random() < 0.5 else 3.0,
    )


def _age(birth_date: str, on: dt.date) -> str:
    born = dt.datetime.strptime(birth_date, "%Y%m%d").date()
    years = on.year - born.year - ((on.month, on.day) < (born.month, born.day))
    return f"{years:03d}Y"


def single_frame_datasets(
    series: SyntheticSeries,
    *,
    patient: SyntheticPatient | None = None,
    study_uid: str | None = None,
    series_number: int = 1,
    series_uid: str | None = None,
    context: StudyContext | None = None,
) -> list[Dataset]:
    """One MR Image Storage dataset (with file meta) per slice of ``series``, inferior to superior.

    ``context`` overrides ``patient``/``study_uid`` (it carries both); by default the study comes from
    ``series.seed``. ``series_uid`` defaults to one derived from the study UID and ``series_number``.
    """
    if context is None:
        context = study_context(series.seed, patient, study_uid)
    series_uid = series_uid or phantom_uid(context.study_uid, "series", series_number)
    normal = series.normal
    rows, cols = int(series.pixels.shape[1]), int(series.pixels.shape[2])
    series_start = context.start + dt.timedelta(minutes=12)
    tr_rng = np.random.default_rng([series.seed, 0x7E])
    repetition_time = float(np.round(tr_rng.uniform(500.0, 600.0)))
    echo_time = float(np.round(tr_rng.uniform(10.0, 15.0), 1))
    out: list[Dataset] = []
    for s in range(series.pixels.shape[0]):
        sop_uid = phantom_uid(series_uid, "instance", s)
        content = series_start + dt.timedelta(seconds=2 * s)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        # SOP Common
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
        ds.InstanceCreationDate = series_start.strftime("%Y%m%d")
        ds.InstanceCreationTime = series_start.strftime("%H%M%S")
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = sop_uid
        # General Study
        ds.StudyDate = context.start.strftime("%Y%m%d")
        ds.SeriesDate = series_start.strftime("%Y%m%d")
        ds.AcquisitionDate = series_start.strftime("%Y%m%d")
        ds.ContentDate = content.strftime("%Y%m%d")
        ds.StudyTime = context.start.strftime("%H%M%S")
        ds.SeriesTime = series_start.strftime("%H%M%S")
        ds.AcquisitionTime = series_start.strftime("%H%M%S")
        ds.ContentTime = content.strftime("%H%M%S")
        ds.AccessionNumber = context.accession_number
        ds.Modality = "MR"
        ds.Manufacturer = MANUFACTURER
        ds.InstitutionName = "Synthetic"
        ds.ReferringPhysicianName = ""
        ds.StationName = "PHANTOM"
        ds.StudyDescription = STUDY_DESCRIPTION
        ds.SeriesDescription = SERIES_DESCRIPTION
        ds.ManufacturerModelName = f"Phantom {context.field_strength_t:g}T"
        # Patient
        ds.PatientName = context.patient.name
        ds.PatientID = context.patient.patient_id
        ds.PatientBirthDate = context.patient.birth_date
        ds.PatientSex = context.patient.sex
        ds.PatientAge = _age(context.patient.birth_date, context.start.date())
        # MR acquisition
        ds.ContrastBolusAgent = "GADOLINIUM (SYNTHETIC)"
        ds.BodyPartExamined = "BRAIN"
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "SP"
        ds.ScanOptions = "FS"
        ds.MRAcquisitionType = "2D"
        ds.SequenceName = "se2d1"
        ds.SliceThickness = _ds(series.slice_thickness)
        ds.RepetitionTime = _ds(repetition_time)
        ds.EchoTime = _ds(echo_time)
        ds.NumberOfAverages = "1"
        ds.ImagingFrequency = _ds(round(GYROMAGNETIC_MHZ_PER_T * context.field_strength_t, 6))
        ds.ImagedNucleus = "1H"
        ds.EchoNumbers = "1"
        ds.MagneticFieldStrength = _ds(context.field_strength_t)
        if np.isfinite(series.spacing_between_slices):
            ds.SpacingBetweenSlices = _ds(series.spacing_between_slices)
        ds.EchoTrainLength = "1"
        ds.PercentSampling = "100"
        ds.PercentPhaseFieldOfView = "100"
        ds.PixelBandwidth = "130"
        ds.DeviceSerialNumber = "SYN0001"
        ds.SoftwareVersions = "retinaedge tools/phantom"
        ds.ProtocolName = "AX T1 SE POST (SYNTHETIC)"
        ds.ReceiveCoilName = "HEAD"
        ds.TransmitCoilName = "BODY"
        ds.AcquisitionMatrix = [0, cols, rows, 0]
        ds.InPlanePhaseEncodingDirection = "COL"
        ds.FlipAngle = "90"
        ds.PatientPosition = "HFS"
        # Study/series/instance identification
        ds.StudyInstanceUID = context.study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = context.study_id
        ds.SeriesNumber = series_number
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = s + 1
        # Image plane
        ds.ImagePositionPatient = [_ds(v) for v in series.positions[s]]
        ds.ImageOrientationPatient = [_ds(v) for v in series.orientation]
        ds.FrameOfReferenceUID = context.frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = _ds(float(np.dot(series.positions[s], normal)))
        ds.ImageComments = SYNTHETIC_COMMENT
        # Image pixel
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = cols
        ds.PixelSpacing = [_ds(series.pixel_spacing[0]), _ds(series.pixel_spacing[1])]
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.BurnedInAnnotation = "NO"
        ds.WindowCenter = _ds(series.window[0])
        ds.WindowWidth = _ds(series.window[1])
        ds.LossyImageCompression = "00"
        ds.PixelData = np.ascontiguousarray(series.pixels[s], dtype="<u2").tobytes()
        out.append(ds)
    return out


def write_single_frame_series(
    series: SyntheticSeries,
    out_dir: Path,
    *,
    patient: SyntheticPatient | None = None,
    study_uid: str | None = None,
    series_number: int = 1,
    series_uid: str | None = None,
    context: StudyContext | None = None,
    check: bool = True,
) -> list[Path]:
    """Write ``series`` as ``out_dir/IM0001.dcm`` ... (one MR Image Storage instance per slice).

    See :func:`single_frame_datasets` for the arguments. With ``check``, every file is read back and its
    pixels compared with ``series.pixels`` (:class:`ValueError` if they differ).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    datasets = single_frame_datasets(
        series,
        patient=patient,
        study_uid=study_uid,
        series_number=series_number,
        series_uid=series_uid,
        context=context,
    )
    paths = []
    for s, ds in enumerate(datasets):
        path = out_dir / f"IM{s + 1:04d}.dcm"
        dcmwrite(path, ds, enforce_file_format=True)
        if check:
            back = dcmread(path)
            if not np.array_equal(back.pixel_array, series.pixels[s]):
                raise ValueError(f"{path.name}: pixels read back differ from the series")
        paths.append(path)
    log.debug("wrote %d instances of series %s to %s", len(paths), datasets[0].SeriesInstanceUID, out_dir)
    return paths


def write_multiframe(
    sources: Sequence[Dataset | Path | str],
    out_path: Path,
    *,
    series_instance_uid: str,
    series_number: int,
    sop_instance_uid: str,
    instance_number: int = 1,
    include_dimension_index: bool = True,
    check: bool = True,
) -> tuple[Path, list[int]]:
    """Convert single-frame MR instances (datasets or files) into one Legacy Converted Enhanced MR Image.

    Returns the path and, for each frame, the index in ``sources`` of the instance it came from.

    With ``include_dimension_index`` (highdicom's default) the frames are a 3-D volume indexed by Image
    Position (Patient), in highdicom's spatial order: for axial slices made by :func:`single_frame_datasets`
    (row direction +x, column direction +y) that is superior to inferior, the reverse of the sources.
    Without it, the frames keep the order of ``sources`` and the instance has no Dimension Index.

    highdicom stamps the instance creation and contribution date/time with ``now`` and makes a random
    Dimension Organization UID, and lists the referenced instances in set order: these are replaced by
    values derived from the sources (frame order for the references), so the output is deterministic. With ``check``, the file is read back and every frame's pixels and Plane Position
    compared with its source instance.
    """
    from highdicom.legacy import LegacyConvertedEnhancedMRImage

    legacy = [src if isinstance(src, Dataset) else dcmread(src) for src in sources]
    image = LegacyConvertedEnhancedMRImage(
        legacy_datasets=legacy,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        strict=True,
        include_dimension_index=include_dimension_index,
    )
    created_date = str(legacy[0].get("InstanceCreationDate", legacy[0].get("ContentDate", "")))
    created_time = str(legacy[0].get("InstanceCreationTime", legacy[0].get("ContentTime", "")))
    image.InstanceCreationDate = created_date
    image.InstanceCreationTime = created_time
    for item in image.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = created_date + created_time
    dim_uid = phantom_uid(sop_instance_uid, "dimension-organization")
    for item in image.get("DimensionOrganizationSequence", []):
        item.DimensionOrganizationUID = dim_uid
    for item in image.get("DimensionIndexSequence", []):
        if "DimensionOrganizationUID" in item:
            item.DimensionOrganizationUID = dim_uid
    # highdicom lists the referenced instances in set order (varies between runs): use the frame order.
    frame_uids = [
        str(item.ConversionSourceAttributesSequence[0].ReferencedSOPInstanceUID)
        for item in image.PerFrameFunctionalGroupsSequence
    ]
    rank = {uid: n for n, uid in enumerate(frame_uids)}
    for series_item in image.get("ReferencedSeriesSequence", []):
        refs = list(series_item.get("ReferencedInstanceSequence", []))
        refs.sort(
            key=lambda ref: (
                rank.get(str(ref.ReferencedSOPInstanceUID), len(rank)),
                str(ref.ReferencedSOPInstanceUID),
            )
        )
        series_item.ReferencedInstanceSequence = DicomSequence(refs)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    dcmwrite(out_path, image, enforce_file_format=True)
    order = _frame_sources(dcmread(out_path, stop_before_pixels=True), legacy)
    if check:
        _check_multiframe(out_path, legacy, order)
    return out_path, order


def _frame_sources(mf: Dataset, legacy: Sequence[Dataset]) -> list[int]:
    """For each frame of ``mf``, the index of the legacy instance at the same Image Position (Patient)."""
    source_pos = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in legacy])
    order = []
    for n, item in enumerate(mf.PerFrameFunctionalGroupsSequence):
        pos = np.array([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient])
        dist = np.linalg.norm(source_pos - pos, axis=1)
        if dist.min() > 1e-6 or np.count_nonzero(dist <= 1e-6) != 1:
            raise ValueError(f"frame {n} at {pos.tolist()} matches no single source instance")
        order.append(int(dist.argmin()))
    if sorted(order) != list(range(len(legacy))):
        raise ValueError("the frames do not hold each source instance once")
    return order


def _check_multiframe(path: Path, legacy: Sequence[Dataset], order: Sequence[int]) -> None:
    back = dcmread(path)
    frames = back.pixel_array
    if frames.ndim == 2:
        frames = frames[None]
    if frames.shape[0] != len(legacy):
        raise ValueError(f"{path.name}: {frames.shape[0]} frames, expected {len(legacy)}")
    for n, (frame, src) in enumerate(zip(frames, order, strict=True)):
        if not np.array_equal(frame, legacy[src].pixel_array):
            raise ValueError(f"{path.name}: frame {n} differs from its source instance {src}")


def compress_instance(
    path_in: Path,
    path_out: Path,
    syntax: str = JPEG2000Lossless,
    *,
    sop_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    series_number: int | None = None,
    instance_number: int = 1,
) -> Path:
    """Re-encode one single-frame instance losslessly (JPEG 2000 Lossless by default) as a new instance.

    The copy is a separate instance in a separate series (so no series holds the same slice twice):
    ``sop_instance_uid``/``series_instance_uid`` default to UIDs derived from the originals and the syntax,
    ``series_number`` to the original's plus 1000. The decoded pixels are checked to equal the original's.
    """
    syntax = UID(syntax)
    if not syntax.is_compressed:
        raise ValueError(f"{syntax} is not a compressed transfer syntax")
    ds = dcmread(path_in)
    original = ds.pixel_array.copy()
    old_sop, old_series = str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID)
    ds.compress(syntax, generate_instance_uid=False)
    new_sop = sop_instance_uid or phantom_uid(old_sop, "re-encoded", syntax)
    ds.SOPInstanceUID = new_sop
    ds.file_meta.MediaStorageSOPInstanceUID = new_sop
    ds.SeriesInstanceUID = series_instance_uid or phantom_uid(old_series, "re-encoded", syntax)
    ds.SeriesNumber = series_number if series_number is not None else int(ds.SeriesNumber) + 1000
    ds.InstanceNumber = instance_number
    ds.SeriesDescription = f"{SERIES_DESCRIPTION} {syntax.keyword or syntax}"
    ds.LossyImageCompression = "00"
    path_out = Path(path_out)
    path_out.parent.mkdir(parents=True, exist_ok=True)
    dcmwrite(path_out, ds, enforce_file_format=True)
    back = dcmread(path_out)
    if str(back.file_meta.TransferSyntaxUID) != syntax or not np.array_equal(back.pixel_array, original):
        raise ValueError(f"{path_out.name}: the re-encoded instance does not decode to the original pixels")
    return path_out


@dataclass(frozen=True)
class WrittenInstance:
    """One written file: its UIDs and, per frame, the index of the series slice it holds."""

    path: Path
    sop_instance_uid: str
    series_instance_uid: str
    slices: tuple[int, ...]


@dataclass
class WrittenSeries:
    """A written DICOM series of a :class:`SyntheticSeries` (all its instances, for the ground truth)."""

    series: SyntheticSeries
    series_instance_uid: str
    instances: list[WrittenInstance] = field(default_factory=list)


def record_files(
    series: SyntheticSeries, paths: Sequence[Path], slices: Sequence[Sequence[int]] | None = None
) -> WrittenSeries:
    """Read the UIDs back from written files of ``series``: ``slices[i]`` lists the slice of each frame of
    file ``i`` (default: file ``i`` holds slice ``i`` alone). All files must be one series."""
    instances = []
    for i, path in enumerate(paths):
        ds = dcmread(path, stop_before_pixels=True)
        frame_slices = tuple(slices[i]) if slices is not None else (i,)
        if int(ds.get("NumberOfFrames", 1) or 1) != len(frame_slices):
            raise ValueError(
                f"{Path(path).name}: {ds.get('NumberOfFrames', 1)} frames, {len(frame_slices)} slices given"
            )
        instances.append(
            WrittenInstance(Path(path), str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), frame_slices)
        )
    uids = {x.series_instance_uid for x in instances}
    if len(uids) != 1:
        raise ValueError(f"the files belong to {len(uids)} series, expected one")
    return WrittenSeries(series, uids.pop(), instances)


def ground_truth(written: Sequence[WrittenSeries]) -> dict[str, object]:
    """The ``retinaedge eval`` ground truth of every frame written: ``{"classes", "annotations"}``.

    Each box of slice ``s`` becomes one annotation on every (instance, frame) holding ``s``; frames
    without boxes are negatives and need no entry. ``retinaedge eval`` rejects any other top-level key,
    so the lesion details are in :func:`lesion_truth`.
    """
    annotations = []
    for ws in written:
        for inst in ws.instances:
            for frame, s in enumerate(inst.slices):
                for box in ws.series.boxes[s]:
                    item = box.to_json()
                    annotations.append(
                        {
                            "sop_instance_uid": inst.sop_instance_uid,
                            "frame": frame,
                            "label": item["label"],
                            "box": item["box"],
                            "difficult": item["difficult"],
                        }
                    )
    return {"classes": list(CLASSES), "annotations": annotations}


def lesion_truth(written: Sequence[WrittenSeries], root: Path | None = None) -> dict[str, object]:
    """Per written series: its seed, pose, files and lesions (``SyntheticSeries.lesion_truth()``), each with
    the (SOP Instance UID, frame) pairs it appears on; plus a one-line notice naming the template's licence.

    File names are relative to ``root`` (POSIX form) when given, else bare names."""
    out = []
    for ws in written:
        lesions = ws.series.lesion_truth()
        for n, lesion in enumerate(lesions):
            slices = set(lesion["slices"])  # type: ignore[arg-type]
            lesion["appears_on"] = [
                {"sop_instance_uid": inst.sop_instance_uid, "frame": frame, "slice": s}
                for inst in ws.instances
                for frame, s in enumerate(inst.slices)
                if s in slices and any(b.lesion == n for b in ws.series.boxes[s])
            ]
        out.append(
            {
                "series_instance_uid": ws.series_instance_uid,
                "seed": ws.series.seed,
                "slices": int(ws.series.pixels.shape[0]),
                "instances": [
                    {
                        "sop_instance_uid": inst.sop_instance_uid,
                        "file": inst.path.relative_to(root).as_posix()
                        if root is not None
                        else inst.path.name,
                        "slices": list(inst.slices),
                    }
                    for inst in ws.instances
                ],
                "pose": ws.series.pose.to_json(),
                "lesions": lesions,
            }
        )
    return {"classes": list(CLASSES), "series": out, "notice": NOTICE_LINE}
