"""How a version on trial (shadow) agrees with the version it is compared against, instance by instance.

Each instance the active version processes while a shadow version is set is run by the shadow version
too; the two results are compared here (:func:`compare`) and counted, never returned, exported or kept as
the result. Frames agree when their boxes match one to one by the export's parity rule (same label, IoU
>= 0.99, score within 0.001: :func:`retinaedge.runtime.matching.match_detections`); a detection of the
active result left unmatched is *lost* by the shadow version, one of the shadow result left unmatched is
*gained*, both counted per class. Latency is each one's ``timings_ms.total``.

**One baseline per comparison.** A comparison counts against the version that produced the active result
(its ``model.sha256``), its *baseline*, never against "whichever is active now": an instance admitted
just before an activation and finished on the old version counts against the old one. When another
version is activated during a trial, the trial goes on against the new active version in a comparison of
its own; :meth:`ShadowReport.to_json` shows the comparison against the active version at the top level
and every baseline's under ``baselines`` (in the order first compared against; at most
:data:`MAX_BASELINES`, beyond which the oldest other than the active one goes).

**Bounded.** The counts are running totals (exact, whatever the trial's length); the latency percentiles
are over the last :data:`LATENCY_WINDOW` comparisons of each baseline. A report's state is a small JSON
object (:meth:`ShadowReport.state`), which :mod:`.record` writes as the snapshot of the trial's file.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, deque
from typing import Any

import numpy as np
from retinaedge.runtime.detections import ImageDetections
from retinaedge.runtime.matching import match_detections

log = logging.getLogger(__name__)

#: Comparisons whose latency the percentiles are computed over, per baseline (the most recent ones).
LATENCY_WINDOW = 1000
#: Baselines a report keeps (each activation during a trial adds one); beyond, the oldest goes.
MAX_BASELINES = 4

RULE = "same label, IoU >= 0.99, score within 0.001 (the export's parity rule)"


def _detections(frame: dict[str, Any]) -> ImageDetections:
    dets = frame.get("detections", [])
    return ImageDetections(
        boxes=np.array([d["box"] for d in dets], dtype=np.float32).reshape(-1, 4),
        scores=np.array([d["score"] for d in dets], dtype=np.float32),
        labels=np.array([d["class_id"] for d in dets], dtype=np.int64),
    )


def _percentile(values: deque[float], q: float) -> float | None:
    return round(float(np.percentile(list(values), q)), 3) if values else None


def baseline_of(active: dict[str, Any], default: str) -> str:
    """The version (first 12 hex digits of ``model.sha256``) that produced the ``/v1/detect`` body
    ``active``; ``default`` when the body does not say."""
    model = active.get("model")
    sha = model.get("sha256") if isinstance(model, dict) else None
    return str(sha)[:12] if sha else default


def compare(active: dict[str, Any], shadow: dict[str, Any] | None, baseline: str) -> dict[str, Any]:
    """The outcome of one instance: the two ``/v1/detect`` bodies (``shadow`` None: the shadow version
    failed on it) reduced to what the report counts (no detections, no UIDs): ``baseline``, ``failed``,
    ``frames``, ``agreeing``, ``gained`` and ``lost`` per class, both latencies."""
    outcome: dict[str, Any] = {"baseline": baseline, "failed": shadow is None}
    if shadow is None:
        return outcome
    gained: Counter[str] = Counter()
    lost: Counter[str] = Counter()
    frames = agreeing = 0
    ours = {f["index"]: f for f in active.get("frames", [])}
    theirs = {f["index"]: f for f in shadow.get("frames", [])}
    for index in sorted(set(ours) | set(theirs)):
        a = ours.get(index, {"detections": []})
        b = theirs.get(index, {"detections": []})
        report = match_detections(_detections(a), _detections(b))
        frames += 1
        if report.matched == report.reference == report.candidate:
            agreeing += 1
        labels = {d["class_id"]: d["label"] for d in (*a["detections"], *b["detections"])}
        for d in report.unmatched_reference:
            lost[labels.get(d["label"], str(d["label"]))] += 1
        for d in report.unmatched_candidate:
            gained[labels.get(d["label"], str(d["label"]))] += 1
    outcome.update(
        frames=frames,
        agreeing=agreeing,
        gained=dict(gained),
        lost=dict(lost),
        active_ms=float(active.get("timings_ms", {}).get("total", 0.0)),
        shadow_ms=float(shadow.get("timings_ms", {}).get("total", 0.0)),
    )
    return outcome


class Tally:
    """The running comparison of the trial version with one baseline version."""

    def __init__(self, baseline: str) -> None:
        self.baseline = baseline
        self.instances = 0
        self.frames = 0
        self.frames_agreeing = 0
        self.failed = 0  # instances the shadow version could not process (the baseline could)
        self.gained: Counter[str] = Counter()
        self.lost: Counter[str] = Counter()
        self.active_ms: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.shadow_ms: deque[float] = deque(maxlen=LATENCY_WINDOW)

    def count(self, outcome: dict[str, Any]) -> None:
        self.instances += 1
        if outcome.get("failed"):
            self.failed += 1
            return
        self.frames += int(outcome["frames"])
        self.frames_agreeing += int(outcome["agreeing"])
        self.gained.update(outcome.get("gained", {}))
        self.lost.update(outcome.get("lost", {}))
        self.active_ms.append(float(outcome["active_ms"]))
        self.shadow_ms.append(float(outcome["shadow_ms"]))

    def to_json(self) -> dict[str, Any]:
        return {
            "active": self.baseline,
            "instances": self.instances,
            "failed": self.failed,
            "frames": self.frames,
            "frames_agreeing": self.frames_agreeing,
            "agreement": round(self.frames_agreeing / self.frames, 6) if self.frames else None,
            "gained_per_class": dict(self.gained),
            "lost_per_class": dict(self.lost),
            "latency_ms": {
                "active_p50": _percentile(self.active_ms, 50),
                "shadow_p50": _percentile(self.shadow_ms, 50),
                "active_p99": _percentile(self.active_ms, 99),
                "shadow_p99": _percentile(self.shadow_ms, 99),
                "window": len(self.active_ms),
            },
        }

    def state(self) -> dict[str, Any]:
        """Everything needed to rebuild this tally (:meth:`restore`)."""
        return {
            "baseline": self.baseline, "instances": self.instances, "failed": self.failed,
            "frames": self.frames, "frames_agreeing": self.frames_agreeing, "gained": dict(self.gained),
            "lost": dict(self.lost), "active_ms": list(self.active_ms), "shadow_ms": list(self.shadow_ms),
        }  # fmt: skip

    @classmethod
    def restore(cls, state: dict[str, Any]) -> Tally:
        tally = cls(str(state["baseline"]))
        tally.instances, tally.failed = int(state["instances"]), int(state["failed"])
        tally.frames, tally.frames_agreeing = int(state["frames"]), int(state["frames_agreeing"])
        tally.gained.update(state.get("gained", {}))
        tally.lost.update(state.get("lost", {}))
        tally.active_ms.extend(float(v) for v in state.get("active_ms", []))
        tally.shadow_ms.extend(float(v) for v in state.get("shadow_ms", []))
        return tally


class ShadowReport:
    """The trial of ``version``: one :class:`Tally` per baseline, ``active`` the version it is compared
    against now (module docstring). Thread-safe."""

    def __init__(self, version: str, active: str) -> None:
        self.version = version
        self.active = active
        self._lock = threading.Lock()
        self._tallies: dict[str, Tally] = {}

    def rebase(self, active: str) -> None:
        """Another version is active: later comparisons are against it (earlier ones stay apart)."""
        with self._lock:
            self.active = active

    def add(self, active: dict[str, Any], shadow: dict[str, Any] | None) -> dict[str, Any]:
        """Compare and count one instance (the two ``/v1/detect`` bodies; ``shadow`` None: it failed);
        returns the outcome counted."""
        outcome = compare(active, shadow, baseline_of(active, self.active))
        self.count(outcome)
        return outcome

    def count(self, outcome: dict[str, Any]) -> None:
        """Count one outcome of :func:`compare` against its own baseline."""
        with self._lock:
            baseline = str(outcome["baseline"])
            tally = self._tallies.get(baseline)
            if tally is None:
                tally = self._tallies[baseline] = Tally(baseline)
            tally.count(outcome)
            while len(self._tallies) > MAX_BASELINES:
                gone = next(b for b in self._tallies if b not in (baseline, self.active))
                del self._tallies[gone]
                log.info("trial of %s: the comparison against %s is dropped (more than %d baselines)",
                         self.version, gone, MAX_BASELINES)  # fmt: skip

    def state(self) -> dict[str, Any]:
        """The report as a JSON object (:meth:`restore` rebuilds it): small, whatever the trial's length."""
        with self._lock:
            return {"version": self.version, "active": self.active,
                    "tallies": [t.state() for t in self._tallies.values()]}  # fmt: skip

    def restore(self, state: dict[str, Any]) -> None:
        """Replace the counts with those of ``state`` (the same trial's; its ``active`` is not taken: the
        active version is the one serving now)."""
        with self._lock:
            self._tallies = {t["baseline"]: Tally.restore(t) for t in state.get("tallies", [])}

    def to_json(self) -> dict[str, Any]:
        """The comparison against the active version at the top level, every baseline's in ``baselines``
        (in the order first compared against)."""
        with self._lock:
            current = self._tallies.get(self.active) or Tally(self.active)
            return {
                "version": self.version,
                **current.to_json(),
                "rule": RULE,
                "baselines": [t.to_json() for t in self._tallies.values()],
            }
