"""Synthetic DICOM instances for tests (pydicom's writer; synthetic patient, no real data)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid


def mr_instance(
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    window: tuple[float, float] | None = None,
    rescale: tuple[float, float] | None = None,
) -> Dataset:
    """``pixels`` uint16 ``(rows, cols)`` or ``(frames, rows, cols)`` -> an MR image dataset."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "MR"
    ds.PatientName = "SYNTHETIC^TEST"
    ds.PatientID = "TEST-0001"
    frames = pixels if pixels.ndim == 3 else pixels[None]
    ds.Rows, ds.Columns = int(frames.shape[1]), int(frames.shape[2])
    if pixels.ndim == 3:
        ds.NumberOfFrames = int(frames.shape[0])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    ds.PixelData = np.ascontiguousarray(frames.astype("<u2")).tobytes()
    return ds


def to_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def write(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def out_of_scope(directory: Path) -> dict[str, Path]:
    """Instances outside the demo model's intended use (brain MR, greyscale, axial, no localizer), each
    made from an example slice with one thing changed, plus real ones from pydicom's test files:
    ``ct`` (pydicom's CT_small), ``localizer``, ``secondary-capture``, ``us-rgb``, ``sagittal-mr`` and
    ``sc-rgb`` (pydicom's SC_rgb_rle). Name -> file; the rule each fails is in :data:`OUT_OF_SCOPE_RULES`."""
    import shutil

    import pydicom
    from pydicom.uid import SecondaryCaptureImageStorage, UltrasoundImageStorage

    from support.paths import CORPUS, EXAMPLES

    directory.mkdir(parents=True, exist_ok=True)
    out = {
        "ct": Path(shutil.copyfile(CORPUS / "CT_small.dcm", directory / "ct.dcm")),
        "sc-rgb": Path(shutil.copyfile(CORPUS / "SC_rgb_rle.dcm", directory / "sc_rgb.dcm")),
    }

    def variant(name: str, change: Any) -> None:
        ds = pydicom.dcmread(EXAMPLES / "study_01" / "IM0014.dcm")
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        change(ds)
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        out[name] = write(ds, directory / f"{name}.dcm")

    def localizer(ds: Dataset) -> None:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]

    def secondary_capture(ds: Dataset) -> None:
        ds.SOPClassUID = SecondaryCaptureImageStorage
        ds.Modality = "OT"

    def us_rgb(ds: Dataset) -> None:
        grey = ds.pixel_array.astype(np.float32)
        rgb = np.clip(grey / max(float(grey.max()), 1.0) * 255.0, 0, 255).astype(np.uint8)
        ds.SOPClassUID = UltrasoundImageStorage
        ds.Modality = "US"
        ds.PhotometricInterpretation = "RGB"
        ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        for keyword in ("WindowCenter", "WindowWidth", "RescaleSlope", "RescaleIntercept"):
            if keyword in ds:
                delattr(ds, keyword)
        ds.PixelData = np.repeat(rgb[..., None], 3, axis=2).tobytes()

    def sagittal(ds: Dataset) -> None:
        ds.ImageOrientationPatient = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]

    variant("localizer", localizer)
    variant("secondary-capture", secondary_capture)
    variant("us-rgb", us_rgb)
    variant("sagittal-mr", sagittal)
    return out


#: The rules of the demo's intended use each file of :func:`out_of_scope` fails (at least these).
OUT_OF_SCOPE_RULES = {
    "ct": {"modalities", "sop_classes"},
    "sc-rgb": {"modalities", "sop_classes", "photometric"},
    "localizer": {"image_types"},
    "secondary-capture": {"modalities", "sop_classes"},
    "us-rgb": {"modalities", "sop_classes", "photometric"},
    "sagittal-mr": {"orientation"},
}
