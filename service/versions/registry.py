"""The versions of one model under ``<data_dir>/models/<name>/`` and which of them is active.

A version is a bundle, named by the first 12 hex digits of its ``model.onnx`` sha256 (what every result
records in ``model.sha256``). The bundle the settings name is a version too (kept where it is, by
path); a staged one is copied under ``versions/<version>/``, signature checked first when trusted keys
are configured. ``state.json`` records the versions, the active one, the ones active before it (for
``rollback``) and the one on trial (``shadow``); it is replaced atomically (temporary file, fsync,
rename), so a SIGKILL leaves the state before or after a step, never between.

At start (:meth:`ModelVersions.seed`) the settings' bundle becomes the active version the first time,
and again whenever the settings name another bundle than at the last start (the site changed the setting
on purpose; logged); otherwise the version activated last stays active. The settings' version is never
forgotten, so an unchanged setting never takes over from the version activated since.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retinaedge.runtime.bundle import Bundle, load_bundle
from retinaedge.runtime.durable import fsync_path
from retinaedge.runtime.errors import BundleError, ConflictError, NotFoundError
from retinaedge.runtime.signing import TrustedKey

log = logging.getLogger(__name__)

MODELS = "models"  # under data_dir: a folder per model
STATE_FILE = "state.json"
UPLOADS = ".uploads"  # under <data_dir>/models: archives being received (removed at start)
VERSIONS = "versions"


def version_of(bundle: Bundle) -> str:
    """The version id of a bundle: its model's sha256, first 12 hex digits."""
    return str(bundle.manifest.model_sha256)[:12]


@dataclass(frozen=True)
class Version:
    """One version: ``path`` its bundle directory, ``source`` how it came (``settings``, ``staged``)."""

    version: str
    sha256: str
    path: str
    source: str
    added_at: float

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "sha256": self.sha256, "path": self.path, "source": self.source,
                "added_at": self.added_at}  # fmt: skip


def _version(entry: dict[str, Any]) -> Version:
    return Version(**{k: entry[k] for k in ("version", "sha256", "path", "source", "added_at")})


