"""``retinaedge boot``: the container entrypoint. Validate the configuration, decide about the engine, serve.

1. **Configuration.** Every ``RETINAEDGE_*`` variable must name a setting (a misspelt variable is refused,
   not silently ignored), the settings must validate, every model bundle must load (manifest and model
   sha256 checked, two bundles of one name refused), and the data directory and the engine cache must be
   writable directories. Any failure prints one line saying what is wrong and exits 78 (``EX_CONFIG``).
2. **Engine.** For each model (the version the start will serve, with the model's own ``backend``),
   :func:`~retinaedge.runtime.backends.tensorrt.planning.plan_backend` decides, from the device fingerprint and
   the engine cache, between a cached engine (``cache-hit``), a build (``build-first`` on an empty cache,
   ``build-new-model`` after a model update, ``build-fingerprint-changed`` after a JetPack/TensorRT
   upgrade or on another module, ``build-corrupt``) and ONNX Runtime (with the reason: no TensorRT, options
   refused, builds disabled, or ``onnxruntime-build-failed-earlier`` when this engine's last build failed
   less than ``engine_build_retry_s`` ago, so a restart loop never rebuilds for ever). The decision and
   what changed since the previous start (device, TensorRT/CUDA/L4T versions, models) are logged and kept
   in ``<data_dir>/boot.json`` (the first model's plan at its top level, every model's in ``models``). With ``backend=tensorrt`` a device that cannot use TensorRT exits 69
   (``EX_UNAVAILABLE``).
3. **Serve**, as ``retinaedge serve``. The build itself runs in the service: inside the model load
   (``/healthz`` answers, ``/readyz`` is 503 "building a TensorRT engine") or, with
   ``engine_build_while=onnxruntime``, in a child process while ONNX Runtime serves.

``--check`` stops after step 2 and prints the decision as one JSON object, with ``database``: the state
database as found, read-only (``missing``, ``ok``, ``damaged``: it will be moved aside and rebuilt from
the spool at start, or ``unreadable``: a storage fault, answered 503 until fixed;
:func:`~retinaedge.service.repair.inspect_state`).
"""

from __future__ import annotations

import argparse
import errno
import functools
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retinaedge.runtime import __version__
from retinaedge.runtime.errors import BundleError, ConfigError, RetinaEdgeError
from retinaedge.service import serve_cli
from retinaedge.service.repair import inspect_state

if TYPE_CHECKING:  # the verb's module is imported for every `retinaedge --help`: heavy imports wait
    from retinaedge.runtime.backends.tensorrt.planning import BackendPlan, Probe
    from retinaedge.runtime.bundle import Bundle
from retinaedge.service.http.tls import server_context
from retinaedge.service.settings import Settings

log = logging.getLogger(__name__)

EX_CONFIG = 78
#: errno values of a data directory that is a storage fault (served as 503), not a configuration error.
STORAGE_FAULTS = frozenset({errno.EROFS, errno.EIO})
EX_UNAVAILABLE = 69
BOOT_RECORD = "boot.json"
#: Variables read besides the settings' own fields.
EXTRA_VARIABLES = frozenset({"RETINAEDGE_CONFIG_FILE", "RETINAEDGE_API_TOKEN_FILE"})


def add_arguments(p: argparse.ArgumentParser) -> None:
    serve_cli.add_arguments(p)
    p.add_argument(
        "--check",
        action="store_true",
        help="validate and decide only; print the decision as JSON, do not serve",
    )


def unknown_variables(environ: dict[str, str] | os._Environ[str]) -> list[str]:
    """``RETINAEDGE_*`` variables that name no setting (typos), sorted."""
    from retinaedge.service.settings import Settings

    known = {f"RETINAEDGE_{name.upper()}" for name in Settings.model_fields} | EXTRA_VARIABLES
    return sorted(k for k in environ if k.startswith("RETINAEDGE_") and k not in known)


