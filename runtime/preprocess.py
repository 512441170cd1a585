"""Frame -> model input: modality LUT, VOI (window) or robust min-max, MONOCHROME1, colour, letterbox.

Each step is a pure function on arrays. Order (PS3.3 C.11, PS4 N.2.1): modality LUT / rescale first,
then the VOI transform, then the presentation (MONOCHROME1 inverted), then geometry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from retinaedge.runtime.errors import MalformedDicomError, UnsupportedPhotometricError
from retinaedge.runtime.manifest import Preprocessing, WindowPolicy

#: What pydicom's LUT and colour functions raise for header values they cannot use.
LUT_ERRORS = (ValueError, KeyError, IndexError, TypeError, AttributeError, ZeroDivisionError)


def _apply(what: str, func: Callable[..., Any], *args: Any, **kwargs: Any) -> np.ndarray:
    """``func(*args, **kwargs)`` (a pydicom pixel function) as an array; its failure on bad header values
    becomes :class:`MalformedDicomError` naming ``what`` (the client's input, a 400, never a 500)."""
    try:
        return np.asarray(func(*args, **kwargs))
    except LUT_ERRORS as exc:
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
        raise MalformedDicomError(
            f"the {what} cannot be applied: {type(exc).__name__}{': ' + first if first else ''}"
        ) from exc


@dataclass(frozen=True)
class FrameParams:
    """Per-frame pixel value transformation and window (enhanced multi-frame functional groups aware)."""

    slope: float = 1.0
    intercept: float = 0.0
    center: float | None = None
    width: float | None = None
    voi_function: str = "LINEAR"


def _first(value: Any) -> float | None:
    """A DS value or the first of a multi-valued one, as float; None when absent or unparseable."""
    if value is None or value == "":
        return None
    try:
        if isinstance(value, (int, float, str)):
            return float(value)
        return float(value[0])
    except (TypeError, ValueError, IndexError):
        return None


def _group_item(ds: Any, frame: int, sequence: str) -> Any | None:
    """``sequence``'s first item for ``frame`` from the per-frame, else the shared functional groups."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(groups)
        if seq is not None and len(seq) > index:
            inner = seq[index].get(sequence)
            if inner:
                return inner[0]
    return None


def frame_params(ds: Any, frame: int) -> FrameParams:
    """Rescale slope/intercept and window of ``frame`` (PS3.3 C.7.6.16.2.9 / .10 for enhanced objects)."""
    pvt = _group_item(ds, frame, "PixelValueTransformationSequence")
    voi = _group_item(ds, frame, "FrameVOILUTSequence")
    src_r = pvt if pvt is not None else ds
    src_w = voi if voi is not None else ds
    slope = _first(src_r.get("RescaleSlope"))
    intercept = _first(src_r.get("RescaleIntercept"))
    return FrameParams(
        slope=1.0 if slope is None or slope == 0 else slope,
        intercept=0.0 if intercept is None else intercept,
        center=_first(src_w.get("WindowCenter")),
        width=_first(src_w.get("WindowWidth")),
        voi_function=str(src_w.get("VOILUTFunction", "LINEAR") or "LINEAR").upper(),
    )


def modality_lut(arr: np.ndarray, ds: Any, params: FrameParams) -> np.ndarray:
    """Stored values -> modality values (PS3.3 C.11.1): Modality LUT Sequence, else rescale; float64."""
    if ds.get("ModalityLUTSequence"):
        from pydicom.pixels.processing import apply_modality_lut

        return _apply("Modality LUT Sequence", apply_modality_lut, arr, ds).astype(np.float64)
    out = arr.astype(np.float64)
    if params.slope != 1.0 or params.intercept != 0.0:
        out = out * params.slope + params.intercept
    return out


def window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """VOI window (PS3.3 C.11.2.1.2.1 LINEAR, C.11.2.1.3.2 LINEAR_EXACT, C.11.2.1.3.1 SIGMOID) into 0..1."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / max(width, 1e-12)))
    if function == "LINEAR":
        c, w = center - 0.5, width - 1.0
    else:  # LINEAR_EXACT
        c, w = center, width
    if w <= 0:
        return (values > c).astype(np.float64)
    out = (values - c) / w + 0.5
    out[values <= c - w / 2] = 0.0
    out[values > c + w / 2] = 1.0
    return out


def stored_percentiles(
    stored: np.ndarray, percentiles: tuple[float, ...], slope: float = 1.0, intercept: float = 0.0
) -> list[float]:
    """``np.percentile(stored * slope + intercept, percentiles)`` (linear method, float64), bit for bit,
    for integer ``stored`` values of at most 16 bits and ``slope > 0``: only the order statistics the
    interpolation needs are found (:func:`order_statistics`), rescaled as :func:`modality_lut` rescales
    every value, then interpolated as numpy does."""
    n = stored.size
    qs = np.true_divide(np.asarray(percentiles, dtype=np.float64), 100)
    places = []
    for q in qs:
        below = int(np.floor((n - 1) * q))
        places += [below, min(below + 1, n - 1)]
    found = order_statistics(stored.reshape(-1), places)

    def order_statistic(i: int) -> float:  # the i-th smallest (0-based), rescaled
        value = float(found[i])
        return value * slope + intercept if slope != 1.0 or intercept != 0.0 else value

    out = []
    for q in qs:
        virtual = (n - 1) * q
        previous = float(np.floor(virtual))
        gamma = virtual - previous
        a = order_statistic(int(previous))
        b = order_statistic(min(int(previous) + 1, n - 1))
        diff = b - a
        out.append(b - diff * (1 - gamma) if gamma >= 0.5 else a + diff * gamma)
    return out


def order_statistics(flat: np.ndarray, places: list[int]) -> dict[int, int]:
    """The ``i``-th smallest value of ``flat`` (1-D integers) for each ``i`` in ``places`` (0-based).

    One copy, partitioned in place around each place in ascending order, each time only the part above the
    last place: a selection around one index (numpy's is vectorised on AVX-512) costs a fraction of a
    histogram of the values or a sort; the next place up is the minimum of what lies above."""
    work = flat.copy()
    found: dict[int, int] = {}
    start = 0  # work[start:] holds the values above every place found so far
    for place in sorted(set(places)):
        if place in found:
            continue
        rest = work[start:]
        rest.partition(place - start)
        found[place] = int(rest[place - start])
        if place + 1 < flat.size:
            found[place + 1] = int(rest[place - start + 1 :].min())
        start = place + 1
    return found


def robust_minmax(
    values: np.ndarray,
    percentiles: tuple[float, float],
    stored: np.ndarray | None = None,
    params: FrameParams | None = None,
) -> np.ndarray:
    """Scale between two percentiles of the frame's own values into 0..1 (constant frame -> 0).

    With ``stored`` (the integer values ``values`` were rescaled from, by ``params``' positive slope) the
    percentiles come from the order statistics of ``stored`` (:func:`stored_percentiles`): the same
    numbers, several times faster than sorting.
    """
    if (
        stored is not None
        and params is not None
        and params.slope > 0
        and stored.dtype.kind in "ui"
        and stored.dtype.itemsize <= 2
        and stored.size > 0
    ):
        lo, hi = stored_percentiles(stored, percentiles, params.slope, params.intercept)
    else:
        lo, hi = np.percentile(values, percentiles)
    return scale_between(values, lo, hi)


def scale_between(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``values`` from ``lo`` (0) to ``hi`` (1), clipped (float64); all 0 when ``hi <= lo``."""
    if hi <= lo:
        return np.zeros_like(values, dtype=np.float64)
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0)


def voi(
    values: np.ndarray,
    ds: Any,
    params: FrameParams,
    policy: WindowPolicy,
    stored: np.ndarray | None = None,
) -> tuple[np.ndarray, str]:
    """Modality values -> 0..1 per ``policy``; returns the array and which rule was used. ``stored``: the
    stored values when ``values`` are their rescale (no Modality LUT Sequence), for a faster min-max."""
    if policy.policy == "fixed":
        assert policy.center is not None and policy.width is not None
        return window(values, policy.center, policy.width), "fixed"
    if policy.policy == "file":
        if params.center is not None and params.width is not None and params.width > 0:
            func = (
                params.voi_function
                if params.voi_function in ("LINEAR", "LINEAR_EXACT", "SIGMOID")
                else "LINEAR"
            )
            return np.clip(window(values, params.center, params.width, func), 0.0, 1.0), "file-window"
        if ds.get("VOILUTSequence"):
            from pydicom.pixels.processing import apply_voi_lut

            item = ds.VOILUTSequence[0]
            try:
                bits = int(item.LUTDescriptor[2]) if "LUTDescriptor" in item else 16
            except LUT_ERRORS as exc:
                raise MalformedDicomError("the VOI LUT Sequence has an invalid LUT Descriptor") from exc
            out = _apply("VOI LUT Sequence", apply_voi_lut, values, ds, index=0).astype(np.float64)
            return np.clip(out / float(2**bits - 1), 0.0, 1.0), "file-voi-lut"
    return robust_minmax(values, policy.percentiles, stored, params), "minmax"


def colour_to_unit(arr: np.ndarray, photometric: str, ds: Any, bits_stored: int) -> np.ndarray:
    """Colour frame -> RGB float64 ``(rows, cols, 3)`` in 0..1 (PALETTE COLOR through its LUTs)."""
    if photometric == "PALETTE COLOR":
        from pydicom.pixels.processing import apply_color_lut

        rgb = _apply("palette colour lookup table", apply_color_lut, arr, ds)
        depth = 16 if rgb.dtype.itemsize > 1 else 8
        return rgb.astype(np.float64) / float(2**depth - 1)
    if photometric in ("YBR_FULL", "YBR_FULL_422"):
        from pydicom.pixels.processing import convert_color_space

        arr = _apply(f"{photometric} to RGB conversion", convert_color_space, arr, photometric, "RGB")
    elif photometric not in ("RGB", "YBR_ICT", "YBR_RCT"):
        raise UnsupportedPhotometricError(f"cannot convert {photometric} to RGB")
    return arr.astype(np.float64) / float(2 ** min(bits_stored, 16) - 1)


def to_unit(
    arr: np.ndarray, photometric: str, ds: Any, frame: int, pre: Preprocessing, bits_stored: int
) -> tuple[np.ndarray, str]:
    """A decoded frame -> float32 0..1, ``(rows, cols)`` for grey or ``(rows, cols, 3)`` RGB; and the VOI rule."""
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        if arr.ndim != 2:
            raise UnsupportedPhotometricError(f"{photometric} frame has shape {arr.shape}")
        params = frame_params(ds, frame)
        linear = not ds.get("ModalityLUTSequence")  # then the modality values are a rescale of arr
        if linear and _by_table(arr, ds, params, pre.window):
            return _grey_by_table(arr, ds, params, pre.window, photometric)
        return _grey(arr, ds, params, pre.window, photometric, arr if linear else None)
    rgb = colour_to_unit(arr, photometric, ds, bits_stored)
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise UnsupportedPhotometricError(f"{photometric} frame has shape {rgb.shape}")
    return np.clip(rgb, 0.0, 1.0).astype(np.float32), "colour"


def _grey(
    values: np.ndarray,
    ds: Any,
    params: FrameParams,
    policy: WindowPolicy,
    photometric: str,
    stored: np.ndarray | None,
    bounds: tuple[float, float] | None = None,
) -> tuple[np.ndarray, str]:
    """Stored grey values -> float32 0..1: modality LUT, VOI, MONOCHROME1 inverted (element by element).
    ``bounds``: the min-max percentiles when they are known already (the frame's, for a table)."""
    modality = modality_lut(values, ds, params)
    if bounds is not None:
        out, rule = scale_between(modality, *bounds), "minmax"
    else:
        out, rule = voi(modality, ds, params, policy, stored)
    if photometric == "MONOCHROME1":  # PS3.3 C.7.6.3.1.2: minimum value is white
        out = 1.0 - out
    return out.astype(np.float32), rule


#: A frame goes through a table when it has at least this many pixels per distinct value in its range.
TABLE_MIN_PIXELS_PER_VALUE = 2


def _by_table(arr: np.ndarray, ds: Any, params: FrameParams, policy: WindowPolicy) -> bool:
    """Whether the grey pipeline of ``arr`` (integer stored values, no Modality LUT Sequence) may run
    once per distinct stored value instead of once per pixel: every step is then a function of the stored
    value alone, computed with the same float64 operations, so the result is the same bit for bit. Not for
    a VOI LUT Sequence (pydicom's lookup) nor SIGMOID (``exp``): those stay per pixel."""
    if arr.dtype.kind not in "ui" or arr.dtype.itemsize > 2 or arr.size == 0:
        return False
    rule = _voi_rule(ds, params, policy)
    if rule == "file-window":
        return params.voi_function != "SIGMOID"
    if rule == "minmax":
        return params.slope > 0  # the percentiles then come from the stored values' order statistics
    return rule == "fixed"


def _voi_rule(ds: Any, params: FrameParams, policy: WindowPolicy) -> str:
    """The rule :func:`voi` applies (its second value), from the header alone."""
    if policy.policy == "fixed":
        return "fixed"
    if policy.policy == "file":
        if params.center is not None and params.width is not None and params.width > 0:
            return "file-window"
        if ds.get("VOILUTSequence"):
            return "file-voi-lut"
    return "minmax"


def _grey_by_table(
    arr: np.ndarray, ds: Any, params: FrameParams, policy: WindowPolicy, photometric: str
) -> tuple[np.ndarray, str]:
    """:func:`_grey` computed once for each stored value between the frame's minimum and maximum, then
    looked up per pixel (:func:`_by_table` says when; a frame whose range is wide for its size is
    computed per pixel)."""
    lo, hi = int(arr.min()), int(arr.max())
    if (hi - lo + 1) * TABLE_MIN_PIXELS_PER_VALUE > arr.size:
        return _grey(arr, ds, params, policy, photometric, arr)
    domain = np.arange(lo, hi + 1, dtype=arr.dtype)
    bounds = None
    if _voi_rule(ds, params, policy) == "minmax":
        low, high = stored_percentiles(arr, policy.percentiles, params.slope, params.intercept)
        bounds = (low, high)
    table, rule = _grey(domain, ds, params, policy, photometric, None, bounds)
    index = arr if lo == 0 else np.subtract(arr, lo, dtype=np.int32)
    return np.take(table, index), rule


def match_channels(unit: np.ndarray, channels: int) -> np.ndarray:
    """``(rows, cols)`` or ``(rows, cols, 3)`` -> ``(channels, rows, cols)`` (ITU-R BT.601 luma for RGB -> grey)."""
    if unit.ndim == 2:
        return np.repeat(unit[None], channels, axis=0) if channels == 3 else unit[None]
    if channels == 3:
        return np.ascontiguousarray(unit.transpose(2, 0, 1))
    luma = 0.299 * unit[..., 0] + 0.587 * unit[..., 1] + 0.114 * unit[..., 2]
    return luma[None].astype(np.float32)
