"""A model's intended use: which images it was made for, checked on the header alone.

The manifest's ``intended_use`` section lists rules; an instance that fails any of them is
*not applicable* to the model, and the model never sees its pixels (:class:`NotApplicableError`, raised
by :meth:`~.reader.InstanceReader.open` before anything is decoded). A bundle without the section takes
every image, as bundles did before it existed.

Rules (each optional; ``missing`` says what an absent or unreadable attribute means, ``accept`` or
``reject``, with the default given):

- ``modalities`` {``allow``: [``MR``, ...]}: Modality (0008,0060); missing: reject.
- ``sop_classes`` {``allow``: [UID, ...]}: SOP Class UID; always present.
- ``image_types`` {``exclude``: [``LOCALIZER``, ...]}: no value of Image Type (0008,0008) in the list;
  missing: accept. A section without this rule still excludes ``LOCALIZER``.
- ``body_parts`` {``allow``: [``BRAIN``, ...], ``region_codes``: [{``value``, ``scheme``}]}: Body Part
  Examined (0018,0015) in ``allow`` or a code of Anatomic Region Sequence (0008,2218) in
  ``region_codes``; missing: accept (scanners often leave it empty, and a brain MR without it is still
  one).
- ``photometric`` {``allow``: [``MONOCHROME2``, ...]}: Photometric Interpretation; missing: reject.
- ``rows``, ``columns``, ``frames``, ``pixel_spacing_mm`` {``min``, ``max``}: Rows, Columns, Number of
  Frames (1 when absent), both values of Pixel Spacing (frame 0's functional groups for an enhanced
  instance); missing: reject for rows and columns, accept for pixel spacing.
- ``orientation`` {``allow``: [``axial``, ``sagittal``, ``coronal``], ``tolerance_deg``: 15}: the slice
  normal of Image Orientation (Patient) (frame 0) within the tolerance of the plane's axis; missing:
  accept.
- ``series_description`` {``include``: [regex, ...], ``exclude``: [regex, ...]}: Series Description
  matches one ``include`` pattern (when given) and no ``exclude`` pattern, case-insensitive; missing:
  accept. The description itself is never quoted in an outcome (it can name a patient's condition).

Each failed rule is a :class:`Failure`: the rule's name, what it expects and the value seen, which is
never patient data (a modality, a SOP class name, an image type, a number, a plane; a Series Description
is named, not quoted).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from retinaedge.runtime.errors import ConfigError, RetinaEdgeError

#: Plane -> the patient axis its slice normal runs along (LPS).
PLANES: dict[str, tuple[float, float, float]] = {
    "axial": (0.0, 0.0, 1.0),
    "sagittal": (1.0, 0.0, 0.0),
    "coronal": (0.0, 1.0, 0.0),
}
DEFAULT_EXCLUDED_IMAGE_TYPES = ("LOCALIZER",)
MISSING = ("accept", "reject")


@dataclass(frozen=True)
class Failure:
    """One failed rule: ``rule`` its name, ``expected`` what it allows, ``seen`` the value found (never
    patient data; ``missing`` when absent)."""

    rule: str
    expected: str
    seen: str

    def to_json(self) -> dict[str, str]:
        return {"rule": self.rule, "expected": self.expected, "seen": self.seen}

    def __str__(self) -> str:
        return f"{self.rule}: {self.seen} (expected {self.expected})"


class NotApplicableError(RetinaEdgeError):
    """The instance is outside the model's intended use (``failures``): stored and acknowledged by
    STOW-RS and C-STORE, answered 422 by ``/v1/detect``, never inferred."""

    type = "not-applicable"
    http_status = 422

    def __init__(self, model: str, failures: Sequence[Failure]) -> None:
        listed = "; ".join(str(f) for f in failures)
        super().__init__(f"outside the intended use of model {model!r}: {listed}")
        self.model = model
        self.failures = tuple(failures)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "model": self.model, "rules": [f.to_json() for f in self.failures]}

    def problem_members(self) -> dict[str, Any]:
        return {"model": self.model, "rules": [f.to_json() for f in self.failures]}


class NoModelError(NotApplicableError):
    """No model of several takes the instance: each one's refusal (``declined``); the first model's
    members stay, as with one model."""

    def __init__(self, declined: Sequence[NotApplicableError]) -> None:
        first = declined[0]
        super().__init__(first.model, first.failures)
        self.declined = tuple(declined)
        models = ", ".join(repr(d.model) for d in declined)
        self.args = (f"outside the intended use of every model ({models}): "
                     + " | ".join(f"{d.model}: " + "; ".join(str(f) for f in d.failures) for d in declined),)  # fmt: skip

    def problem_members(self) -> dict[str, Any]:
        return {**super().problem_members(), "models": [d.problem_members() for d in self.declined]}


@dataclass(frozen=True)
class Rule:
    """One rule of the section: ``name``, its JSON object ``spec`` (checked), ``missing`` policy."""

    name: str
    spec: Mapping[str, Any]
    missing: str

    def check(self, ds: Any) -> Failure | None:
        return _CHECKS[self.name](self, ds)


@dataclass(frozen=True)
class IntendedUse:
    """The manifest's ``intended_use`` section (module docstring): its rules by name, in order."""

    rules: tuple[Rule, ...] = field(default_factory=tuple)

    def check(self, ds: Any) -> list[Failure]:
        """The rules ``ds`` (a header; pixels are not needed) fails; empty when the model takes it."""
        return [f for r in self.rules if (f := r.check(ds)) is not None]

    def to_dict(self) -> dict[str, Any]:
        return {r.name: {**r.spec, "missing": r.missing} for r in self.rules}

    @classmethod
    def from_dict(cls, data: Any) -> IntendedUse:
        """From the manifest's object (or a file holding one); raises :class:`ConfigError` naming the
        rule and key that are wrong."""
        if not isinstance(data, Mapping):
            raise ConfigError('intended_use is an object of rules, e.g. {"modalities": {"allow": ["MR"]}}')
        unknown = sorted(set(data) - set(_KEYS))
        if unknown:
            raise ConfigError(f"intended_use: unknown rule(s) {unknown}; rules: {sorted(_KEYS)}")
        rules = []
        for name in _KEYS:  # a fixed order: outcomes list rules alike for every instance
            if name in data:
                rules.append(_rule(name, data[name]))
            elif name == "image_types":
                rules.append(Rule(name, {"exclude": list(DEFAULT_EXCLUDED_IMAGE_TYPES)}, "accept"))
        return cls(tuple(rules))


