"""A pydicom Dataset that notes which elements a check reads, for tests that a memo's key holds every
element the memoised check depends on (runtime/intended_use_memo.py, runtime/pixel_layout.py)."""

from __future__ import annotations

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
