"""A memo key from elements as parsed: what lets a check that depends on a few header elements run once
per distinct set of their values (the slices of a series repeat them).

:func:`raw_key` reads the elements without converting them: each one's VR, raw bytes and encoding (little
endian, implicit VR) stand for its value, since pydicom's conversion is a function of those (and of the
character set, which pydicom converts as it parses and which is keyed by its value). An element that is
converted already, deferred (its value not read), a sequence or of VR UN gives no key: the caller then
runs its check as usual.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

#: Specific Character Set: pydicom converts it while parsing (the text of the others is read in it).
CHARSET = 0x00080005


def raw_key(ds: Any, tags: Sequence[int]) -> tuple[Any, ...] | None:
    """``(VR, bytes, little endian, implicit VR)`` of each of ``tags`` in ``ds`` (plain integers; None for
    one absent; the character set by its value), or None when one of them cannot be keyed (module
    docstring)."""
    from pydicom.dataelem import RawDataElement

    key: list[Any] = []
    for tag in tags:
        item = ds.get_item(tag, keep_deferred=True)
        if item is None:
            key.append(None)
        elif tag == CHARSET and not isinstance(item, RawDataElement):
            key.append(repr(item.value))
        elif not isinstance(item, RawDataElement) or item.value is None or item.VR in ("SQ", "UN"):
            return None  # converted, deferred, a sequence, or a VR read from the value
        else:
            key.append((item.VR, bytes(item.value), item.is_little_endian, item.is_implicit_VR))
    return tuple(key)
