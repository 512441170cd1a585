"""How a version on trial (shadow) agrees with the active one, instance by instance.

Each instance the active version processes while a shadow version is set is run by the shadow version
too; its result is compared here and counted, never returned, exported or kept as the result. Frames
agree when their boxes match one to one by the export's parity rule (same label, IoU >= 0.99, score
within 0.001: :func:`retinaedge.runtime.matching.match_detections`); a detection of the active result
left unmatched is *lost* by the shadow version, one of the shadow result left unmatched is *gained*,
both counted per class. Latency is each one's ``timings_ms.total``. The counts live in memory and start
again when the shadow version changes (or the service restarts); ``GET /v1/models/{name}/shadow`` shows
them.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import numpy as np
from retinaedge.runtime.detections import ImageDetections
from retinaedge.runtime.matching import match_detections


def _detections(frame: dict[str, Any]) -> ImageDetections:
    dets = frame.get("detections", [])
    return ImageDetections(
        boxes=np.array([d["box"] for d in dets], dtype=np.float32).reshape(-1, 4),
        scores=np.array([d["score"] for d in dets], dtype=np.float32),
        labels=np.array([d["class_id"] for d in dets], dtype=np.int64),
    )


def _percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if values else None


class ShadowReport:
    """The running comparison of one shadow version with the active one (module docstring)."""

    def __init__(self, version: str, active: str) -> None:
        self.version = version
        self.active = active
        self._lock = threading.Lock()
        self.instances = 0
        self.frames = 0
        self.frames_agreeing = 0
        self.failed = 0  # instances the shadow version could not process (the active one could)
        self.gained: Counter[str] = Counter()
        self.lost: Counter[str] = Counter()
        self.active_ms: list[float] = []
        self.shadow_ms: list[float] = []

    def add(self, active: dict[str, Any], shadow: dict[str, Any] | None) -> None:
        """Count one instance: the two ``/v1/detect`` bodies (``shadow`` None: it failed)."""
        with self._lock:
            self.instances += 1
            if shadow is None:
                self.failed += 1
                return
            self.active_ms.append(float(active.get("timings_ms", {}).get("total", 0.0)))
            self.shadow_ms.append(float(shadow.get("timings_ms", {}).get("total", 0.0)))
            ours = {f["index"]: f for f in active.get("frames", [])}
            theirs = {f["index"]: f for f in shadow.get("frames", [])}
            for index in sorted(set(ours) | set(theirs)):
                a = ours.get(index, {"detections": []})
                b = theirs.get(index, {"detections": []})
                report = match_detections(_detections(a), _detections(b))
                self.frames += 1
                if report.matched == report.reference == report.candidate:
                    self.frames_agreeing += 1
                labels = {d["class_id"]: d["label"] for d in (*a["detections"], *b["detections"])}
                for d in report.unmatched_reference:
                    self.lost[labels.get(d["label"], str(d["label"]))] += 1
                for d in report.unmatched_candidate:
                    self.gained[labels.get(d["label"], str(d["label"]))] += 1

    def to_json(self) -> dict[str, Any]:
        with self._lock:
            return {
                "version": self.version,
                "active": self.active,
                "instances": self.instances,
                "failed": self.failed,
                "frames": self.frames,
                "frames_agreeing": self.frames_agreeing,
                "agreement": round(self.frames_agreeing / self.frames, 6) if self.frames else None,
                "rule": "same label, IoU >= 0.99, score within 0.001 (the export's parity rule)",
                "gained_per_class": dict(self.gained),
                "lost_per_class": dict(self.lost),
                "latency_ms": {
                    "active_p50": _percentile(self.active_ms, 50),
                    "shadow_p50": _percentile(self.shadow_ms, 50),
                    "active_p99": _percentile(self.active_ms, 99),
                    "shadow_p99": _percentile(self.shadow_ms, 99),
                },
            }
