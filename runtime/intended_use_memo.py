"""The intended-use check of a model, once per distinct set of the elements its rules read.

The slices of a series repeat every element the rules of :mod:`.intended_use` look at (modality, SOP
class, image type, body part, photometric, rows, columns, frames, pixel spacing, orientation, series
description). :class:`CheckMemo` keys an instance by those elements' raw bytes as parsed (and their VR
and encoding, with the character set), runs the rules only for a key it has not seen, and gives the
outcome it found then. The rules are functions of these elements alone, so the outcome is the same; a
test records every element the rules read and checks that each is in :data:`RULE_TAGS`.

Anything the key cannot stand for takes the rules as before: an element already converted, deferred,
or a sequence (anatomic region, functional groups: their items would have to be walked). The memo holds
no patient data (none of these elements names the patient) and at most ``size`` outcomes (it is emptied
when full).
"""

from __future__ import annotations

import threading
from typing import Any

from retinaedge.runtime.intended_use import Failure, IntendedUse
from retinaedge.runtime.rawkey import raw_key

#: Every element a rule reads (tags as plain integers), and the character set their text is read in.
RULE_TAGS = (
    0x00080005,  # Specific Character Set
    0x00080008,  # Image Type
    0x00080016,  # SOP Class UID
    0x00080060,  # Modality
    0x0008103E,  # Series Description
    0x00082218,  # Anatomic Region Sequence
    0x00180015,  # Body Part Examined
    0x00200037,  # Image Orientation (Patient)
    0x00280004,  # Photometric Interpretation
    0x00280008,  # Number of Frames
    0x00280010,  # Rows
    0x00280011,  # Columns
    0x00280030,  # Pixel Spacing
    0x52009229,  # Shared Functional Groups Sequence
    0x52009230,  # Per-frame Functional Groups Sequence
)
#: The sequences among them: Anatomic Region, Shared and Per-frame Functional Groups.
_SEQUENCES = (0x00082218, 0x52009229, 0x52009230)


class CheckMemo:
    """``check(ds)`` as ``use.check(ds)`` (module docstring). Thread-safe."""

    def __init__(self, use: IntendedUse, size: int = 256) -> None:
        self.use = use
        self.size = size
        self._seen: dict[tuple[Any, ...], tuple[Failure, ...]] = {}
        self._lock = threading.Lock()
        self.hits = 0

    def check(self, ds: Any) -> list[Failure]:
        """The rules ``ds`` fails (a parsed header; empty when the model takes it)."""
        key = memo_key(ds)
        if key is None:
            return self.use.check(ds)
        with self._lock:
            known = self._seen.get(key)
            if known is not None:
                self.hits += 1
                return list(known)
        failures = self.use.check(ds)
        with self._lock:
            if len(self._seen) >= self.size:
                self._seen.clear()
            self._seen[key] = tuple(failures)
        return failures


def memo_key(ds: Any) -> tuple[Any, ...] | None:
    """:func:`~.rawkey.raw_key` of :data:`RULE_TAGS`; None also when a sequence the rules read is present
    (their items would have to be keyed: the rules run)."""
    for tag in _SEQUENCES:
        if ds.get_item(tag, keep_deferred=True) is not None:
            return None
    return raw_key(ds, RULE_TAGS)
