"""A pydicom Dataset that notes which elements a check reads, for tests that a memo's key holds every
element the memoised check depends on (runtime/intended_use_memo.py, runtime/pixel_layout.py), and
variants of a file to feed them."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import pydicom
from pydicom.datadict import tag_for_keyword


class RecordingDataset(pydicom.Dataset):
    """A copy of a dataset that notes in ``asked`` every element asked for, by tag, keyword, membership or
    ``get_item``, present or not (integer tags)."""

    def __init__(self, ds: pydicom.Dataset) -> None:
        super().__init__(ds)
        object.__setattr__(self, "asked", set())

    def _note(self, key: Any) -> None:
        tag = tag_for_keyword(key) if isinstance(key, str) else key
        if tag is not None:
            self.asked.add(int(tag))

    def __getitem__(self, key: Any) -> Any:
        self._note(key)
        return super().__getitem__(key)

    def __getattr__(self, name: str) -> Any:
        self._note(name)
        return super().__getattr__(name)

    def __contains__(self, key: Any) -> bool:
        self._note(key)
        return super().__contains__(key)

    def get_item(self, key: Any, *, keep_deferred: bool = False) -> Any:
        self._note(key)
        return super().get_item(key, keep_deferred=keep_deferred)


def variant(source: Path, **changes: object) -> bytes:
    """``source`` read and written again as a Part 10 file with ``changes`` (keyword -> value; None deletes
    the element), for a check's memo to see another set of elements."""
    ds = pydicom.dcmread(source)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for keyword, value in changes.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