def check_writable_dir(path: Path, what: str) -> None:
    """Create ``path`` if needed and prove a file can be written in it (raises ConfigError)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"{what} {path} is not a writable directory ({exc.strerror or exc}); mount a writable volume there"
        ) from exc


def check_volume(path: Path, what: str) -> None:
    """:func:`check_writable_dir`, except that a read-only or failing volume (EROFS, EIO) is a storage
    fault, not a configuration: logged, and the service starts and answers 503 with the reason
    (docs/operations.md) instead of exiting in a restart loop."""
    try:
        check_writable_dir(path, what)
    except ConfigError as exc:
        cause = exc.__cause__
        if not (isinstance(cause, OSError) and cause.errno in STORAGE_FAULTS):
            raise
        log.error("%s; serving 503 until it is fixed", exc)


def validate(settings: Settings) -> list[Bundle]:
    """Step 1 past the settings themselves: every bundle (two of one name refused) and the writable
    directories; returns the bundles in the settings' order."""
    from retinaedge.runtime.bundle import load_bundle
    from retinaedge.service.lanes import load_bundles

    trusted = settings.trusted()
    for entry in settings.bundles():
        try:
            load_bundle(entry.path, trusted=trusted)
        except BundleError as exc:
            raise ConfigError(f"model bundle {entry.path}: {exc}") from exc
    bundles = load_bundles(settings, trusted)
    check_volume(settings.data_dir, "data_dir (spool and database)")
    check_volume(settings.engine_cache_root, "engine cache")
    server_context(settings)  # a certificate or key that cannot be used: exit 78 with the reason
    return bundles


@dataclass(frozen=True)
class BootReport:
    """The decision of one start and what changed since the previous one."""

    plan: BackendPlan
    record: dict[str, Any]
    changes: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {**self.record, "changes": self.changes}


def decide(settings: Settings, bundles: Sequence[Bundle], probe: Probe | None = None) -> BootReport:
    """Step 2: plan every model's backend, compare with ``boot.json``, write the new record (raises in mode
    tensorrt). ``bundles``: the settings' bundles in order (:func:`validate`).

    Each model is planned for the version the start will serve (an activated one, not necessarily the
    settings' bundle: :mod:`~retinaedge.service.versions.peek`) with its own ``backend``. The record's
    top-level fields are the first model's (the one ``GET /v1/model`` answers for); ``models`` lists all.
    ``probe``: this device's fingerprint and capabilities (default: the real TensorRT/pycuda probe; called
    at most once).
    """
    from retinaedge.runtime.backends.tensorrt.cache import atomic_write
    from retinaedge.runtime.backends.tensorrt.planning import default_probe, plan_backend
    from retinaedge.service.versions.peek import next_start

    device = functools.cache(probe or default_probe)
    trusted = settings.trusted()
    plans: list[tuple[Bundle, BackendPlan, dict[str, Any]]] = []
    for entry, bundle in zip(settings.bundles(), bundles, strict=True):
        try:
            start = next_start(settings.data_dir, bundle, trusted)
        except BundleError as exc:  # the start fails on it too: say so, plan the settings' bundle
            log.error("%s", exc)
            start = None
        served = start.bundle if start is not None else bundle
        mode = settings.for_model(entry).backend
        plan = plan_backend(
            served,
            mode=mode,
            options=settings.build_options(),
            cache_root=settings.engine_cache_root,
            cache_max_bytes=settings.engine_cache_max_bytes,
            allow_build=settings.engine_build,
            probe=device,
            retry_after_s=settings.engine_build_retry_s,
        )
        model = {
            "name": served.manifest.name,
            "sha256": served.manifest.model_sha256,
            "version": start.version if start is not None else None,
            "version_source": start.source if start is not None else "settings (the active version failed)",
            "backend": mode,
        }
        plans.append((served, plan, model))
    first, plan, model = plans[0]
    record = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "retinaedge": __version__,
        "model": {"name": model["name"], "sha256": model["sha256"]},
        "engine_build_while": settings.engine_build_while,
        **plan.to_dict(),
        "models": [{**m, **p.to_dict()} for _, p, m in plans],
    }
    path = settings.data_dir / BOOT_RECORD
    changes = changes_since(read_record(path), record)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, [json.dumps(record, indent=2).encode()])
    except OSError as exc:  # a read-only data volume: the service serves 503; the record waits
        log.warning("the boot record %s cannot be written (%s)", path, exc.strerror or exc)
    return BootReport(plan, record, changes)


