"""DICOM UID values (PS3.5 §9.1): at most 64 characters, digits in components separated by dots.

Every identifier the appliance takes from a client (an instance's SOP, study and series UIDs, a UID in a
URL) passes :func:`check_uid`: it names spool files and database rows and comes back in URLs, so
``../../etc/passwd``, a NUL byte or 10,000 characters are refused as bad input. The messages describe
what is wrong without repeating the value (a UID can identify a patient's study).
"""

from __future__ import annotations

import re

from retinaedge.runtime.errors import MalformedDicomError

MAX_UID_LENGTH = 64
_UID = re.compile(r"[0-9]+(?:\.[0-9]+)*")


def uid_problem(value: str) -> str | None:
    """What makes ``value`` not a UID, or None when it is one."""
    if not value:
        return "is empty"
    if len(value) > MAX_UID_LENGTH:
        return f"has {len(value)} characters (at most {MAX_UID_LENGTH})"
    if _UID.fullmatch(value) is None:
        if any(not (c.isascii() and (c.isdigit() or c == ".")) for c in value):
            return "contains characters other than digits and dots"
        return "has an empty component (two dots in a row, or a dot at either end)"
    return None


def check_uid(value: str, what: str) -> str:
    """``value`` when it is a UID; else :class:`MalformedDicomError` saying ``what`` is wrong (PS3.5 9.1)."""
    problem = uid_problem(value)
    if problem is not None:
        raise MalformedDicomError(f"{what} {problem}: not a DICOM UID (PS3.5 9.1)")
    return value