# -- parsing ------------------------------------------------------------------------------------------


def _strings(name: str, key: str, value: Any, upper: bool = True) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"intended_use.{name}.{key} must be a non-empty list of strings")
    return [v.upper() if upper else v for v in value]


def _number(name: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"intended_use.{name}.{key} must be a number")
    return float(value)


def _rule(name: str, spec: Any) -> Rule:
    keys, default_missing = _KEYS[name]
    if not isinstance(spec, Mapping):
        raise ConfigError(f"intended_use.{name} must be an object with {sorted(keys)} and optionally missing")
    unknown = sorted(set(spec) - set(keys) - {"missing"})
    if unknown:
        raise ConfigError(
            f"intended_use.{name}: unknown key(s) {unknown}; it takes {sorted(keys)} and missing"
        )
    missing = spec.get("missing", default_missing)
    if missing not in MISSING:
        raise ConfigError(f"intended_use.{name}.missing must be accept or reject, got {missing!r}")
    out: dict[str, Any] = {}
    if name in ("rows", "columns", "frames", "pixel_spacing_mm"):
        if not ({"min", "max"} & set(spec)):
            raise ConfigError(f"intended_use.{name} needs min, max or both")
        out = {k: _number(name, k, spec[k]) for k in ("min", "max") if k in spec}
        if "min" in out and "max" in out and out["min"] > out["max"]:
            raise ConfigError(f"intended_use.{name}: min {out['min']} is above max {out['max']}")
    elif name == "orientation":
        planes = _strings(name, "allow", spec.get("allow"), upper=False)
        bad = [p for p in planes if p not in PLANES]
        if bad:
            raise ConfigError(
                f"intended_use.orientation.allow: unknown plane(s) {bad}; planes: {list(PLANES)}"
            )
        tolerance = _number(name, "tolerance_deg", spec.get("tolerance_deg", 15.0))
        if not 0 < tolerance < 45:
            raise ConfigError("intended_use.orientation.tolerance_deg must be within (0, 45)")
        out = {"allow": planes, "tolerance_deg": tolerance}
    elif name == "series_description":
        for key in ("include", "exclude"):
            if key in spec:
                patterns = _strings(name, key, spec[key], upper=False)
                for p in patterns:
                    try:
                        re.compile(p)
                    except re.error as exc:
                        raise ConfigError(
                            f"intended_use.series_description.{key}: {p!r} is not a regex: {exc}"
                        ) from None
                out[key] = patterns
        if not out:
            raise ConfigError("intended_use.series_description needs include, exclude or both")
    elif name == "body_parts":
        if "allow" in spec:
            out["allow"] = _strings(name, "allow", spec["allow"])
        if "region_codes" in spec:
            codes = spec["region_codes"]
            if not isinstance(codes, list) or not all(
                isinstance(c, Mapping)
                and set(c) == {"value", "scheme"}
                and all(isinstance(v, str) for v in c.values())
                for c in codes
            ):
                raise ConfigError('intended_use.body_parts.region_codes is a list of {"value", "scheme"}')
            out["region_codes"] = [{"value": c["value"], "scheme": c["scheme"]} for c in codes]
        if not out:
            raise ConfigError("intended_use.body_parts needs allow, region_codes or both")
    else:
        key = next(iter(keys))
        out = {key: _strings(name, key, spec.get(key), upper=name != "sop_classes")}
    return Rule(name, out, str(missing))


