"""A model's life on the appliance: staging a version, checking it, the silent trial, activation, rollback.

One :class:`Lifecycle` per lane (:mod:`.lanes`), over its :class:`~.versions.registry.ModelVersions`:

- **stage** (:meth:`Lifecycle.stage`): a bundle directory (unpacked from an uploaded archive, or named on
  the device) is copied in as a version, its signature checked when ``trusted_keys`` is set. It is then
  *checked* in the background: a worker of its own loads it exactly as serving would (backend choice,
  engine build or cache, the golden self-test, the bundle's parity golden) and stops. Only a version
  whose check passed is activated or trialled.
- **shadow** (:meth:`Lifecycle.set_shadow`): a checked version runs beside the active one on the same
  instances; its results are compared (:mod:`.versions.shadow`) with the version that produced the active
  result (an activation during the trial starts a comparison of its own against the new version), counted
  in ``shadow.jsonl`` under the model's directory (bounded, replayed into the report at start:
  :mod:`.versions.record`), and never returned, exported or kept as the result.
- **activate** and **rollback** (:meth:`Lifecycle.activate`): a worker for the new version is started
  and warmed while the old one serves; once it is ready, the lane points at it (later instances run on
  it), the old worker finishes what it admitted and stops. No request fails: one submitted before the
  switch finishes on the old version, its result attributed to it (``model.sha256``). The registry
  records the active version first, so a SIGKILL during a switch restarts on the version last activated.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from retinaedge.runtime.bundle import MANIFEST_FILE, Bundle
from retinaedge.runtime.errors import (
    BundleError,
    BundleRejectedError,
    ConflictError,
    NotFoundError,
    NotReadyError,
    OverloadedError,
)
from retinaedge.runtime.manifest import Manifest
from retinaedge.runtime.signing import SignatureError, TrustedKey
from retinaedge.service.lanes import Lane
from retinaedge.service.pipeline.opener import DetectorOpener
from retinaedge.service.pipeline.stages import InferenceWorker
from retinaedge.service.versions.record import TrialRecord
from retinaedge.service.versions.registry import ModelVersions, version_of
from retinaedge.service.versions.shadow import ShadowReport, baseline_of, compare

log = logging.getLogger(__name__)

SHADOW_FILE = "shadow.jsonl"
READY_TIMEOUT_S = 1800.0  # an engine build on a Jetson takes minutes
DRAIN_TIMEOUT_S = 120.0
MAX_TRIALS_IN_FLIGHT = 8


class Shadow:
    """The version on trial: its bundle, worker, report and the report's record."""

    def __init__(self, version: str, bundle: Bundle, worker: InferenceWorker, record: TrialRecord) -> None:
        self.version = version
        self.bundle = bundle
        self.worker = worker
        self.record = record
        self.report = record.report


