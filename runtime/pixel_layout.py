"""The Image Pixel module's layout, read and checked from the header (:func:`pixel_layout`), once per
distinct set of its elements: the slices of a series repeat rows, columns, samples, bits and photometric,
so each layout is converted and checked once and then found by :func:`~.rawkey.raw_key` of
:data:`LAYOUT_TAGS` (and the limits). A layout that fails is checked again each time (its error is the
instance's); a PALETTE COLOR layout is never kept (its palette's elements are not keyed).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from retinaedge.runtime.errors import (
    MalformedDicomError,
    NoPixelDataError,
    OverBudgetError,
    UnsupportedPhotometricError,
)
from retinaedge.runtime.rawkey import raw_key

if TYPE_CHECKING:
    from retinaedge.runtime.dicomio import Limits

SUPPORTED_PHOTOMETRIC = (
    "MONOCHROME1",
    "MONOCHROME2",
    "RGB",
    "YBR_FULL",
    "YBR_FULL_422",
    "PALETTE COLOR",
    "YBR_ICT",
    "YBR_RCT",
)

Layout = tuple[int, int, int, int, int, int, int, str]

#: What :func:`_layout` reads (with the palette's elements for PALETTE COLOR, whose layouts are not kept).
LAYOUT_TAGS = (
    0x00080005,  # Specific Character Set (pydicom reads the others' text in it)
    0x00280002,  # Samples per Pixel
    0x00280004,  # Photometric Interpretation
    0x00280008,  # Number of Frames
    0x00280010,  # Rows
    0x00280011,  # Columns
    0x00280100,  # Bits Allocated
    0x00280101,  # Bits Stored
    0x00280103,  # Pixel Representation
)
#: Layouts found valid, by :func:`~.rawkey.raw_key` of :data:`LAYOUT_TAGS` and the limits: the slices of
#: a series repeat them, so each is converted and checked once (at most ``_LAYOUTS_MAX``, then emptied).
_LAYOUTS: dict[tuple[Any, ...], Layout] = {}
_LAYOUTS_MAX = 256


def pixel_layout(ds: Any, limits: Limits) -> Layout:
    """:func:`_layout`, found in :data:`_LAYOUTS` when the same elements were checked before (module
    docstring)."""
    key = raw_key(ds, LAYOUT_TAGS)
    layout = _LAYOUTS.get((key, limits)) if key is not None else None
    if layout is None:
        layout = _layout(ds, limits)
        if key is not None and layout[-1] != "PALETTE COLOR":
            if len(_LAYOUTS) >= _LAYOUTS_MAX:
                _LAYOUTS.clear()
            _LAYOUTS[(key, limits)] = layout
    return layout


def _layout(ds: Any, limits: Limits) -> Layout:
    """The Image Pixel module's layout, checked: ``(rows, columns, samples per pixel, bits allocated,
    bits stored, pixel representation, frames, photometric)``; raises what :func:`validate` raises."""
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    samples = _int(ds, "SamplesPerPixel")
    bits_alloc = _int(ds, "BitsAllocated")
    bits_stored = _int(ds, "BitsStored", required=False, default=bits_alloc)
    pixel_rep = _int(ds, "PixelRepresentation", required=False, default=0)
    frames = _int(ds, "NumberOfFrames", required=False, default=1) if "NumberOfFrames" in ds else 1
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if rows < 1 or cols < 1:
        raise NoPixelDataError(f"image has {rows} rows and {cols} columns")
    if frames < 1:
        raise NoPixelDataError(f"Number of Frames is {frames}")
    if rows > limits.max_rows or cols > limits.max_columns:
        raise OverBudgetError(
            f"{rows} x {cols} pixels exceeds the {limits.max_rows} x {limits.max_columns} limit"
        )
    if frames > limits.max_frames:
        raise OverBudgetError(f"{frames} frames exceeds the {limits.max_frames}-frame limit")
    if bits_alloc not in (1, 8, 16, 32, 64) or not 1 <= bits_stored <= bits_alloc or pixel_rep not in (0, 1):
        raise MalformedDicomError(
            f"inconsistent pixel layout: bits allocated {bits_alloc}, stored {bits_stored}, "
            f"representation {pixel_rep}"
        )
    if samples not in (1, 3):
        raise UnsupportedPhotometricError(f"{samples} samples per pixel is not supported (1 or 3)")
    if photometric not in SUPPORTED_PHOTOMETRIC:
        raise UnsupportedPhotometricError(
            f"photometric interpretation {photometric or '(missing)'!r} is not supported"
        )
    if (samples == 1) != (photometric in ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR")):
        raise MalformedDicomError(f"{photometric} with {samples} samples per pixel is inconsistent")
    if photometric == "PALETTE COLOR":
        _check_palette(ds)
    return rows, cols, samples, bits_alloc, bits_stored, pixel_rep, frames, photometric


def _int(ds: Any, keyword: str, required: bool = True, default: int | None = None) -> int:
    value = ds.get(keyword, None)
    if value is None or value == "":
        if required:
            raise MalformedDicomError(f"required attribute {keyword} is missing")
        return int(default or 0)
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise MalformedDicomError(f"{keyword} has an invalid value") from exc


def _check_palette(ds: Any) -> None:
    """PALETTE COLOR needs, per channel, a 3-valued LUT descriptor and its data, plain or segmented
    (PS3.3 C.7.6.3.1.5-6, C.7.9); without them no RGB value can be looked up."""
    missing = []
    for colour in ("Red", "Green", "Blue"):
        descriptor = ds.get(f"{colour}PaletteColorLookupTableDescriptor")
        try:
            bits = (
                None if len(descriptor) != 3 or isinstance(descriptor, (str, bytes)) else int(descriptor[2])
            )
        except (TypeError, ValueError):  # absent, one value, or values that are not numbers
            bits = None
        if bits is None:
            missing.append(f"{colour}PaletteColorLookupTableDescriptor")
        elif bits not in (8, 16):
            raise MalformedDicomError(
                f"{colour}PaletteColorLookupTableDescriptor gives {bits} bits per entry; "
                "8 or 16 are allowed (PS3.3 C.7.6.3.1.5)"
            )
        if (
            f"{colour}PaletteColorLookupTableData" not in ds
            and f"Segmented{colour}PaletteColorLookupTableData" not in ds
        ):
            missing.append(f"{colour}PaletteColorLookupTableData")
    if missing:
        raise MalformedDicomError(
            "PALETTE COLOR without its palette: missing " + ", ".join(missing) + " (PS3.3 C.7.6.3.1.5)"
        )