# -- checking -----------------------------------------------------------------------------------------


def _text(ds: Any, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _absent(rule: Rule, expected: str) -> Failure | None:
    return Failure(rule.name, expected, "missing") if rule.missing == "reject" else None


def _check_allowed(keyword: str, rule: Rule, ds: Any) -> Failure | None:
    from pydicom.uid import UID

    allowed = rule.spec["allow"]
    uids = rule.name == "sop_classes"
    value = _text(ds, keyword)
    if value is not None and (value in allowed if uids else value.upper() in allowed):
        return None  # the common case: no message to put together
    expected = " or ".join(UID(u).name for u in allowed) if uids else " or ".join(allowed)
    if value is None:
        return _absent(rule, expected)
    if uids:
        return Failure(rule.name, expected, UID(value).name if UID(value).is_valid else "not a UID")
    return Failure(rule.name, expected, value.upper()[:64])


def _check_image_types(rule: Rule, ds: Any) -> Failure | None:
    excluded = rule.spec["exclude"]
    value = ds.get("ImageType")
    if value is None or not str(value).strip():
        return _absent(rule, f"none of {', '.join(excluded)}")
    from pydicom.multival import MultiValue

    values = [
        str(v).strip().upper() for v in (value if isinstance(value, (MultiValue, list, tuple)) else [value])
    ]
    hit = [v for v in values if v in excluded]
    return Failure(rule.name, f"none of {', '.join(excluded)}", "\\".join(hit)) if hit else None


def _check_body_parts(rule: Rule, ds: Any) -> Failure | None:
    allowed = rule.spec.get("allow", [])
    codes = {(c["value"], c["scheme"].upper()) for c in rule.spec.get("region_codes", [])}
    expected = " or ".join([*allowed, *(f"({v}, {s})" for v, s in sorted(codes))])
    part = _text(ds, "BodyPartExamined")
    seen_codes = [
        (str(item.get("CodeValue", "")), str(item.get("CodingSchemeDesignator", "")).upper())
        for item in ds.get("AnatomicRegionSequence", []) or []
    ]
    if part is None and not seen_codes:
        return _absent(rule, expected)
    if (part is not None and part.upper() in allowed) or any(c in codes for c in seen_codes):
        return None
    seen = [part.upper()[:64]] if part is not None else []
    seen += [f"({v}, {s})" for v, s in seen_codes]
    return Failure(rule.name, expected, ", ".join(seen))


def _range(rule: Rule, values: Sequence[float] | None, unit: str = "") -> Failure | None:
    lo, hi = rule.spec.get("min"), rule.spec.get("max")
    expected = " and ".join(
        part
        for part in (
            f">= {lo:g}{unit}" if lo is not None else "",
            f"<= {hi:g}{unit}" if hi is not None else "",
        )
        if part
    )
    if values is None:
        return _absent(rule, expected)
    for v in values:
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            return Failure(rule.name, expected, ", ".join(f"{x:g}{unit}" for x in values))
    return None


def _int_attribute(keyword: str, default: int | None = None) -> Callable[[Rule, Any], Failure | None]:
    def check(rule: Rule, ds: Any) -> Failure | None:
        value = ds.get(keyword, default)
        try:
            number = None if value is None or str(value).strip() == "" else [float(int(value))]
        except (TypeError, ValueError):
            number = None
        return _range(rule, number)

    return check


def _check_spacing(rule: Rule, ds: Any) -> Failure | None:
    from retinaedge.runtime.slices import ds_floats, frame_attribute

    spacing = ds_floats(frame_attribute(ds, 0, "PixelMeasuresSequence", "PixelSpacing"), 2)
    return _range(rule, spacing, " mm")


def _check_orientation(rule: Rule, ds: Any) -> Failure | None:
    from retinaedge.runtime.slices import ds_floats, frame_attribute

    allowed, tolerance = rule.spec["allow"], rule.spec["tolerance_deg"]
    expected = f"{' or '.join(allowed)} within {tolerance:g} degrees"
    iop = ds_floats(frame_attribute(ds, 0, "PlaneOrientationSequence", "ImageOrientationPatient"), 6)
    if iop is None:
        return _absent(rule, expected)
    row, col = iop[:3], iop[3:]
    normal = (
        row[1] * col[2] - row[2] * col[1],
        row[2] * col[0] - row[0] * col[2],
        row[0] * col[1] - row[1] * col[0],
    )
    size = math.sqrt(sum(n * n for n in normal))
    if size < 1e-6:
        return Failure(rule.name, expected, "degenerate orientation")
    angles = {
        plane: math.degrees(
            math.acos(min(1.0, abs(sum(n * a for n, a in zip(normal, axis, strict=True))) / size))
        )
        for plane, axis in PLANES.items()
    }
    nearest = min(angles, key=lambda p: angles[p])
    if any(angles[p] <= tolerance for p in allowed):
        return None
    if angles[nearest] <= tolerance:
        return Failure(rule.name, expected, nearest)
    return Failure(rule.name, expected, f"oblique ({angles[nearest]:.0f} degrees from {nearest})")


def _check_series_description(rule: Rule, ds: Any) -> Failure | None:
    include, exclude = rule.spec.get("include", []), rule.spec.get("exclude", [])
    expected = " and ".join(
        part
        for part in (
            f"matching one of {include}" if include else "",
            f"matching none of {exclude}" if exclude else "",
        )
        if part
    )
    value = _text(ds, "SeriesDescription")
    if value is None:
        return _absent(rule, expected)
    if include and not any(re.search(p, value, re.IGNORECASE) for p in include):
        return Failure(rule.name, expected, "the Series Description matches no include pattern")
    for p in exclude:
        if re.search(p, value, re.IGNORECASE):
            return Failure(rule.name, expected, f"the Series Description matches exclude pattern {p!r}")
    return None


#: Rule name -> (its keys, the default of ``missing``), in the order rules are checked and listed.
_KEYS: dict[str, tuple[tuple[str, ...], str]] = {
    "modalities": (("allow",), "reject"),
    "sop_classes": (("allow",), "reject"),
    "image_types": (("exclude",), "accept"),
    "body_parts": (("allow", "region_codes"), "accept"),
    "photometric": (("allow",), "reject"),
    "rows": (("min", "max"), "reject"),
    "columns": (("min", "max"), "reject"),
    "frames": (("min", "max"), "reject"),
    "pixel_spacing_mm": (("min", "max"), "accept"),
    "orientation": (("allow", "tolerance_deg"), "accept"),
    "series_description": (("include", "exclude"), "accept"),
}

_CHECKS: dict[str, Callable[[Rule, Any], Failure | None]] = {
    "modalities": lambda r, ds: _check_allowed("Modality", r, ds),
    "sop_classes": lambda r, ds: _check_allowed("SOPClassUID", r, ds),
    "image_types": _check_image_types,
    "body_parts": _check_body_parts,
    "photometric": lambda r, ds: _check_allowed("PhotometricInterpretation", r, ds),
    "rows": _int_attribute("Rows"),
    "columns": _int_attribute("Columns"),
    "frames": _int_attribute("NumberOfFrames", 1),
    "pixel_spacing_mm": _check_spacing,
    "orientation": _check_orientation,
    "series_description": _check_series_description,
}