class ModelVersions:
    """The versions of model ``name`` under ``root`` (module docstring); thread-safe."""

    def __init__(self, root: Path, name: str, keep: int = 3) -> None:
        self.root = root
        self.name = name
        self.keep = max(2, keep)  # the active one and at least one to roll back to
        self._lock = threading.Lock()
        self._staging = threading.Lock()
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        for debris in (root / VERSIONS).glob(".staging-*"):  # copies a crash interrupted
            shutil.rmtree(debris, ignore_errors=True)
        shutil.rmtree(root.parent / UPLOADS, ignore_errors=True)  # uploads a crash interrupted
        self._state = self._read()

    # -- state ------------------------------------------------------------------------------------------
    def _read(self) -> dict[str, Any]:
        path = self.root / STATE_FILE
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            return {"active": None, "history": [], "shadow": None, "versions": {}, "settings_version": None}
        except (OSError, ValueError) as exc:
            raise BundleError(f"model {self.name}: {path} cannot be read ({type(exc).__name__})") from exc
        return dict(state)

    def _write(self) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".state-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(self._state, fh, indent=1, sort_keys=True)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.root / STATE_FILE)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        fsync_path(self.root)

    @property
    def active(self) -> str | None:
        return self._state.get("active")

    @property
    def shadow(self) -> str | None:
        return self._state.get("shadow")

    def versions(self) -> list[Version]:
        with self._lock:
            return [_version(v) for v in self._state["versions"].values()]

    def get(self, version: str) -> Version:
        """One version (404 ``not-found`` naming those known)."""
        with self._lock:
            found = self._state["versions"].get(version)
            if found is None:
                known = ", ".join(self._state["versions"]) or "none"
                raise NotFoundError(f"model {self.name} has no version {version!r} (versions: {known})")
            return _version(found)

    def describe(self) -> dict[str, Any]:
        with self._lock:
            return {
                "active": self._state["active"],
                "previous": list(self._state["history"][-1:]),
                "shadow": self._state["shadow"],
                "versions": [dict(v) for v in self._state["versions"].values()],
            }

    # -- changes ----------------------------------------------------------------------------------------
    def seed(self, path: Path, bundle: Bundle) -> str:
        """The settings' bundle at start: recorded, and made active when the settings name another bundle
        than at the last start (the site changed it on purpose; logged); otherwise the version activated
        last stays active. Returns the version to serve."""
        version = version_of(bundle)
        with self._lock:
            changed = version != self._state.get("settings_version")
            if version not in self._state["versions"]:
                self._add(version, bundle, str(path.resolve()), "settings")
            self._state["settings_version"] = version
            if changed or self._state["active"] is None:
                if self._state["active"] not in (None, version):
                    log.warning("model %s: the settings name another bundle (version %s) than at the last "
                                "start: it replaces the active version %s", self.name, version,
                                self._state["active"])  # fmt: skip
                self._set_active(version)
                log.info("model %s: version %s (the settings' bundle) is active", self.name, version)
            gone = self._trim(version)
            self._write()
        _remove(gone)
        return str(self._state["active"])

    def load_version(self, version: str, trusted: Sequence[TrustedKey] | None) -> Bundle:
        """The bundle of ``version``, signature checked with ``trusted``; BundleError when its files are no
        longer that version (a settings bundle changed in place)."""
        path = self.path(version)
        bundle = load_bundle(path, trusted=trusted)
        if version_of(bundle) != version:
            raise BundleError(
                f"model {self.name}: {path} holds version {version_of(bundle)} now, not {version} (the "
                "bundle was changed in place); stage the version again"
            )
        return bundle

    def stage(
        self, source: Path, trusted: Sequence[TrustedKey] | None, *, move: bool = False
    ) -> tuple[str, Bundle]:
        """Copy the bundle directory ``source`` in as a version (its signature checked with ``trusted``,
        its sha256 verified; BundleError / SignatureError otherwise, nothing kept) -> (version, bundle).
        A version already known is answered as it is (409 when it came with another name). With
        ``move`` (``source`` is the caller's to give away: an unpacked upload) its files are moved, not
        copied, when on the same volume: staging then takes no more room than they already do."""
        with self._staging:  # one staging at a time: two copies of one version never race
            return self._stage(source, trusted, move)

    def _stage(self, source: Path, trusted: Sequence[TrustedKey] | None, move: bool) -> tuple[str, Bundle]:
        bundle = load_bundle(source, trusted=trusted)
        if bundle.manifest.name != self.name:
            raise ConflictError(
                f"the bundle is model {bundle.manifest.name!r}, not {self.name!r}: stage it under its name"
            )
        version = version_of(bundle)
        target = self.root / VERSIONS / version
        with self._lock:
            known = version in self._state["versions"]
        if known:
            return version, self.load_version(version, trusted=None)
        (self.root / VERSIONS).mkdir(exist_ok=True, mode=0o700)
        tmp = Path(tempfile.mkdtemp(dir=self.root / VERSIONS, prefix=".staging-"))
        try:
            for item in source.iterdir():
                if item.is_file() and not item.is_symlink():
                    _bring(item, tmp / item.name, move)
            copied = load_bundle(tmp, trusted=trusted)  # what is kept is what was checked
            for item in tmp.iterdir():
                fsync_path(item)
            if target.exists():  # a copy a crash left without its state entry
                shutil.rmtree(target)
            os.replace(tmp, target)
            fsync_path(target.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        with self._lock:
            self._add(version, copied, str(target), "staged")
            gone = self._trim(version)
            self._write()
        _remove(gone)
        log.info("model %s: version %s staged", self.name, version)
        return version, self.load_version(version, trusted=None)

    def activate(self, version: str) -> None:
        """Make ``version`` the active one (recorded before the caller switches the lane)."""
        with self._lock:
            if version not in self._state["versions"]:
                raise NotFoundError(f"model {self.name} has no version {version!r}")
            if self._state["active"] == version:
                return
            self._set_active(version)
            if self._state["shadow"] == version:
                self._state["shadow"] = None
            self._write()

    def previous(self) -> str:
        """The version active before the current one (409 when there is none)."""
        with self._lock:
            history = [v for v in self._state["history"] if v != self._state["active"]]
            if not history:
                raise ConflictError(f"model {self.name} has no earlier active version to roll back to")
            return str(history[-1])

    def rollback(self) -> str:
        """Make the previously active version active again; returns it."""
        with self._lock:
            history = [v for v in self._state["history"] if v != self._state["active"]]
            if not history:
                raise ConflictError(f"model {self.name} has no earlier active version to roll back to")
            back = history[-1]
            self._state["history"] = history[:-1]
            self._state["active"] = back
            if self._state["shadow"] == back:
                self._state["shadow"] = None
            self._write()
            return str(back)

    def set_shadow(self, version: str | None) -> None:
        with self._lock:
            if version is not None and version not in self._state["versions"]:
                raise NotFoundError(f"model {self.name} has no version {version!r}")
            if version is not None and version == self._state["active"]:
                raise ConflictError(f"version {version} is the active one: trial another version")
            self._state["shadow"] = version
            self._write()

    def record_check(self, version: str, state: str, reason: str) -> None:
        """Keep how ``version``'s check on this device ended (``ready`` or ``failed``), across restarts."""
        with self._lock:
            entry = self._state["versions"].get(version)
            if entry is None:
                return
            entry["check"] = {"state": state, "reason": reason, "at": time.time()}
            self._write()

    def checks(self) -> dict[str, dict[str, Any]]:
        """The recorded checks by version (a version checked before the last start)."""
        with self._lock:
            return {v: dict(e["check"]) for v, e in self._state["versions"].items() if "check" in e}

    def path(self, version: str) -> Path:
        return Path(self.get(version).path)

    def _add(self, version: str, bundle: Bundle, path: str, source: str) -> None:
        self._state["versions"][version] = Version(
            version, str(bundle.manifest.model_sha256), path, source, time.time()
        ).to_json()

    def _set_active(self, version: str) -> None:
        old = self._state["active"]
        if old is not None and old != version:
            self._state["history"] = [v for v in self._state["history"] if v != old] + [old]
        self._state["active"] = version

    def _trim(self, added: str) -> list[str]:
        """Forget the oldest versions beyond ``keep``, never the one just ``added``, the active, trial,
        previous or settings' one; returns the staged copies to remove once the state is written."""
        versions = self._state["versions"]
        pinned = {
            added, self._state["active"], self._state["shadow"], self._state.get("settings_version"),
            *self._state["history"][-1:],
        }  # fmt: skip
        old = sorted(
            (v for v in versions.values() if v["version"] not in pinned), key=lambda v: v["added_at"]
        )
        gone: list[str] = []
        while len(versions) > self.keep and old:
            entry = old.pop(0)
            del versions[entry["version"]]
            self._state["history"] = [v for v in self._state["history"] if v != entry["version"]]
            if entry["source"] == "staged":
                gone.append(entry["path"])
        return gone


def _bring(source: Path, target: Path, move: bool) -> None:
    """Copy ``source`` to ``target``, or with ``move`` rename it (a copy across volumes)."""
    if move:
        try:
            os.replace(source, target)
            return
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
    shutil.copyfile(source, target)


def _remove(paths: list[str]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def active_bundle(
    versions: ModelVersions, configured: Path, bundle: Bundle, trusted: Sequence[TrustedKey] | None
) -> Bundle:
    """The bundle to serve at start: the settings' ``bundle`` when new to the appliance, else the version
    activated last (loaded and, with ``trusted``, its signature checked again)."""
    active = versions.seed(configured, bundle)
    if active == version_of(bundle):
        return bundle
    log.info("model %s: serving version %s, activated last (the settings name %s)", versions.name, active,
             version_of(bundle))  # fmt: skip
    return versions.load_version(active, trusted)
