"""Bad pixel-module values are the client's input: a typed 4xx error that says what is wrong, never a
library exception (which the service would answer with a 500)."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from retinaedge.runtime.detector import Detector
from retinaedge.runtime.errors import MalformedDicomError
from retinaedge.runtime.manifest import Preprocessing, WindowPolicy
from retinaedge.runtime.preprocess import to_unit
from support.paths import REPO_ROOT, demo_any_image

SOURCE = REPO_ROOT / "examples" / "study_01" / "IM0001.dcm"


def _bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture(scope="module")
def detector() -> Detector:
    with Detector.open(demo_any_image(), threads=1) as det:  # palettes are not the demo's images
        yield det


def test_palette_color_without_a_palette_is_malformed(detector: Detector) -> None:
    ds = pydicom.dcmread(SOURCE)
    ds.PhotometricInterpretation = "PALETTE COLOR"
    with pytest.raises(MalformedDicomError, match="PALETTE COLOR without its palette") as info:
        detector.detect(_bytes(ds))
    assert info.value.http_status == 400
    assert "RedPaletteColorLookupTableDescriptor" in str(info.value)


def test_palette_whose_data_do_not_fit_the_descriptor_is_malformed(detector: Detector) -> None:
    ds = pydicom.dcmread(SOURCE)
    ds.PhotometricInterpretation = "PALETTE COLOR"
    for colour in ("Red", "Green", "Blue"):
        ds[f"{colour}PaletteColorLookupTableDescriptor"] = pydicom.DataElement(
            f"{colour}PaletteColorLookupTableDescriptor", "US", [256, 0, 16]
        )
        # 3 bytes where 256 16-bit entries are declared: pydicom's apply_color_lut cannot use them.
        ds[f"{colour}PaletteColorLookupTableData"] = pydicom.DataElement(
            f"{colour}PaletteColorLookupTableData", "OW", b"\x00\x01\x02\x03"[:3] + b"\x00"
        )
    with pytest.raises(MalformedDicomError, match="palette colour lookup table cannot be applied") as info:
        detector.detect(_bytes(ds))
    assert info.value.http_status == 400


def test_palette_with_bits_per_entry_out_of_range_is_malformed(detector: Detector) -> None:
    ds = pydicom.dcmread(SOURCE)
    ds.PhotometricInterpretation = "PALETTE COLOR"
    for colour in ("Red", "Green", "Blue"):
        ds[f"{colour}PaletteColorLookupTableDescriptor"] = pydicom.DataElement(
            f"{colour}PaletteColorLookupTableDescriptor", "US", [256, 0, 12]
        )
        ds[f"{colour}PaletteColorLookupTableData"] = pydicom.DataElement(
            f"{colour}PaletteColorLookupTableData", "OW", bytes(512)
        )
    with pytest.raises(MalformedDicomError, match="8 or 16"):
        detector.detect(_bytes(ds))


@pytest.mark.filterwarnings("ignore:Applying a VOI LUT on a float:UserWarning")
def test_a_voi_lut_sequence_that_cannot_be_applied_is_malformed() -> None:
    ds = Dataset()
    ds.BitsStored = 12
    ds.PixelRepresentation = 0
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.LUTData = [0, 1, 2]  # 3 entries where 4096 are declared
    ds.VOILUTSequence = Sequence([item])
    pre = Preprocessing(window=WindowPolicy(policy="file"))
    frame = np.arange(64, dtype=np.uint16).reshape(8, 8)
    with pytest.raises(MalformedDicomError, match="VOI LUT"):
        to_unit(frame, "MONOCHROME2", ds, 0, pre, 12)


def test_a_modality_lut_sequence_that_cannot_be_applied_is_malformed() -> None:
    ds = Dataset()
    ds.BitsStored = 12
    ds.PixelRepresentation = 0
    item = Dataset()
    item.LUTDescriptor = [4096]  # one value where three are required
    item.LUTData = [0, 1, 2]
    item.ModalityLUTType = "HU"
    ds.ModalityLUTSequence = Sequence([item])
    pre = Preprocessing(window=WindowPolicy(policy="minmax"))
    frame = np.arange(64, dtype=np.uint16).reshape(8, 8)
    with pytest.raises(MalformedDicomError, match="Modality LUT"):
        to_unit(frame, "MONOCHROME2", ds, 0, pre, 12)


@pytest.mark.parametrize(
    ("uid", "problem"),
    [
        ("../../etc/passwd", "characters other than digits and dots"),
        ("1.2." + "3" * 10_000, "10004 characters"),
        ("1.2.3\x00.4", "characters other than digits and dots"),
        (b"1.2.\xd9\xa3.4", "characters other than digits and dots"),  # UTF-8 of an Arabic-Indic digit
        ("1.2..4", "empty component"),
    ],
)
@pytest.mark.filterwarnings("ignore::UserWarning:pydicom.valuerep")  # pydicom reads the bad values
@pytest.mark.parametrize("keyword", ["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"])
def test_identifiers_that_are_not_uids_are_refused_without_echoing_them(
    detector: Detector, keyword: str, uid: str | bytes, problem: str
) -> None:
    ds = pydicom.dcmread(SOURCE)
    placeholder = "9.8.7.6.5.4.3.2.1"[: len(uid)] if isinstance(uid, bytes) else uid
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid UI value as it is set
        ds[keyword] = pydicom.DataElement(keyword, "UI", placeholder)
        data = _bytes(ds)
    if isinstance(uid, bytes):  # bytes pydicom refuses to write: patched in after writing
        assert data.count(placeholder.encode()) >= 1
        data = data.replace(placeholder.encode(), uid)
    with pytest.raises(MalformedDicomError, match=problem) as info:
        detector.detect(data)
    assert "not a DICOM UID" in str(info.value)
    assert (uid.decode("utf-8") if isinstance(uid, bytes) else uid) not in str(info.value)


def test_a_palette_descriptor_that_is_not_numbers_is_malformed(detector: Detector) -> None:
    ds = pydicom.dcmread(SOURCE)
    ds.PhotometricInterpretation = "PALETTE COLOR"
    for colour in ("Red", "Green", "Blue"):
        tag = pydicom.datadict.tag_for_keyword(f"{colour}PaletteColorLookupTableDescriptor")
        ds.add_new(tag, "LO", ["a", "0", "x"])  # the wrong VR, values that are not numbers
        ds[f"{colour}PaletteColorLookupTableData"] = pydicom.DataElement(
            f"{colour}PaletteColorLookupTableData", "OW", bytes(512)
        )
    with pytest.raises(MalformedDicomError, match="PALETTE COLOR without its palette"):
        detector.detect(_bytes(ds))
