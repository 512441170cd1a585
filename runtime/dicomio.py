"""Strict DICOM reading: parse, validate against the bytes present and a decoded-size budget, then
decode frame by frame.

Nothing is decoded before :func:`validate` has checked, from the header alone, that the instance is an
image, that its declared pixel data is all there, and that decoding fits the budget. pydicom is never
called with ``force=True``.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from retinaedge.runtime.errors import (
    MalformedDicomError,
    NoPixelDataError,
    OverBudgetError,
    TruncatedDicomError,
    UnsupportedPhotometricError,
    UnsupportedTransferSyntaxError,
)
from retinaedge.runtime.pixel_layout import pixel_layout
from retinaedge.runtime.uids import check_uid

log = logging.getLogger(__name__)

PIXEL_DATA_TAG = 0x7FE00010
UNDEFINED_LENGTH = 0xFFFFFFFF
#: The identifiers an instance brings, checked as UIDs when present (they name files, rows and URLs).
_UID_ELEMENTS = (
    ("SOPInstanceUID", "SOP Instance UID (0008,0018)"),
    ("SOPClassUID", "SOP Class UID (0008,0016)"),
    ("StudyInstanceUID", "Study Instance UID (0020,000D)"),
    ("SeriesInstanceUID", "Series Instance UID (0020,000E)"),
)

# What to install for each family of compressed transfer syntaxes.
DECODER_HINTS = {
    "1.2.840.10008.1.2.4.50": "pylibjpeg + pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.51": "pylibjpeg + pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.57": "pylibjpeg + pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.70": "pylibjpeg + pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.80": "pylibjpeg + pylibjpeg-libjpeg (or pyjpegls)",
    "1.2.840.10008.1.2.4.81": "pylibjpeg + pylibjpeg-libjpeg (or pyjpegls)",
    "1.2.840.10008.1.2.4.90": "pylibjpeg + pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.91": "pylibjpeg + pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.5": "pylibjpeg + pylibjpeg-rle (or numpy alone, slower)",
}


@dataclass(frozen=True)
class Limits:
    """Budgets checked from the header before any allocation.

    ``max_decoded_bytes``: rows x columns x frames x samples x bytes per sample of the whole instance;
    ``max_frame_bytes``: the same for one frame (what frame-by-frame decoding allocates at once).
    """

    max_file_bytes: int = 2 * 1024**3
    max_decoded_bytes: int = 4 * 1024**3
    max_frame_bytes: int = 256 * 1024**2
    max_frames: int = 10_000
    max_rows: int = 16_384
    max_columns: int = 16_384
    max_sequence_depth: int = 12


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class ImageInfo:
    """The validated Image Pixel module of an instance (frames in the instance, not per series)."""

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    rows: int
    columns: int
    frames: int
    samples_per_pixel: int
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    photometric: str
    compressed: bool

    @property
    def frame_bytes(self) -> int:
        """Decoded bytes of one frame (the decoder's output, at least one byte per sample)."""
        return self.rows * self.columns * self.samples_per_pixel * max(1, (self.bits_allocated + 7) // 8)


# Values larger than this are not read at parse time; native pixel data is then read frame by frame.
DEFER_BYTES = 64 * 1024
DEFLATED = "1.2.840.10008.1.2.1.99"


@dataclass
class DicomInput:
    """A parsed instance whose large values stay in ``fileobj`` until needed (close it when done)."""

    ds: Any
    fileobj: BinaryIO
    size: int

    def close(self) -> None:
        self.fileobj.close()

    def __enter__(self) -> DicomInput:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_dicom(source: bytes | str | Path, limits: Limits = DEFAULT_LIMITS) -> DicomInput:
    """Parse DICOM Part 10 bytes or a file strictly (never ``force``), deferring values over 64 KiB."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        try:
            fileobj: BinaryIO = open(path, "rb")  # noqa: SIM115 (owned by the returned DicomInput)
            size = os.fstat(fileobj.fileno()).st_size
        except OSError as exc:
            raise MalformedDicomError(f"cannot read {path.name}: {exc.strerror}") from exc
    else:
        fileobj = io.BytesIO(source)
        size = len(source)
    try:
        if size > limits.max_file_bytes:
            raise OverBudgetError(f"instance is {size} bytes, above the {limits.max_file_bytes}-byte limit")
        if size < 132:
            raise MalformedDicomError(
                f"{size} bytes is too short for a DICOM Part 10 file (preamble + 'DICM')"
            )
        ds = _parse(fileobj, DEFER_BYTES)
        meta = getattr(ds, "file_meta", None)
        if meta is not None and str(meta.get("TransferSyntaxUID", "")) == DEFLATED:
            fileobj.seek(0)  # pydicom inflates into its own buffer: deferred offsets would not apply
            ds = _parse(fileobj, None)
    except BaseException:
        fileobj.close()
        raise
    return DicomInput(ds=ds, fileobj=fileobj, size=size)


def _parse(fileobj: BinaryIO, defer: int | None) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(fileobj, force=False, defer_size=defer)
    except InvalidDicomError as exc:
        raise MalformedDicomError(f"not a DICOM Part 10 file: {exc}") from exc
    except RecursionError as exc:
        raise MalformedDicomError("sequence nesting too deep to parse") from exc
    except EOFError as exc:
        raise TruncatedDicomError(f"the file ends inside an element: {exc}") from exc
    except NotImplementedError as exc:
        raise UnsupportedTransferSyntaxError(str(exc)) from exc
    except Exception as exc:  # pydicom raises many types (struct.error, ValueError, zlib.error ...)
        raise MalformedDicomError(f"cannot parse: {type(exc).__name__}: {exc}") from exc


def _check_depth(ds: Any, limit: int) -> None:
    """Reject sequences nested deeper than ``limit`` (iterative: no recursion on hostile input)."""
    stack = [(ds, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            raise MalformedDicomError(f"sequences nested deeper than {limit} levels")
        # The elements as held (raw or converted; a deferred value is not loaded): only a sequence, or
        # an element whose VR is not known yet, can hold items.
        for tag, raw in list(item.items()):
            vr = raw.VR
            if vr not in ("SQ", None, "UN"):
                continue
            if tag == PIXEL_DATA_TAG or (raw.value is None and vr != "SQ"):
                continue
            elem = item[tag]
            if elem.VR == "SQ":
                stack.extend((child, depth + 1) for child in elem.value)


def validate(src: DicomInput, limits: Limits = DEFAULT_LIMITS) -> ImageInfo:
    """Check everything decoding relies on, from the header and the bytes present; decode nothing."""
    from pydicom.uid import UID

    ds = src.ds

    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        raise MalformedDicomError("file meta information (0002,0010 Transfer Syntax UID) is missing")
    ts = UID(str(meta.TransferSyntaxUID))
    try:
        _check_depth(ds, limits.max_sequence_depth)
    except MalformedDicomError:
        raise
    except Exception as exc:  # deferred parsing of a damaged sequence
        raise MalformedDicomError(f"cannot parse a sequence: {type(exc).__name__}: {exc}") from exc
    if PIXEL_DATA_TAG not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise UnsupportedPhotometricError("float pixel data (parametric maps) is not supported")
        if "Rows" in ds and "Columns" in ds and _pixel_tag_in_bytes(src):
            raise TruncatedDicomError("the file ends inside the Pixel Data element")
        raise NoPixelDataError("the instance has no Pixel Data (7FE0,0010): it is not an image")
    if not ts.is_transfer_syntax:
        raise UnsupportedTransferSyntaxError(f"{ts} is not a known transfer syntax")
    rows, cols, samples, bits_alloc, bits_stored, pixel_rep, frames, photometric = pixel_layout(ds, limits)
    for keyword, what in _UID_ELEMENTS:
        value = ds.get(keyword)
        if value is not None and str(value).strip("\0 "):
            check_uid(str(value).strip("\0 "), what)
    info = ImageInfo(
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        sop_class_uid=str(ds.get("SOPClassUID", "")),
        transfer_syntax=str(ts),
        rows=rows,
        columns=cols,
        frames=frames,
        samples_per_pixel=samples,
        bits_allocated=bits_alloc,
        bits_stored=bits_stored,
        pixel_representation=pixel_rep,
        photometric=photometric,
        compressed=bool(ts.is_compressed),
    )
    if info.frame_bytes > limits.max_frame_bytes:
        raise OverBudgetError(
            f"one frame decodes to {info.frame_bytes} bytes, above the {limits.max_frame_bytes}-byte limit"
        )
    if info.frame_bytes * frames > limits.max_decoded_bytes:
        raise OverBudgetError(
            f"{frames} frames decode to {info.frame_bytes * frames} bytes, above the "
            f"{limits.max_decoded_bytes}-byte limit"
        )
    _check_pixel_bytes(src, info)
    return info


def _pixel_tag_in_bytes(src: DicomInput) -> bool:
    """Whether the Pixel Data tag occurs in the raw bytes (pydicom drops a cut undefined-length element)."""
    src.fileobj.seek(0)
    tail = src.fileobj.read()
    return b"\xe0\x7f\x10\x00" in tail or b"\x7f\xe0\x00\x10" in tail


def _check_pixel_bytes(src: DicomInput, info: ImageInfo) -> None:
    """The declared pixel data is all present: native length, or complete encapsulated fragments."""
    raw = src.ds.get_item(PIXEL_DATA_TAG, keep_deferred=True)
    declared = getattr(raw, "length", None)
    value = getattr(raw, "value", None)
    tell = getattr(raw, "value_tell", None)
    if value is None and info.compressed:
        # Encapsulated data is needed whole to walk its fragments; its size is bounded by the file.
        try:
            raw = src.ds.get_item(PIXEL_DATA_TAG)
        except Exception as exc:
            raise TruncatedDicomError(f"encapsulated Pixel Data cannot be read: {exc}") from exc
        value = getattr(raw, "value", None)
    if value is None and tell is not None and declared is not None and declared != UNDEFINED_LENGTH:
        present = max(0, min(declared, src.size - tell))  # deferred: what the file really holds
    elif value is None:
        raise NoPixelDataError("Pixel Data is empty")
    else:
        present = len(value)
    if declared is not None and declared != UNDEFINED_LENGTH and present < declared:
        raise TruncatedDicomError(f"Pixel Data declares {declared} bytes but only {present} are present")
    if not info.compressed:
        pixels = info.rows * info.columns * info.frames * info.samples_per_pixel
        if info.photometric == "YBR_FULL_422":  # PS3.3 C.7.6.3.1.2: chroma halved horizontally
            pixels = info.rows * info.columns * info.frames * 2
        expected = (pixels + 7) // 8 if info.bits_allocated == 1 else pixels * info.bits_allocated // 8
        if present < expected:
            raise TruncatedDicomError(
                f"Pixel Data has {present} bytes; {info.frames} frame(s) of {info.rows} x {info.columns} x "
                f"{info.samples_per_pixel} at {info.bits_allocated} bits need {expected}"
            )
        return
    if declared is not None and declared != UNDEFINED_LENGTH:
        raise MalformedDicomError("encapsulated Pixel Data must have an undefined length")
    if value is None:
        raise MalformedDicomError("encapsulated Pixel Data could not be read")
    for fragment in _check_fragments(bytes(value), info.frames):
        dims = codestream_dims(fragment)
        if dims is not None and (dims[0] > info.rows or dims[1] > info.columns):
            raise MalformedDicomError(
                f"a compressed frame declares {dims[0]} x {dims[1]} pixels but the header says "
                f"{info.rows} x {info.columns}; refusing to decode"
            )


def codestream_dims(fragment: memoryview) -> tuple[int, int] | None:
    """(rows, columns) declared by a JPEG / JPEG-LS (SOF) or JPEG 2000 (SIZ) codestream start, if any.

    Decoders allocate from these values, so they are checked against the DICOM header first.
    """
    head = bytes(fragment[:2])
    if head == b"\xff\xd8":  # JPEG / JPEG-LS: SOI, then markers until a SOFn
        from pydicom.pixels.utils import _get_jpg_parameters

        params = _get_jpg_parameters(bytes(fragment))
        return (int(params["height"]), int(params["width"])) if "height" in params else None
    data = bytes(fragment[:4096])
    at = data.find(b"\xff\x4f\xff\x51")  # JPEG 2000: SOC followed by SIZ (also inside a JP2 box)
    if at < 0 or at + 26 > len(data):
        return None
    x, y, xo, yo = (int.from_bytes(data[at + 8 + 4 * i : at + 12 + 4 * i], "big") for i in range(4))
    return y - yo, x - xo


def _check_fragments(value: bytes, frames: int) -> list[memoryview]:
    """Walk the encapsulated items (PS3.5 A.4): each item complete, enough fragments for the frames.

    Returns the fragments (without the Basic Offset Table).
    """
    view = memoryview(value)
    offset, items = 0, 0
    fragments_seen: list[memoryview] = []
    while offset < len(view):
        if offset + 8 > len(view):
            raise TruncatedDicomError("encapsulated Pixel Data ends inside an item header")
        group = int.from_bytes(view[offset : offset + 2], "little")
        elem = int.from_bytes(view[offset + 2 : offset + 4], "little")
        length = int.from_bytes(view[offset + 4 : offset + 8], "little")
        if (group, elem) == (0xFFFE, 0xE0DD):
            break
        if (group, elem) != (0xFFFE, 0xE000):
            raise MalformedDicomError(f"unexpected tag ({group:04X},{elem:04X}) in encapsulated Pixel Data")
        if length == UNDEFINED_LENGTH or offset + 8 + length > len(view):
            raise TruncatedDicomError(
                f"encapsulated item {items} declares {length} bytes but fewer are present"
            )
        if items > 0:
            fragments_seen.append(view[offset + 8 : offset + 8 + length])
        offset += 8 + length
        items += 1
    fragments = items - 1  # the first item is the Basic Offset Table
    if fragments < 1:
        raise TruncatedDicomError("encapsulated Pixel Data has no fragments")
    if fragments < frames and frames > 1:
        raise TruncatedDicomError(f"{frames} frames declared but only {fragments} fragment(s) present")
    return fragments_seen


def _native_file_options(src: DicomInput, info: ImageInfo) -> dict[str, Any] | None:
    """Decoder options to read deferred native pixel data straight from the file, else None."""
    raw = src.ds.get_item(PIXEL_DATA_TAG, keep_deferred=True)
    if info.compressed or getattr(raw, "value", None) is not None or getattr(raw, "value_tell", None) is None:
        return None
    opts: dict[str, Any] = {
        "rows": info.rows,
        "columns": info.columns,
        "samples_per_pixel": info.samples_per_pixel,
        "bits_allocated": info.bits_allocated,
        "bits_stored": info.bits_stored,
        "pixel_representation": info.pixel_representation,
        "photometric_interpretation": info.photometric,
        "number_of_frames": info.frames,
        "pixel_keyword": "PixelData",
    }
    if info.samples_per_pixel > 1:
        opts["planar_configuration"] = int(src.ds.get("PlanarConfiguration", 0) or 0)
    src.fileobj.seek(raw.value_tell)
    return opts


def iter_frames(
    src: DicomInput, info: ImageInfo, indices: Sequence[int] | None = None
) -> Iterator[tuple[np.ndarray, str]]:
    """Decode one frame at a time -> ``(array (rows, cols) or (rows, cols, 3), photometric after decoding)``.

    Native pixel data is read from the file one frame at a time; encapsulated data is decoded per frame
    from its fragments. YBR is converted to RGB by the decoder where it can; the returned photometric says
    what the array holds. Decoder failures are typed; a missing plugin names what to install. With
    ``indices`` (0-based, in the order given) only those frames are decoded; the others are skipped.
    """
    from pydicom.pixels.decoders.base import get_decoder

    try:
        decoder = get_decoder(info.transfer_syntax)
    except NotImplementedError as exc:
        raise UnsupportedTransferSyntaxError(
            f"no decoder for transfer syntax {info.transfer_syntax}"
        ) from exc
    if not decoder.is_available:
        hint = DECODER_HINTS.get(info.transfer_syntax, "a pydicom decoding plugin")
        raise UnsupportedTransferSyntaxError(
            f"transfer syntax {info.transfer_syntax} needs a decoder that is not installed: install {hint}"
        )
    try:
        opts = _native_file_options(src, info)
        wanted = None if indices is None else list(indices)
        frames = (
            decoder.iter_array(src.fileobj, indices=wanted, as_rgb=True, **opts)
            if opts is not None
            else decoder.iter_array(src.ds, indices=wanted, as_rgb=True)
        )
        for arr, props in frames:
            yield arr, str(props.get("photometric_interpretation", info.photometric))
    except (
        RuntimeError,
        ValueError,
        OSError,
        EOFError,
        IndexError,
        KeyError,
        AttributeError,
        TypeError,
    ) as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__]
        raise MalformedDicomError(f"pixel data could not be decoded: {'; '.join(lines)}") from exc