class Lifecycle:
    """The versions of one lane's model (module docstring). ``make_worker(bundle)`` builds an unstarted
    worker for a bundle (its opener attached); ``trusted`` the keys a staged bundle must be signed by."""

    def __init__(
        self,
        lane: Lane,
        versions: ModelVersions,
        make_worker: Callable[[Bundle], tuple[DetectorOpener, InferenceWorker]],
        trusted: list[TrustedKey] | None,
    ) -> None:
        self.lane = lane
        self.versions = versions
        self.make_worker = make_worker
        self.trusted = trusted
        self.checks: dict[str, dict[str, Any]] = {}  # version -> {"state", "reason"}
        self.shadow: Shadow | None = None
        self._shadow_opener: DetectorOpener | None = None
        self._switch = threading.Lock()  # one activation, rollback or trial change at a time
        self._shadow_file = versions.root / SHADOW_FILE
        self._trials: set[asyncio.Task[None]] = set()
        self.checks.update(versions.checks())  # checked before this start, on this device
        lane.lookup = self._manifest_of
        self.checks[version_of(lane.bundle)] = {"state": "ready", "reason": "serving"}

    # -- reading ----------------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        listed = self.versions.describe()
        for v in listed["versions"]:
            v["check"] = self.checks.get(
                v["version"], {"state": "unchecked", "reason": "not checked since start"}
            )
        return listed

    def _manifest_of(self, sha256: str) -> Manifest | None:
        """The manifest of a kept version, by its full sha256 (None when not kept or not that version)."""
        try:
            path = self.versions.path(sha256[:12])
            manifest = Manifest.from_json((path / MANIFEST_FILE).read_text())
        except (NotFoundError, OSError, ValueError, BundleError):
            return None
        return manifest if str(manifest.model_sha256) == sha256 else None

    # -- staging ----------------------------------------------------------------------------------------
    def stage(self, source: Path, move: bool = False) -> str:
        """Copy ``source`` in as a version (with ``move``, move its files: an unpacked upload; refusals:
        :class:`BundleRejectedError`) and check it in the background; returns the version."""
        try:
            version, bundle = self.versions.stage(source, self.trusted, move=move)
        except SignatureError as exc:
            raise BundleRejectedError(str(exc), "signature-rejected") from exc
        except BundleError as exc:
            raise BundleRejectedError(str(exc)) from exc
        if self.checks.get(version, {}).get("state") not in ("ready", "checking"):
            self.checks[version] = {"state": "checking", "reason": "loading and self-testing"}
            threading.Thread(
                target=self._check, args=(version, bundle), name=f"retinaedge-check-{version}", daemon=True
            ).start()
        return version

    def _check(self, version: str, bundle: Bundle) -> None:
        """Load ``bundle`` as serving would (self-test included) on a worker of its own, then stop it."""
        try:
            opener, worker = self.make_worker(bundle)
            worker.start()
            ready = worker.wait_ready(READY_TIMEOUT_S)
            reason = "self-test passed" if ready else worker.reason
            opener.stop()
            worker.stop()
        except Exception as exc:  # recorded as a failed check; staging it again checks it again
            ready, reason = False, f"the check could not run ({type(exc).__name__}: {exc})"
        self.checks[version] = {"state": "ready" if ready else "failed", "reason": reason}
        self.versions.record_check(version, "ready" if ready else "failed", reason)
        log.info("model %s: version %s checked: %s", self.lane.name, version, reason)

    def _checked(self, version: str) -> Bundle:
        self.versions.get(version)  # 404 for a version never staged
        check = self.checks.get(version, {})
        if check.get("state") != "ready":
            raise ConflictError(
                f"version {version} is not checked ({check.get('state', 'unchecked')}: "
                f"{check.get('reason', 'stage it first')})"
            )
        return self._load(version)

    def _load(self, version: str) -> Bundle:
        """``version``'s bundle, still that version (409 when changed in place), signature checked."""
        try:
            return self.versions.load_version(version, self.trusted)
        except SignatureError as exc:
            raise BundleRejectedError(str(exc), "signature-rejected") from exc
        except BundleError as exc:
            raise ConflictError(str(exc)) from exc

    # -- switching --------------------------------------------------------------------------------------
    def _exclusive(self) -> None:
        """Take the switch lock at once, or 409: one activation, rollback or trial change at a time (a
        second request does not wait behind a warm-up of minutes)."""
        if not self._switch.acquire(blocking=False):
            raise ConflictError(f"model {self.lane.name}: a switch or trial change is under way; try again")

    def activate(self, version: str) -> dict[str, Any]:
        """Make ``version`` active (blocking: run it in a thread); returns what happened."""
        self._exclusive()
        try:
            if version == self.versions.active:
                return {"active": version, "changed": False}
            bundle = self._checked(version)
            return self._switch_to(version, bundle, lambda: self.versions.activate(version))
        finally:
            self._switch.release()

    def rollback(self) -> dict[str, Any]:
        """Make the previously active version active again."""
        self._exclusive()
        try:
            version = self.versions.previous()
            return self._switch_to(version, self._load(version), self.versions.rollback)
        finally:
            self._switch.release()

    def _switch_to(self, version: str, bundle: Bundle, record: Callable[[], object]) -> dict[str, Any]:
        started = time.monotonic()
        opener, worker = self.make_worker(bundle)
        worker.start()
        if not worker.wait_ready(READY_TIMEOUT_S):
            reason = worker.reason
            opener.stop()
            worker.stop()
            raise ConflictError(
                f"version {version} did not become ready ({reason}); the active one serves on"
            )
        old_version = version_of(self.lane.bundle)
        try:
            record()  # first: a SIGKILL from here on restarts on the new version
        except BaseException:  # not recorded (a full disk): the new worker goes, the old one serves on
            opener.stop()
            worker.stop()
            raise
        if self.shadow is not None and self.shadow.version == version:
            self._end_shadow()  # the trialled version is live: its trial ends, and its record
        elif self.shadow is not None:  # the trial goes on, compared with the new version from now on
            self.shadow.report.rebase(version)
        old_opener, old_worker = self.lane.swap(bundle, opener, worker)
        switched = time.monotonic()
        self.checks[version] = {"state": "ready", "reason": "serving"}
        self._drain(old_opener, old_worker)
        log.info("model %s: version %s active (was %s)", self.lane.name, version, old_version)
        return {
            "active": version,
            "previous": old_version,
            "changed": True,
            "warm_up_s": round(switched - started, 3),
            "drained_s": round(time.monotonic() - switched, 3),
        }

    @staticmethod
    def _drain(opener: DetectorOpener, worker: InferenceWorker) -> None:
        """Let ``worker`` finish what it admitted (callers that read the lane just before the switch may
        still submit for a moment), then stop it."""
        time.sleep(0.2)
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while worker.depth and time.monotonic() < deadline:
            time.sleep(0.05)
        opener.stop()
        worker.stop()

    # -- the silent trial -------------------------------------------------------------------------------
    def set_shadow(self, version: str | None) -> dict[str, Any]:
        """Start the trial of ``version`` (None: end it)."""
        self._exclusive()
        try:
            if version is None:
                self.versions.set_shadow(None)
                self._end_shadow()  # the trial's record goes with it
                return {"shadow": None}
            bundle = self._checked(version)
            self.versions.set_shadow(version)
            self._start_shadow(version, bundle)
            return {"shadow": version}
        finally:
            self._switch.release()

    def resume_shadow(self) -> None:
        """At start: the trial recorded in the registry runs again, its report replayed from its file."""
        version = self.versions.shadow
        if version is None:
            return
        try:
            bundle = self.versions.load_version(version, self.trusted)
        except BundleError as exc:
            log.error("model %s: the trial of version %s cannot resume: %s", self.lane.name, version, exc)
            self.versions.set_shadow(None)
            return
        self._start_shadow(version, bundle, replay=True)

    def _start_shadow(self, version: str, bundle: Bundle, replay: bool = False) -> None:
        if self.shadow is not None:
            self._end_shadow()  # another version was on trial: its trial ends, and its record
        opener, worker = self.make_worker(bundle)
        worker.start()
        if not replay and not worker.wait_ready(READY_TIMEOUT_S):  # every instance from now on is trialled
            reason = worker.reason
            opener.stop()
            worker.stop()
            self.versions.set_shadow(None)
            raise ConflictError(f"version {version} did not become ready for its trial ({reason})")
        record = TrialRecord(self._shadow_file, ShadowReport(version, version_of(self.lane.bundle)))
        record.start(replay)
        self.shadow = Shadow(version, bundle, worker, record)
        self._shadow_opener = opener

    def _stop_shadow(self) -> None:
        shadow, self.shadow = self.shadow, None
        if shadow is not None:
            if self._shadow_opener is not None:
                self._shadow_opener.stop()
            shadow.worker.stop()

    def _end_shadow(self) -> None:
        """Stop the trial and remove its record."""
        shadow = self.shadow
        self._stop_shadow()
        if shadow is not None:
            shadow.record.remove()
        else:
            self._shadow_file.unlink(missing_ok=True)

    async def observe(self, source: bytes | Path, active: dict[str, Any]) -> None:
        """Run the trial version on an instance the active one has just processed (``active`` its body);
        counted in the report and appended to its file, never returned or kept as the result."""
        shadow = self.shadow
        if shadow is None or active.get("model", {}).get("sha256") == str(
            shadow.bundle.manifest.model_sha256
        ):
            return
        body: dict[str, Any] | None
        try:
            result = await asyncio.wrap_future(shadow.worker.submit(source))
            body = result.to_json()
        except (NotReadyError, OverloadedError):
            return  # the trial is loading, ended or behind: not counted
        except Exception as exc:  # counted as failed by the trial version
            log.info("model %s: trial version %s failed on an instance (%s)", self.lane.name, shadow.version,
                     type(exc).__name__)  # fmt: skip
            body = None
        if self.shadow is not shadow:
            return
        baseline = baseline_of(active, shadow.report.active)  # the version that produced ``active``
        await asyncio.to_thread(lambda: shadow.record.record(compare(active, body, baseline)))

    def observe_soon(self, source: bytes, active: dict[str, Any]) -> None:
        """:meth:`observe` in the background (a ``/v1/detect`` answer does not wait for the trial); at most
        :data:`MAX_TRIALS_IN_FLIGHT` at once, beyond which an instance is not trialled."""
        if self.shadow is None or len(self._trials) >= MAX_TRIALS_IN_FLIGHT:
            return
        task = asyncio.get_running_loop().create_task(self.observe(source, active))
        self._trials.add(task)
        task.add_done_callback(self._trials.discard)

    def report(self) -> dict[str, Any]:
        shadow = self.shadow
        if shadow is None:
            return {"shadow": None, "active": self.versions.active}
        return {**shadow.report.to_json(), "state": shadow.worker.state, "reason": shadow.worker.reason}

    def stop(self) -> None:
        self._stop_shadow()
