"""Which detections of a stored result are *findings*: the one place that rule lives.

A stored detection carries ``"finding": true|false`` (the model's operating point,
:mod:`retinaedge.runtime.operating_point`); one stored without the key is a finding (a result kept by a
bundle without an operating point, or before the flag existed). Result documents and series linking
show and use findings only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def frame_findings(frame: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The findings of one frame of a stored result (``frames[i]`` of a ``/v1/detect`` body): its
    detections whose ``finding`` is true, or missing (module docstring), in their stored order."""
    return [d for d in frame.get("detections", ()) if d.get("finding", True) is not False]


def findings_by_frame(result: Mapping[str, Any]) -> dict[int, list[dict[str, Any]]]:
    """Frame index (0-based, the result's ``frames[].index``) -> its findings, for the frames that have
    any (:func:`frame_findings`), in frame order."""
    out: dict[int, list[dict[str, Any]]] = {}
    for frame in result.get("frames", ()):
        found = frame_findings(frame)
        if found:
            out[int(frame["index"])] = found
    return dict(sorted(out.items()))