def read_record(path: Path) -> dict[str, Any] | None:
    """The previous start's record, or None (none yet, or unreadable: then nothing is compared)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def changes_since(previous: dict[str, Any] | None, current: dict[str, Any]) -> list[str]:
    """What differs from the previous start: device fingerprint fields, model, retinaedge version."""
    if previous is None:
        return ["first start with this data directory"]
    changes = []
    old_fp, new_fp = previous.get("fingerprint"), current.get("fingerprint")
    if isinstance(old_fp, dict) and isinstance(new_fp, dict):
        changes += [
            f"{name}: {old_fp.get(name)} -> {new_fp.get(name)}"
            for name in sorted(set(old_fp) | set(new_fp))
            if old_fp.get(name) != new_fp.get(name)
        ]
    elif bool(old_fp) != bool(new_fp):
        changes.append("TensorRT became usable" if new_fp else "TensorRT is no longer usable")
    changes += model_changes(previous.get("models") or [previous.get("model") or {}], current["models"])
    if previous.get("retinaedge") != current["retinaedge"]:
        changes.append(f"retinaedge {previous.get('retinaedge')} -> {current['retinaedge']}")
    return changes


def model_changes(before: list[dict[str, Any]], now: list[dict[str, Any]]) -> list[str]:
    """What changed in the models served (name and sha256 of each): one model replaced by another, a
    model's new version, a model added or no longer served."""
    if len(before) == 1 and len(now) == 1:
        old, new = before[0], now[0]
        if old.get("sha256") == new["sha256"]:
            return []
        return [
            f"model {old.get('name')} ({str(old.get('sha256'))[:12]}) -> {new['name']} ({new['sha256'][:12]})"
        ]
    old_by_name = {m.get("name"): m for m in before}
    changes = []
    for model in now:
        was = old_by_name.pop(model["name"], None)
        if was is None:
            changes.append(f"model {model['name']} ({model['sha256'][:12]}) added")
        elif was.get("sha256") != model["sha256"]:
            changes.append(f"model {model['name']}: {str(was.get('sha256'))[:12]} -> {model['sha256'][:12]}")
    changes += [f"model {name} is no longer served" for name in old_by_name]
    return changes


def run(args: argparse.Namespace) -> int:
    from retinaedge.runtime.jsonout import emit
    from retinaedge.service.serve_cli import serve, settings_from_args

    try:
        unknown = unknown_variables(os.environ)
        if unknown:
            raise ConfigError(f"unknown variable(s) {', '.join(unknown)} (no such setting; misspelt?)")
        settings = settings_from_args(args)
        bundles = validate(settings)
    except ConfigError as exc:
        log.error("configuration refused: %s", exc)
        emit({"error": exc.to_dict()})
        return EX_CONFIG
    try:
        report = decide(settings, bundles)
    except RetinaEdgeError as exc:  # backend=tensorrt on a device that cannot use it
        log.error("backend=tensorrt, but TensorRT cannot be used here: %s", exc)
        emit({"error": exc.to_dict()})
        return EX_CONFIG if isinstance(exc, ConfigError) else EX_UNAVAILABLE
    for model in report.record["models"]:
        log.info("model %s (version %s): engine decision %s: %s", model["name"], model["version"],
                 model["decision"], model["reason"])  # fmt: skip
    for change in report.changes:
        log.info("since the previous start: %s", change)
    state = inspect_state(settings.data_dir / "state.sqlite3")
    if state["state"] in ("damaged", "unreadable"):
        log.warning("state database %s: %s (%s)", state["state"], state["reason"], state.get("action", "503"))
    if args.check:
        emit({**report.to_dict(), "database": state})
        return 0
    return serve(settings)
